"""Ledger benchmark: write throughput per store, and flush lag inside a proxy under c=32.

    python -m bench.ledger [--records 100000] [--redis redis://127.0.0.1:6379/0] [--duration-s 8]
                           [--postgres postgresql://USER@HOST/DB]
    python -m bench.ledger --usage-scaling [--repeat 200]

Part 1 records N records into each store (memory, SQLite, Redis, PostgreSQL) and times
`record()` and one `flush()`. Part 2 runs `joulegate serve` with a SQLite, a Redis and then a
PostgreSQL ledger in front of the raw mock backend, loads it with wrk at c=32 (non-streamed), and samples
`joulegate_ledger_flush_lag_seconds` and `joulegate_ledger_buffered_records` from /metrics.

`--usage-scaling` instead starts a redis-server of its own on a free port, writes 1 week and
1 year of synthetic hours (12 cells an hour: 3 tenants x 2 models x 2 backends) under two key
prefixes, and times, for each, a one-day `usage()` query (what `joulegate usage` and
`/v1/energy/usage` run), a day-budget hold (`reserve` + `release`, the per-request budget
path) and, for reference, the HGETALL of a tenant's whole spend hash that budget reads did
before. It prints the medians and the year/week ratio: ~1 means the cost does not grow with
the data kept.

PostgreSQL: `--postgres URL` (default $DATABASE_URL; a role allowed CREATE DATABASE: the rows
use a fresh database each, dropped afterwards), else a private cluster started here on a free
port with fsync on (tests/postgres_support.py; as root it runs as the `postgres` OS user).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import redis

from bench.overhead import (
    HOST,
    Server,
    free_port,
    joulegate_argv,
    models_ready,
    run_wrk,
    tcp_ready,
    wait_until,
    write_config,
)
from proxy.ledger import LedgerRecord, open_ledger
from tests.postgres_support import PostgresCluster, create_database, drop_database


def _records(n: int) -> list[LedgerRecord]:
    now_s = time.time()
    return [LedgerRecord(f"r-{uuid.uuid4().hex}", f"t{i % 5}", f"m{i % 3}", f"b{i % 4}", 512, 128,
                         12.345678 + i * 1e-3, "measured", now_s - 2 - (i % 7200), now_s - (i % 7200))
            for i in range(n)]


async def _throughput(url: str, n: int, **opts: object) -> dict[str, float]:
    ledger = open_ledger(url, flush_interval_s=3600, max_buffer=10 * n, **opts)
    await ledger.start()
    records = _records(n)
    t0 = time.perf_counter()
    for rec in records:
        ledger.record(rec)
    record_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    written = await ledger.flush()
    flush_s = time.perf_counter() - t0
    await ledger.close()
    assert written == n, (url, written)
    return {"record_us": record_s / n * 1e6, "flush_records_per_s": n / flush_s}


def _drop_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=prefix + "*", count=5000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i:i + 1000])


def _lag_under_load(ledger: str, duration_s: int, tmp: Path) -> dict[str, float]:
    """Flush lag and buffered records sampled from /metrics while wrk drives c=32."""
    mock_port, port = free_port(), free_port()
    mock = Server("mock", [sys.executable, "-m", "bench.mock_backend", "--port", str(mock_port)], mock_port, tmp)
    proxy = Server("joulegate", joulegate_argv(None, write_config(tmp, port, mock_port, ledger), port), port, tmp)
    lags_s: list[float] = []
    buffered: list[float] = []
    try:
        mock.start()
        wait_until(mock, tcp_ready(mock_port), 30)
        proxy.start()
        wait_until(proxy, models_ready(port, "/healthz"), 30)
        done = threading.Event()

        def sample() -> None:
            with httpx.Client(base_url=f"http://{HOST}:{port}", timeout=2) as client:
                while not done.is_set():
                    text = client.get("/metrics").text
                    for name, into in (("joulegate_ledger_flush_lag_seconds", lags_s),
                                       ("joulegate_ledger_buffered_records", buffered)):
                        match = re.search(rf"^{name} (\S+)$", text, re.M)
                        if match:
                            into.append(float(match.group(1)))
                    done.wait(0.2)

        sampler = threading.Thread(target=sample)
        sampler.start()
        result = run_wrk(port, "json", 32, duration_s, True)
        # The gauges refresh once a second: keep sampling through one more refresh.
        time.sleep(1.2)
        done.set()
        sampler.join()
    finally:
        proxy.stop()
        mock.stop()
    return {"req_per_s": result["rps"], "flush_lag_max_s": max(lags_s, default=0.0),
            "flush_lag_median_s": statistics.median(lags_s) if lags_s else 0.0,
            "buffered_max": max(buffered, default=0.0)}


_HOUR_S = 3600
_DAY_S = 86_400


def _history(end_hour_s: int, days: int) -> list[LedgerRecord]:
    """One record per tenant x model x backend for each hour of `days` days before end_hour_s."""
    out = []
    for hour_s in range(end_hour_s - days * _DAY_S, end_hour_s, _HOUR_S):
        for i in range(12):
            end_s = hour_s + 60 + i
            out.append(LedgerRecord(f"h{hour_s}-{i}", f"t{i % 3}", f"m{i % 2}", f"b{i // 6}", 500, 100,
                                    10.0 + i, "measured", end_s - 1, end_s))
    return out


async def _usage_scaling(url: str, repeat: int, end_hour_s: int) -> dict[int, dict[str, float]]:
    """Write 7 and 365 days of hours under two prefixes, then time the reads of both in
    alternation (so drift on a shared machine hits both alike); medians in ms by days."""
    ledgers = {days: open_ledger(url, key_prefix=f"jg-bench-{days}d:", flush_interval_s=3600,
                                 max_buffer=10**7, chunk_size=2000, retention_s=400 * _DAY_S)
               for days in (7, 365)}
    client = redis.asyncio.Redis.from_url(url)
    times: dict[int, dict[str, list[float]]] = {d: {"usage_ms": [], "hold_ms": [], "hgetall_ms": []}
                                                for d in ledgers}
    try:
        for days, ledger in ledgers.items():
            await ledger.start()
            for rec in _history(end_hour_s, days):
                ledger.record(rec)
            await ledger.flush()
        since_s, until_s = end_hour_s - _DAY_S, end_hour_s
        for i in range(repeat):
            # Alternate which goes first, so neither always follows the other's garbage.
            for days, ledger in sorted(ledgers.items(), reverse=bool(i % 2)):
                t = times[days]
                t0 = time.perf_counter()
                rows = await ledger.usage(tenant="t0", since_s=since_s, until_s=until_s, group_by=("model",))
                t["usage_ms"].append((time.perf_counter() - t0) * 1e3)
                assert sum(r.requests for r in rows) == 24 * 4, rows
                t0 = time.perf_counter()
                await ledger.reserve("t0", f"bench-{i}", 1, since_s, 10**15, 60.0)
                await ledger.release("t0", f"bench-{i}")
                t["hold_ms"].append((time.perf_counter() - t0) * 1e3)
        for _ in range(repeat):  # apart: a year's reply is garbage the other reads would pay for
            for days in ledgers:
                t0 = time.perf_counter()
                await client.hgetall(f"jg-bench-{days}d:tj:t0")
                times[days]["hgetall_ms"].append((time.perf_counter() - t0) * 1e3)
    finally:
        await client.aclose()
        for ledger in ledgers.values():
            await ledger.close()
    return {days: {k: statistics.median(v) for k, v in t.items()} for days, t in times.items()}


def usage_scaling(repeat: int) -> int:
    """The --usage-scaling mode: a Redis of our own, 1 week vs 1 year of hours."""
    if shutil.which("redis-server") is None:
        print("--usage-scaling needs redis-server on PATH", file=sys.stderr)
        return 2
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="jg-bench-usage-"))
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", HOST, "--save", "",
                               "--appendonly", "no", "--dir", str(tmp)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://{HOST}:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        end_hour_s = int(time.time()) // _HOUR_S * _HOUR_S
        print(f"one-day reads on Redis (median of {repeat}), 12 cells an hour:")
        results = asyncio.run(_usage_scaling(url, repeat, end_hour_s))
        for days, name in ((7, "1 week"), (365, "1 year")):
            r = results[days]
            print(f"  {name:7s} usage(1 day): {r['usage_ms']:.3f} ms   budget hold+release: {r['hold_ms']:.3f} ms"
                  f"   HGETALL tj (old budget read): {r['hgetall_ms']:.3f} ms")
        week, year = results[7], results[365]
        print(f"  ratio year/week: usage {year['usage_ms'] / week['usage_ms']:.2f}   hold "
              f"{year['hold_ms'] / week['hold_ms']:.2f}   old HGETALL {year['hgetall_ms'] / week['hgetall_ms']:.2f}")
    finally:
        server.kill()
        server.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ledger", description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="a Redis for the redis rows")
    ap.add_argument("--postgres", default=os.environ.get("DATABASE_URL"),
                    help="a PostgreSQL for the postgres rows (default $DATABASE_URL, else one started here)")
    ap.add_argument("--duration-s", type=int, default=8, help="wrk seconds per store under load")
    ap.add_argument("--usage-scaling", action="store_true",
                    help="only time one-day reads after 1 week vs 1 year of hours, on a Redis of its own")
    ap.add_argument("--repeat", type=int, default=200, help="timed reads per history (--usage-scaling)")
    args = ap.parse_args(argv)
    if args.usage_scaling:
        return usage_scaling(args.repeat)
    cluster = None
    if args.postgres is None:
        cluster = PostgresCluster(durable=True)
        cluster.start()
        args.postgres = cluster.url
    try:
        return _compare(args)
    finally:
        if cluster is not None:
            cluster.stop()


def _compare(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="jg-bench-ledger-"))
    prefix = f"jg-bench-{uuid.uuid4().hex}:"
    pg_write, pg_lag = create_database(args.postgres), create_database(args.postgres)
    print(f"write throughput, {args.records:,} records, one flush:")
    try:
        for name, url, opts in (
            ("memory", "memory://", {}),
            ("sqlite", f"sqlite:///{tmp}/bench.db", {}),
            ("redis", args.redis, {"key_prefix": prefix, "journal_path": str(tmp / "journal.sqlite")}),
            ("postgres", pg_write, {"journal_path": str(tmp / "pg-journal.sqlite")}),
        ):
            r = asyncio.run(_throughput(url, args.records, **opts))
            print(f"  {name:8s} record(): {r['record_us']:.2f} us/record   flush: {r['flush_records_per_s']:,.0f} records/s")
        print("\nflush lag inside joulegate under wrk c=32 (non-streamed), from /metrics every 0.2 s:")
        db_url = re.sub(r"/\d+$", "", args.redis) + "/13"
        for name, url in (("sqlite", f"sqlite:///{tmp}/proxy.db"), ("redis", db_url), ("postgres", pg_lag)):
            r = _lag_under_load(url, args.duration_s, tmp)
            print(f"  {name:8s} {r['req_per_s']:,.0f} req/s   flush lag median {r['flush_lag_median_s']:.2f} s, "
                  f"max {r['flush_lag_max_s']:.2f} s   buffered max {r['buffered_max']:,.0f}")
        redis.Redis.from_url(db_url).flushdb()
    finally:
        _drop_prefix(args.redis, prefix)
        drop_database(args.postgres, pg_write)
        drop_database(args.postgres, pg_lag)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
