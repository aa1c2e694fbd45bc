"""The command: run each configuration end to end, print the report, write the JSON result."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import openai

from bench.attribution.figures import annotate, breakdown, calibration, energy_books, summarize
from bench.attribution.fleet import Run, _get_json, serve_proxy
from bench.attribution.measure import Outcome, drive, fetch_truth, wait_measured
from bench.attribution.report import (
    _f,
    _git_state,
    _json_default,
    print_breakdown,
    print_classes,
    print_table,
    print_worst,
    targets_for,
)
from bench.attribution.workload import (
    ADMIN_KEY,
    BACKENDS,
    DEFAULT_SETUPS,
    QUICK_SETUPS,
    TENANT_MIX,
    Planned,
    Setup,
    make_plan,
)
from bench.overhead import HOST, RESULTS_DIR, signals_as_interrupt

WARMUP_SEED_OFFSET = 1000  # the warm-up workload's seed: the measured one's plus this


def run_setup(setup: Setup, args: argparse.Namespace, plan: list[Planned], log_dir: Path
              ) -> tuple[dict[str, Any], list[Outcome]]:
    from proxy.sim.profiles import get_profile

    run = Run(setup, args, log_dir)
    t_start = time.monotonic()
    try:
        run.start()
        assert run.proxy is not None
        startup_s = time.monotonic() - t_start
        sims_before = run.sim_energy()
        tag = f"{args.seed}-{setup.name.replace('@', '-').replace('.', '_').replace('+', '-')}"
        warm: list[Outcome] = []
        if args.warmup:
            # A proxy that has been up a while: its split weights learned from other traffic.
            # Not compared; its energy stays in the conservation window (books and counters).
            warm = asyncio.run(drive(make_plan(args.warmup, args.seed + WARMUP_SEED_OFFSET),
                              f"http://{HOST}:{run.proxy.port}", args.concurrency, "warm-" + tag,
                              closed_loop=setup.busy))
        t_work = time.monotonic()
        outcomes = asyncio.run(drive(plan, f"http://{HOST}:{run.proxy.port}", args.concurrency, tag,
                                     closed_loop=setup.busy))
        workload_s = time.monotonic() - t_work
        settle_s = asyncio.run(wait_measured(f"http://{HOST}:{run.proxy.port}", warm + outcomes,
                                             args.measure_timeout_s + 10 * setup.interval_s))
        asyncio.run(fetch_truth(run.sims, warm + outcomes))
        books = run.books()
        split_weights = {b["name"]: b.get("split_weights") for b in _get_json(
            run.proxy.port, "/v1/energy/backends", ADMIN_KEY)["data"]}
        sims_after = run.sim_energy()
        proxy_log_errors = sum(1 for line in run.proxy.log_tail(10_000).splitlines()
                               if "Traceback" in line or " ERROR " in line)
    finally:
        run.stop()
    profiles = {name: get_profile(profile) for name, profile in setup.backends}
    prefill_j = {name: p.prefill_j_per_token() for name, p in profiles.items()}
    annotate(outcomes, setup.interval_s, prefill_j)
    idle_w = {name: p.idle_w for name, p in profiles.items()}
    energy = energy_books(books, sims_before, sims_after, idle_w, warm + outcomes)
    summary = summarize(setup, outcomes, energy)
    summary.update(startup_s=startup_s, workload_s=workload_s, settle_s=settle_s,
                   total_s=time.monotonic() - t_start, proxy_log_errors=proxy_log_errors,
                   breakdown=breakdown(outcomes), calibration=calibration(outcomes, prefill_j),
                   split_weights=split_weights)
    return summary, outcomes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.attribution",
        description="Per-request energy attribution vs simulator ground truth.",
    )
    ap.add_argument("--quick", action="store_true",
                    help="80 requests, only sim@100ms+skew2.5s, sim@1s and busy@100ms")
    ap.add_argument("--requests", type=int, default=None, help="requests per configuration "
                    "(default 200; 120 with --quick)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=0, metavar="N",
                    help="first send N requests of another seed, not compared (learned weights warm)")
    ap.add_argument("--concurrency", type=int, default=16, help="max requests in flight")
    ap.add_argument("--only", default=None,
                    help="comma list of configs to run, e.g. sim@100ms,dcgm@1s")
    ap.add_argument("--prefill-weight", type=float, default=None,
                    help="energy.prefill_weight for the proxy (default: the proxy's own default)")
    ap.add_argument("--no-learn", action="store_true",
                    help="energy.learn: false (one fixed prefill_weight, no length/context terms)")
    ap.add_argument("--whole-upstream", action="store_true",
                    help="backends[].stream_upstream: false (non-streamed answers asked whole upstream)")
    ap.add_argument("--plain-serve", action="store_true",
                    help="run the stock `joulegate serve` (no books: external conservation only)")
    ap.add_argument("--measure-timeout-s", type=float, default=30.0,
                    help="how long to wait for every request to turn measured")
    ap.add_argument("--worst", type=int, default=10, help="worst requests listed for a missed target")
    ap.add_argument("--out", type=Path, default=None, help="JSON output path")
    ap.add_argument("--serve-proxy", metavar="CONFIG", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_proxy:
        return args
    setups = QUICK_SETUPS if args.quick else DEFAULT_SETUPS
    if args.only:
        by_name = {s.name: s for s in DEFAULT_SETUPS}
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        bad = [n for n in names if n not in by_name]
        if bad or not names:
            ap.error(f"--only: unknown config(s) {bad}; choose from {','.join(by_name)}")
        setups = tuple(by_name[n] for n in names)
    args.setups = setups
    if args.requests is None:
        args.requests = 80 if args.quick else 200
    if args.requests < 1 or args.concurrency < 1:
        ap.error("--requests and --concurrency must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_proxy:
        return serve_proxy(args.serve_proxy, args.port)
    plan = make_plan(args.requests, args.seed)
    started = time.time()
    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="jg-attr-"))
    kinds = defaultdict(int)
    for p in plan:
        kinds[p.cls] += 1
        kinds["stream" if p.stream else "non-stream"] += p.kind != "embedding"
        kinds["aborted"] += bool(p.abort_after)
    print(f"{len(plan)} requests per config (seed {args.seed}; {dict(kinds)}; arrivals over "
          f"{plan[-1].at_s:.1f} s in bursts; concurrency <= {args.concurrency}); configs: "
          f"{', '.join(s.name for s in args.setups)}; logs in {tmp}", flush=True)
    if load_before > 1.0:
        print(f"warning: 1-min load average {load_before:.2f} before start: other work on this "
              "box delays token delivery and skews per-request figures", flush=True)
    summaries: list[dict[str, Any]] = []
    all_outcomes: dict[str, list[Outcome]] = {}
    problems: list[str] = []
    with signals_as_interrupt():
        try:
            for setup in args.setups:
                try:
                    summary, outcomes = run_setup(setup, args, plan, tmp)
                except (OSError, RuntimeError, httpx.HTTPError) as exc:
                    problems.append(f"{setup.name}: {type(exc).__name__}: {exc}")
                    print(f"{setup.name}: FAILED: {exc}", file=sys.stderr, flush=True)
                    continue
                summaries.append(summary)
                all_outcomes[setup.name] = outcomes
                print(f"{setup.name}: {summary['compared']} compared, fleet "
                      f"{_f(summary['fleet_err_pct'], 2, True)}%, median "
                      f"{_f(summary['median_abs_err_pct'], 1)}%, run {summary['total_s']:.0f} s "
                      f"(workload {summary['workload_s']:.0f} s, settle {summary['settle_s']:.1f} s)",
                      flush=True)
                for what in ("errors", "not_measured", "token_mismatches", "tenant_mismatches",
                             "proxy_log_errors"):
                    if summary[what]:
                        problems.append(f"{setup.name}: {summary[what]} {what.replace('_', ' ')}")
                if summary.get("conservation_window_ok") is False:
                    problems.append(f"{setup.name}: the proxy's settled window does not lie "
                                    "between the idle readings; cons% is not trustworthy")
        except KeyboardInterrupt:
            print("\ninterrupted; processes stopped", file=sys.stderr)
            return 130

    print()
    print_table(summaries)
    print("\nper request class (chat: prompt < 2000 tokens, long: 2000-8000, embedding):")
    print_classes(summaries)
    targets = targets_for(summaries)
    print()
    for t in targets:
        print(f"{t['verdict']:<4}  {t['config']:<10} {t['target']}: {_f(t['value'], 3)} "
              f"(limit {t['limit']:g})")
    print("\nerror by request class and backend (tot = signed error of the group's total, "
          "med = median |error|):")
    for s in summaries:
        print_breakdown(s)
    failed = {t["config"] for t in targets if t["verdict"] == "FAIL"}
    for s in summaries:
        if s["config"] in failed:
            print_worst(s, all_outcomes[s["config"]], args.worst)
    print("\nconservation: cons% = (sum of final joules from the API + the proxy's idle joules "
          "- the simulators' counters over the proxy's settled window) / that; cons-ext% = "
          "(sum attributed + the simulators' own idle - the simulators' joules) / the latter.")
    for p in problems:
        print(f"problem: {p}")

    result = {
        "started_unix_s": started,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                 "python": platform.python_version(), "platform": platform.platform(),
                 "openai": openai.__version__, "loadavg_1m_before": load_before,
                 "loadavg_1m_after": os.getloadavg()[0], "git": _git_state()},
        "settings": {"requests": args.requests, "seed": args.seed, "concurrency": args.concurrency,
                     "configs": [s.name for s in args.setups], "prefill_weight": args.prefill_weight,
                     "learn": not args.no_learn,
                     "plain_serve": args.plain_serve, "backends": dict(BACKENDS),
                     "tenant_mix": TENANT_MIX},
        "plan": [asdict(p) for p in plan],
        "configs": summaries,
        "targets": targets,
        "requests": {name: [asdict(o) for o in outs] for name, outs in all_outcomes.items()},
        "problems": problems,
    }
    out = args.out
    if out is None:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        out = RESULTS_DIR / f"attribution-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}.json"
    out.write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    print(f"\nwrote {out}")
    if problems:
        print(f"logs kept in {tmp}")
        return 1
    shutil.rmtree(tmp, ignore_errors=True)
    return 0
