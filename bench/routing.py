"""Routing bench: tokens/J and SLO attainment of the three policies across a load sweep.

    python -m bench.routing            # 10..90% of capacity, 5 seeds, 300 s traces
    python -m bench.routing --quick    # 10, 30, 60, 90%, 2 seeds, 60 s traces

Fleet: 2x h100, 2x a100, 2x l4 (`proxy/sim/profiles.py`), one `joulegate simulate` run per
(load, seed, policy) on a synthetic trace (`proxy/sim/traces.py` defaults: Gamma arrivals with
CV 1.5, Azure-conversation-like log-normal lengths). SLO per request: TTFT <= 2 s and TPOT <=
200 ms; attainment is the share of requests meeting both.

Capacity: the sum over the fleet's GPUs of the most requests/s each sustains for the trace
mix's mean prompt and output lengths with TPOT within the SLO (`fleet_capacity_rps`: decode
at the best batch up to max_batch, plus each request's prefill time). It is a fluid upper
bound: with bursty arrivals no policy meets the TTFT SLO for every request near 100%.

Also times one `efficiency` routing decision over 16 backends with trained models
(`time.perf_counter_ns` around each of many calls; the median, timer overhead included).
Writes bench/results/routing-<timestamp>.json and .svg (tokens/J vs offered load).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from policies.base import BackendView, RequestInfo
from policies.efficiency import Efficiency
from policies.model import EfficiencyModel
from proxy.sim.fleet import POLICY_NAMES, fleet_capacity_rps, parse_fleet, simulate
from proxy.sim.plot import svg_lines
from proxy.sim.traces import synth_trace

FLEET = {"backends": [
    {"name": "h100", "profile": "h100-llama3.1-8b", "count": 2},
    {"name": "a100", "profile": "a100-llama3.1-8b", "count": 2},
    {"name": "l4", "profile": "l4-llama3.1-8b", "count": 2},
]}
SLO_TTFT_S, SLO_TPOT_S = 2.0, 0.2
RESULTS = Path(__file__).parent / "results"


def capacity_rps() -> float:
    """The fleet's capacity for the synthetic trace mix (means from a long reference trace)."""
    reference = synth_trace(10.0, 5000.0, seed=12345)
    return fleet_capacity_rps(parse_fleet(FLEET), reference, SLO_TPOT_S)


def run_point(job: tuple[float, float, int, float, str]) -> dict[str, Any]:
    """One (load, seed, policy) simulation; runs in a worker process."""
    load, rate_rps, seed, duration_s, policy = job
    trace = synth_trace(rate_rps, duration_s, seed=seed)
    t0 = time.perf_counter()
    r = simulate(parse_fleet(FLEET), trace, policy, slo_ttft_s=SLO_TTFT_S, slo_tpot_s=SLO_TPOT_S)
    return {
        "load": load, "seed": seed, "policy": policy, "rate_rps": rate_rps,
        "requests": r.requests, "wall_s": time.perf_counter() - t0,
        "output_tokens_per_joule": r.output_tokens_per_joule,
        "joules_per_request": r.joules_per_request, "idle_energy_share": r.idle_energy_share,
        "slo_attainment": r.slo_attainment, "ttft_p99_ms": r.ttft_p99_ms,
        "tpot_p99_ms": r.tpot_p99_ms, "conservation_error_j": r.conservation_error_j,
        "utilisation": {b.name: b.utilisation for b in r.backends.values()},
        "requests_by_backend": {b.name: b.requests for b in r.backends.values()},
    }


