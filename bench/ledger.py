"""Ledger benchmark: write throughput per store, and flush lag inside a proxy under c=32.

    python -m bench.ledger [--records 100000] [--redis redis://127.0.0.1:6379/0] [--duration-s 8]

Part 1 records N records into each store (memory, SQLite, Redis) and times `record()` and one
`flush()`. Part 2 runs `joulegate serve` with a SQLite and then a Redis ledger in front of the
raw mock backend, loads it with wrk at c=32 (non-streamed), and samples
`joulegate_ledger_flush_lag_seconds` and `joulegate_ledger_buffered_records` from /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ledger", description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="a Redis for the redis rows")
    ap.add_argument("--duration-s", type=int, default=8, help="wrk seconds per store under load")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="jg-bench-ledger-"))
    prefix = f"jg-bench-{uuid.uuid4().hex}:"
    print(f"write throughput, {args.records:,} records, one flush:")
    try:
        for name, url, opts in (
            ("memory", "memory://", {}),
            ("sqlite", f"sqlite:///{tmp}/bench.db", {}),
            ("redis", args.redis, {"key_prefix": prefix, "journal_path": str(tmp / "journal.sqlite")}),
        ):
            r = asyncio.run(_throughput(url, args.records, **opts))
            print(f"  {name:7s} record(): {r['record_us']:.2f} us/record   flush: {r['flush_records_per_s']:,.0f} records/s")
    finally:
        _drop_prefix(args.redis, prefix)
    print("\nflush lag inside joulegate under wrk c=32 (non-streamed), from /metrics every 0.2 s:")
    db_url = re.sub(r"/\d+$", "", args.redis) + "/13"
    for name, url in (("sqlite", f"sqlite:///{tmp}/proxy.db"), ("redis", db_url)):
        r = _lag_under_load(url, args.duration_s, tmp)
        print(f"  {name:7s} {r['req_per_s']:,.0f} req/s   flush lag median {r['flush_lag_median_s']:.2f} s, "
              f"max {r['flush_lag_max_s']:.2f} s   buffered max {r['buffered_max']:,.0f}")
    redis.Redis.from_url(db_url).flushdb()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
