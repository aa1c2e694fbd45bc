"""Scenario 5: the ledger's Redis gone for 10 s and back, under streamed load.

The accounting tests cover this for non-streamed requests; here every request is a stream. The
proxy must go on serving while Redis is away (records wait in memory or in the spill journal),
and once Redis is back every answered request is in it exactly once, with the tokens the client
received.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ProxyProc, SimBackend, wait_until
from tests.faults.conftest import Figures
from tests.faults.ledgers import flush_ledger, redis_ledger
from tests.faults.load import StreamLoad, proxy_yaml, tally
from tests.redis_support import RedisServer, need_redis_server

OUTAGE_S = 10.0  # how long Redis is gone: the scenario's design
TIMEOUT_S = 10.0
DEADLINE_S = TIMEOUT_S + 10.0  # the proxy's deadline plus a margin for a loaded 2-core machine
CONCURRENCY = 8


def _caught_up(proxy: ProxyProc, n: int) -> bool:
    """The ledger answers usage again and counts `n` requests."""
    try:
        return flush_ledger(proxy)["requests"] == n
    except AssertionError:  # 503 ledger_unavailable while it reconnects
        return False


def _held_back(proxy: ProxyProc) -> float:
    """Records the ledger holds and has not written (`joulegate_ledger_buffered_records`)."""
    text = httpx.get(proxy.url + "/metrics", timeout=5).text
    return max(float(v) for v in re.findall(r"^joulegate_ledger_buffered_records(?:{[^}]*})? (\S+)$", text, re.M))


def test_redis_outage_under_streamed_load(h100: SimBackend, tmp_path: Path, figures: Figures,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    figures.scenario = "redis_outage"
    need_redis_server("no redis-server to start and stop")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the ledger's spill journal stays ours
    server = RedisServer(tmp_path, persist=True)  # AOF, fsync always: what was written survives
    server.start()
    power = f", power: {{source: sim, url: '{h100.url}', interval_s: 0.05}}"
    proxy = ProxyProc(proxy_yaml([("h100", h100.url, power)],
                                 f"request_timeout_s: {TIMEOUT_S}, health_interval_s: 0.2", server.url), tmp_path)
    outage: dict[str, float] = {}

    async def script(load: StreamLoad) -> None:
        await load.until(16)
        await asyncio.to_thread(server.kill)
        outage["down"] = time.monotonic()
        await asyncio.sleep(OUTAGE_S)  # the outage itself, not a wait for something to happen
        outage["held_back"] = await asyncio.to_thread(_held_back, proxy)
        await asyncio.to_thread(server.start)
        outage["up"] = time.monotonic()
        await load.until(len(load.outcomes) + 16)

    try:
        outcomes = StreamLoad(proxy, "redis", CONCURRENCY, DEADLINE_S, lambda i: 8 + i % 17).run(script)
        tally(figures, outcomes)
        assert all(o.result == "ok" for o in outcomes), [o for o in outcomes if o.result != "ok"]
        during = [o for o in outcomes if outage["down"] < o.start_s and o.start_s + o.elapsed_s < outage["up"]]
        assert len(during) >= 16, f"only {len(during)} streams were served while Redis was gone"
        assert outage["held_back"] > 0, "the ledger did not notice the outage"

        answered = {o.request_id: o for o in outcomes if o.backend is not None}
        wait_until(lambda: _caught_up(proxy, len(answered)), 30, "the ledger to catch up after Redis came back")
        booked = redis_ledger(server.url)
        figures.ledger = sum(rid in booked for rid in answered)
        assert set(booked) == set(answered), set(booked) ^ set(answered)
        for rid, o in answered.items():
            assert booked[rid].completion_tokens == o.tokens and booked[rid].backend == "h100", (o, booked[rid])
        print(f"\nRedis gone {OUTAGE_S:.0f} s: {len(outcomes)} streams, {len(during)} served during the outage, "
              f"{outage['held_back']:.0f} ledger records held back at its end")
        figures.check()
    finally:
        proxy.stop()
        server.kill()
    assert "Traceback" not in proxy.log(), proxy.log()[-3000:]
