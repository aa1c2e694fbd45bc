"""Soak: the real proxy under c=64 mixed traffic for minutes; RSS, open fds and p99 per minute.

    python -m bench.soak [--duration-s 600] [--concurrency 64] [--warmup-s 300] [--ledger URL]

Two `joulegate sim-backend`s (H100, A100; power from the simulators' power API, engine load
from their /metrics) behind one `joulegate serve` with energy on, a ledger (SQLite in a temp dir
unless --ledger), two tenants and an admin key. One asyncio client keeps --concurrency requests
in flight, each followed at once by the next: streamed chat with and without include_usage,
chat, completions (streamed and not), embeddings, 401s, 400s and streams dropped after their
first chunk. The proxy process is sampled every 5 s (VmRSS, entries in /proc/PID/fd, CPU).
Prints one row per minute, then start/end figures and PASS/FAIL against the targets, and
checks that the ledger holds exactly the requests the client saw answered.

The warm-up is 5 minutes because that is how long the proxy's RSS takes to level off under this
load (measured: +8.9 MiB over the first 4 minutes after a 60 s warm-up, then +0.9 MiB over the
next 6; Python object counts and allocated blocks stay flat throughout): the last 10,000
requests kept for /v1/energy/requests, the power timelines' window, SQLite's page cache and
the allocator's arenas all fill first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench.attribution import ADMIN_KEY, _get_json, _ok, start_sims, wait_powered
from bench.overhead import HOST, Server, free_port, joulegate_argv, signals_as_interrupt, wait_until
from bench.routing import live_config
from bench.soak_load import BIN_S, KINDS, MODEL, TENANT_KEYS, Soak
from proxy.energy.sources.agent import AgentSource

SIMS = [("h100", "h100-llama3.1-8b"), ("a100", "a100-llama3.1-8b")]
TARGET_RSS_GROWTH_PCT = 5.0
# Under load a few client and upstream connections are always being replaced (dropped streams
# close theirs), so two instants can differ by a handful; the idle check has no tolerance.
LOADED_FD_TOLERANCE = 8


def usage_by_tenant(port: int) -> dict[str, list[int]]:
    data = _get_json(port, "/v1/energy/usage?group_by=tenant", ADMIN_KEY)["data"]
    return {r["tenant"]: [r["requests"], r["completion_tokens"], r["joules"]] for r in data}


def ledger_check(port: int, before: dict[str, list[int]], expected: dict[str, list[int]]
                 ) -> tuple[bool, list[str], dict[str, list[int]]]:
    """Poll the usage API until each tenant's new rows match what the client saw answered
    (finals come with the next power sample, the ledger flushes each second), at most 15 s."""
    deadline = time.monotonic() + 15.0
    while True:
        now = usage_by_tenant(port)
        lines, good = [], True
        for t, (n, lo, hi) in expected.items():
            got = now.get(t, [0, 0, 0.0])
            base = before.get(t, [0, 0, 0.0])
            dn, dtok, dj = got[0] - base[0], got[1] - base[1], got[2] - base[2]
            ok = dn == n and lo <= dtok <= hi and (n == 0 or dj > 0)
            good &= ok
            tok = f"{lo}" if lo == hi else f"{lo}..{hi}"
            lines.append(f"{'PASS' if ok else 'FAIL'}  ledger {t}: {dn} requests (client saw {n} "
                         f"answered), {dtok} completion tokens (expected {tok}), {dj:.1f} J")
        if good or time.monotonic() > deadline:
            return good, lines, now
        time.sleep(0.5)  # polling the condition above, with a deadline


def summarize(soak: Soak, extra: dict[str, Any]) -> tuple[list[str], bool]:
    """Start/end figures and PASS/FAIL lines; True when every target passed."""
    full = [b for b in soak.bins[1:] if b.end_s - b.start_s >= BIN_S / 2]
    start = next(s for s in soak.samples if s["t_s"] >= soak.args.warmup_s - 0.5)
    end = soak.samples[-1]
    rss_pct = 100 * (end["rss_mib"] - start["rss_mib"]) / start["rss_mib"]
    measured = [s for s in soak.samples if s["t_s"] >= start["t_s"]]
    slope = statistics.linear_regression([s["t_s"] / 60 for s in measured],
                                         [s["rss_mib"] for s in measured]).slope
    lines = [f"RSS  start of measurement {start['rss_mib']:.1f} MiB, end {end['rss_mib']:.1f} MiB "
             f"({rss_pct:+.2f}%; trend {slope:+.2f} MiB/min over {len(measured)} samples)",
             f"fds  under load: start {start['fds']}, end {end['fds']}, max "
             f"{max(s['fds'] for s in measured)}; idle: before the load {extra['idle_fds_before']}, "
             f"after it {extra['idle_fds_after']} (new: {extra['idle_fds_new'] or '-'}, "
             f"gone: {extra['idle_fds_gone'] or '-'})"]
    p_first, p_last = (full[0].row()["p99_ms"], full[-1].row()["p99_ms"]) if full else (None, None)
    drift = None if not (p_first and p_last) else 100 * (p_last - p_first) / p_first
    errors = sum((b.errors for b in [*soak.bins, soak.drain]), Counter())
    verdicts = [
        (rss_pct < TARGET_RSS_GROWTH_PCT,
         f"RSS growth after warm-up {rss_pct:+.2f}% (< {TARGET_RSS_GROWTH_PCT:g}%)"),
        (extra["idle_fds_after"] <= extra["idle_fds_before"],
         f"idle fds after the load {extra['idle_fds_after']} vs before {extra['idle_fds_before']} (growth 0)"),
        (end["fds"] - start["fds"] <= LOADED_FD_TOLERANCE,
         f"fds under load end - start {end['fds'] - start['fds']:+d} (<= {LOADED_FD_TOLERANCE}: "
         "connections being replaced)"),
        (not errors, f"unexpected errors: {sum(errors.values())} {dict(errors) or ''}".rstrip()),
    ]
    lines += [f"{'PASS' if ok else 'FAIL'}  {text}" for ok, text in verdicts]
    lines.append(f"INFO  p99 {full[0].label if full else '-'} {p_first} ms, "
                 f"{full[-1].label if full else '-'} {p_last} ms: drift "
                 f"{'-' if drift is None else f'{drift:+.1f}%'} (no limit set)")
    return lines, all(ok for ok, _ in verdicts)


async def store_usage(url: str, base_dir: Path) -> dict[str, list[int]]:
    """Per tenant usage read from the store itself, after the proxy's shutdown flush."""
    from proxy.ledger import open_ledger

    ledger = open_ledger(url, base_dir=str(base_dir))
    await ledger.start()
    try:
        rows = await ledger.usage(group_by=("tenant",))
    finally:
        await ledger.close()
    return {r.tenant or "": [r.requests, r.completion_tokens, r.joules] for r in rows}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    ap.add_argument("--duration-s", type=float, default=600, help="measured seconds, after the warm-up")
    ap.add_argument("--warmup-s", type=float, default=300)
    ap.add_argument("--concurrency", type=int, default=64, help="requests kept in flight")
    ap.add_argument("--ledger", default=None, help="ledger URL (default: SQLite in the temp dir); "
                    "a redis://HOST:PORT/DB is read before and after, not flushed")
    ap.add_argument("--without", default="", help="request kinds left out of the mix, comma "
                    f"separated: {','.join(k.name for k in KINDS)}")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="write the per-minute series here")
    args = ap.parse_args(argv)
    args.without = [w.strip() for w in args.without.split(",") if w.strip()]
    if set(args.without) - {k.name for k in KINDS} or len(args.without) == len(KINDS):
        ap.error(f"--without: choose some of {','.join(k.name for k in KINDS)}")
    if args.duration_s < BIN_S / 2 or args.warmup_s < 0 or args.concurrency < 1:
        ap.error("--duration-s must be >= 30, --warmup-s >= 0, --concurrency >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="jg-soak-"))
    ledger = args.ledger or f"sqlite:///{tmp}/ledger.db"
    load = os.getloadavg()[0]
    print(f"soak: c={args.concurrency}, {args.warmup_s:g} s warm-up + {args.duration_s:g} s; "
          f"ledger {ledger}; load average {load:.2f}; logs in {tmp}", flush=True)
    sims: dict[str, Server] = {}
    proxy: Server | None = None
    with signals_as_interrupt():
        try:
            start_sims(sims, SIMS, MODEL, tmp, "soak", args.seed)
            cfg = tmp / "joulegate.yaml"
            # The live routing bench's proxy: efficiency routing, engine-load scrapes, power at
            # 0.1 s from every simulator; here with the ledger and two tenants.
            cfg.write_text(live_config("efficiency", sims, ledger, TENANT_KEYS, ADMIN_KEY))
            port = free_port()
            proxy = Server("proxy", joulegate_argv(None, cfg, port), port, tmp)
            proxy.start()
            wait_until(proxy, lambda: _ok(port, "/readyz"), 30.0)
            wait_powered(proxy, ADMIN_KEY, len(sims), 1.0)
            before = usage_by_tenant(port)
            soak = Soak(args, f"http://{HOST}:{port}", proxy)
            sims_cpu0 = sum(s.cpu_ticks() for s in sims.values())
            # The power sources' clock probes (every PROBE_PERIOD_S) open their own keep-alive
            # connection beside each power stream from their second round on: idle means after it.
            time.sleep(AgentSource.PROBE_PERIOD_S + 2.0)
            idle_before = soak.fd_targets()
            extra = asyncio.run(soak.run())
            extra |= soak.idle_fds(idle_before)
            extra["sims_cpu_s"] = (sum(s.cpu_ticks() for s in sims.values()) - sims_cpu0) / os.sysconf("SC_CLK_TCK")
            ledger_ok, ledger_lines, api_usage = ledger_check(port, before, soak.expected)
            log_errors = sum(1 for line in proxy.log_tail(100_000).splitlines()
                             if "Traceback" in line or " ERROR " in line)
            proxy.stop(timeout_s=40.0)  # graceful: books what still waits, flushes the ledger
            stored = None if ledger.startswith("memory") else asyncio.run(store_usage(ledger, tmp))
        except KeyboardInterrupt:
            print("\ninterrupted; processes stopped", file=sys.stderr)
            return 130
        except (OSError, RuntimeError, httpx.HTTPError) as exc:
            print(f"soak failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        finally:
            for s in ([proxy] if proxy else []) + list(sims.values()):
                s.stop()
    lines, ok = summarize(soak, extra)
    total_s = args.warmup_s + args.duration_s
    print(f"\nCPU over the run, % of one core: proxy {100 * soak.samples[-1]['cpu_ticks'] / os.sysconf('SC_CLK_TCK') / total_s:.0f} "
          f"(incl. start-up), sims {100 * extra['sims_cpu_s'] / total_s:.0f}, client "
          f"{100 * extra['client_cpu_s'] / total_s:.0f}; load average now {os.getloadavg()[0]:.2f}")
    for line in lines + ledger_lines:
        print(line)
    if stored is not None:  # shutdown booked nothing twice and lost nothing already counted
        same = {t: v[:2] for t, v in stored.items()} == {t: v[:2] for t, v in api_usage.items()}
        ok &= same
        print(f"{'PASS' if same else 'FAIL'}  ledger read from the store after shutdown: "
              f"{'the same' if same else 'NOT the same'} requests and tokens per tenant as the API")
    ok &= ledger_ok and log_errors == 0
    print(f"{'PASS' if log_errors == 0 else 'FAIL'}  proxy log: {log_errors} error/traceback lines")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json), "ledger": ledger},
                                         "bins": [b.row() for b in [*soak.bins, soak.drain]],
                                         "samples": soak.samples, "summary": lines + ledger_lines,
                                         "extra": extra, "expected_ledger": soak.expected}, indent=1))
    print(f"logs in {tmp}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
