"""Several `joulegate serve` replicas sharing one Redis, in front of the raw mock backend.

    python -m bench.replicas [--replicas 3] [--duration-s 8] [--redis redis://127.0.0.1:6379/12]

A sanity check, not a scaling claim: on a 2-core machine the replicas, the mock and wrk share
the same cores. Every replica uses the Redis ledger and the cluster weight exchange, with its
energy meter fed by one simulator's power API (as `bench/overhead --energy`). wrk drives each
replica at an equal share of c=32 at once; the table gives total req/s against one replica.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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

TOTAL_CONNS = 32


def _run(replicas: int, duration_s: int, redis_url: str, tmp: Path) -> tuple[float, float]:
    """Total req/s and the worst replica's p99 (ms) with `replicas` proxies sharing Redis."""
    servers: list[Server] = []
    try:
        mock_port, power_port = free_port(), free_port()
        mock = Server("mock", [sys.executable, "-m", "bench.mock_backend", "--port", str(mock_port)], mock_port, tmp)
        power = Server("power", [sys.executable, "-m", "proxy", "sim-backend", "--profile", "h100-llama3.1-8b",
                                 "--port", str(power_port)], power_port, tmp)
        for server in (mock, power):
            servers.append(server)
            server.start()
            wait_until(server, tcp_ready(server.port), 30)
        ports = [free_port() for _ in range(replicas)]
        for i, port in enumerate(ports):
            sub = tmp / f"replica-{replicas}-{i}"
            sub.mkdir(exist_ok=True)
            config = write_config(sub, port, mock_port, redis_url, f"http://{HOST}:{power_port}")
            server = Server(f"joulegate-{replicas}-{i}", joulegate_argv(None, config, port), port, tmp)
            servers.append(server)
            server.start()
        for server in servers[2:]:
            wait_until(server, models_ready(server.port, "/healthz"), 30)
        conns = max(1, TOTAL_CONNS // replicas)
        for port in ports:  # warm-up
            run_wrk(port, "json", conns, 1, True)
        with ThreadPoolExecutor(replicas) as pool:
            results = list(pool.map(lambda p: run_wrk(p, "json", conns, duration_s, True), ports))
        return sum(r["rps"] for r in results), max(r["p99_us"] for r in results) / 1e3
    finally:
        for server in reversed(servers):
            server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--duration-s", type=int, default=8)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/12", help="a Redis database to use (flushed)")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="jg-bench-replicas-"))
    client = redis.Redis.from_url(args.redis)
    rows = []
    try:
        for n in (1, args.replicas):
            client.flushdb()
            rps, p99_ms = _run(n, args.duration_s, args.redis, tmp)
            rows.append((n, rps, p99_ms))
    finally:
        client.flushdb()
    print(f"non-streamed, wrk -t1 per replica, c={TOTAL_CONNS} in total; logs in {tmp}")
    print(f"{'replicas':>8} {'req/s total':>12} {'worst p99 ms':>13}")
    for n, rps, p99_ms in rows:
        print(f"{n:>8} {rps:>12,.0f} {p99_ms:>13.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