def decision_ns(backends: int = 16, calls: int = 50_000, seed: int = 0) -> float:
    """Median ns of one `efficiency` choice among `backends` trained backends."""
    rng = random.Random(seed)
    models: dict[str, EfficiencyModel] = {}
    for b in range(backends):
        m = models[f"b{b}"] = EfficiencyModel()
        idle_w, peak_w = rng.uniform(25, 140), rng.uniform(70, 700)
        for i in range(600):  # a few minutes of 100 ms samples over a range of loads
            n = (i % 64) * 2
            m.observe_interval(n, idle_w + (peak_w - idle_w) * min(1.0, n / 128) ** 0.3,
                               n * 120.0 / (1 + n / 80), 0.1 * i, in_flight=n)
            m.observe_request(n + 1, 0.1 * i, ttft_s=0.05 + 0.01 * n, tpot_s=0.01 + 0.0003 * n,
                              waiting=1 + n // 16)
        m.refresh()
    policy = Efficiency(models)
    request = RequestInfo("m")
    view_sets = [[BackendView(f"b{b}", True, rng.randrange(0, 100)) for b in range(backends)]
                 for _ in range(64)]
    for views in view_sets:  # warm the plan caches
        policy.choose(request, views, 0.0)
    samples = []
    clock = time.perf_counter_ns
    for i in range(calls):
        views = view_sets[i & 63]
        t0 = clock()
        policy.choose(request, views, 0.0)
        samples.append(clock() - t0)
    return statistics.median(samples)


def summarise(rows: list[dict[str, Any]], loads: list[float]) -> dict[str, Any]:
    """Seed means per (load, policy), ratios and the issue's targets."""
    table: dict[float, dict[str, dict[str, float]]] = {}
    for load in loads:
        table[load] = {}
        for policy in POLICY_NAMES:
            pts = [r for r in rows if r["load"] == load and r["policy"] == policy]
            table[load][policy] = {k: statistics.fmean(p[k] for p in pts) for k in (
                "rate_rps", "output_tokens_per_joule", "joules_per_request",
                "idle_energy_share", "slo_attainment", "ttft_p99_ms", "tpot_p99_ms")}
    ratios = {load: {
        "vs_round_robin": table[load]["efficiency"]["output_tokens_per_joule"]
        / table[load]["round_robin"]["output_tokens_per_joule"],
        "vs_least_loaded": table[load]["efficiency"]["output_tokens_per_joule"]
        / table[load]["least_loaded"]["output_tokens_per_joule"],
        "slo_points_vs_round_robin": 100 * (table[load]["efficiency"]["slo_attainment"]
                                            - table[load]["round_robin"]["slo_attainment"]),
        "slo_points_vs_least_loaded": 100 * (table[load]["efficiency"]["slo_attainment"]
                                             - table[load]["least_loaded"]["slo_attainment"]),
    } for load in loads}
    low = [ratios[x]["vs_round_robin"] for x in loads if x <= 0.6 + 1e-9]
    low_ll = [ratios[x]["vs_least_loaded"] for x in loads if x <= 0.6 + 1e-9]
    top = max(loads)
    targets = {
        "tokens_per_joule_vs_rr_mean_10_60": statistics.fmean(low) if low else None,
        "tokens_per_joule_vs_ll_mean_10_60": statistics.fmean(low_ll) if low_ll else None,
        "tokens_per_joule_vs_rr_at_top": ratios[top]["vs_round_robin"],
        "tokens_per_joule_vs_ll_at_top": ratios[top]["vs_least_loaded"],
        "worst_slo_points_vs_rr": min(r["slo_points_vs_round_robin"] for r in ratios.values()),
        "worst_slo_points_vs_ll": min(r["slo_points_vs_least_loaded"] for r in ratios.values()),
    }
    return {"table": table, "ratios": ratios, "targets": targets}


def format_table(summary: dict[str, Any], loads: list[float]) -> str:
    table, ratios = summary["table"], summary["ratios"]
    head = f"{'load':>5}{'req/s':>7} |"
    for p in POLICY_NAMES:
        head += f" {p[:12]:>12} tok/J  SLO%   TTFT99 TPOT99 |"
    head += "  eff/rr eff/ll"
    lines = [head]
    for load in loads:
        row = f"{100 * load:>4.0f}%{table[load]['round_robin']['rate_rps']:>7.1f} |"
        for p in POLICY_NAMES:
            c = table[load][p]
            row += (f" {c['output_tokens_per_joule']:>18.3f}{100 * c['slo_attainment']:>6.1f}"
                    f"{c['ttft_p99_ms'] / 1e3:>8.2f}s{c['tpot_p99_ms']:>5.0f}ms |")
        row += f"  {ratios[load]['vs_round_robin']:>5.2f}x {ratios[load]['vs_least_loaded']:>5.2f}x"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 loads, 2 seeds, 60 s traces")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per load (default 5)")
    parser.add_argument("--duration-s", type=float, default=None, help="trace length (default 300)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--no-micro", action="store_true", help="skip the decision micro-benchmark")
    args = parser.parse_args(argv)
    loads = [0.1, 0.3, 0.6, 0.9] if args.quick else [x / 10 for x in range(1, 10)]
    seeds = args.seeds or (2 if args.quick else 5)
    duration_s = args.duration_s or (60.0 if args.quick else 300.0)

    capacity = capacity_rps()
    print(f"fleet: 2x h100, 2x a100, 2x l4; capacity {capacity:.1f} req/s for the trace mix; "
          f"{len(loads)} loads x {seeds} seeds x {len(POLICY_NAMES)} policies, {duration_s:g} s traces")
    jobs = [(load, load * capacity, seed, duration_s, policy)
            for load in loads for seed in range(seeds) for policy in POLICY_NAMES]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(run_point, jobs))
    sweep_s = time.perf_counter() - t0
    summary = summarise(rows, loads)
    print(format_table(summary, loads))
    t = summary["targets"]
    print(f"efficiency vs round_robin, tokens/J: mean over 10-60% {t['tokens_per_joule_vs_rr_mean_10_60']:.2f}x "
          f"(target >= 1.4x), at {100 * max(loads):.0f}% {t['tokens_per_joule_vs_rr_at_top']:.2f}x (target >= 1.1x); "
          f"worst SLO difference {t['worst_slo_points_vs_rr']:+.2f} points (target >= -0.5)")
    print(f"efficiency vs least_loaded, tokens/J: mean over 10-60% {t['tokens_per_joule_vs_ll_mean_10_60']:.2f}x, "
          f"at {100 * max(loads):.0f}% {t['tokens_per_joule_vs_ll_at_top']:.2f}x; "
          f"worst SLO difference {t['worst_slo_points_vs_ll']:+.2f} points")
    worst_err = max(r["conservation_error_j"] for r in rows)
    print(f"energy conservation: worst |request truth - (counter - idle)| {worst_err:.2e} J; "
          f"sweep {sweep_s:.0f} s on {args.jobs} processes, {sum(r['requests'] for r in rows)} requests")
    micro_ns = None
    if not args.no_micro:
        micro_ns = decision_ns()
        print(f"efficiency decision, 16 backends: median {micro_ns / 1e3:.1f} us (target <= 20 us)")

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = {"settings": {"loads": loads, "seeds": seeds, "duration_s": duration_s,
                        "capacity_rps": capacity, "fleet": FLEET,
                        "slo": {"ttft_s": SLO_TTFT_S, "tpot_s": SLO_TPOT_S}},
           "summary": summary, "rows": rows, "decision_median_ns": micro_ns, "sweep_s": sweep_s}
    json_path = RESULTS / f"routing-{stamp}.json"
    json_path.write_text(json.dumps(out, indent=1, default=str))
    series = {p: [(100 * load, summary["table"][load][p]["output_tokens_per_joule"]) for load in loads]
              for p in POLICY_NAMES}
    svg_path = RESULTS / f"routing-{stamp}.svg"
    svg_path.write_text(svg_lines(series, title="output tokens/J vs offered load (2x h100, 2x a100, 2x l4)",
                                  x_label="offered load, % of fleet capacity", y_label="output tokens / J"))
    slo = {p: [(100 * load, 100 * summary["table"][load][p]["slo_attainment"]) for load in loads]
           for p in POLICY_NAMES}
    slo_path = RESULTS / f"routing-{stamp}-slo.svg"
    slo_path.write_text(svg_lines(slo, title="SLO attainment (TTFT <= 2 s and TPOT <= 200 ms)",
                                  x_label="offered load, % of fleet capacity",
                                  y_label="requests meeting the SLO, %"))
    print(f"wrote {json_path}, {svg_path} and {slo_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
