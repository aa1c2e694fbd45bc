"""Scenario 1: SIGKILL one of three simulated backends under c=32 streamed load, then restart it.

What a user checks:
- no request hangs: each returns within request_timeout_s plus a margin;
- the streams that were running on the killed backend end with an SSE error event (the SDK
  raises APIError with an OpenAI-shaped body); everything else succeeds, also the requests that
  picked the dead backend after the kill (refused before a byte reached the client: failover);
- requests refused with a 4xx before reaching a backend are in the ledger nowhere;
- the ledger (SQLite, read after the proxy exited) holds exactly the answered requests, each once,
  with the tokens the client received;
- the backend restarted on its port (energy counter back to zero) gets traffic again, and its
  requests get measured, positive joules that track the simulator's ground truth.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN_KEY, MODEL, ProxyProc, wait_until
from tests.faults.conftest import Figures
from tests.faults.ledgers import sqlite_ledger
from tests.faults.load import StreamLoad, proxy_yaml, tally
from tests.faults.servers import RestartableSim

TIMEOUT_S = 6.0
DEADLINE_S = TIMEOUT_S + 8.0  # the proxy's deadline plus a margin for a loaded 2-core machine
CONCURRENCY = 32
BEFORE, AFTER = 48, 64  # requests finished before the kill, and after it, before the load stops
NAMES = ("a", "b", "victim")


def _backends(proxy: ProxyProc) -> dict[str, dict]:
    resp = httpx.get(proxy.url + "/v1/energy/backends", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                     timeout=5)
    return {b["name"]: b for b in resp.json()["data"]}


def _final(proxy: ProxyProc, request_id: str) -> dict | None:
    """The request's attribution once it is `measured`, else None."""
    resp = httpx.get(f"{proxy.url}/v1/energy/requests/{request_id}",
                     headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=5)
    return resp.json() if resp.status_code == 200 and resp.json()["method"] == "measured" else None


def test_backend_sigkilled_under_streamed_load(tmp_path: Path, figures: Figures) -> None:
    figures.scenario = "backend_sigkill"
    sims = {name: RestartableSim("h100-llama3.1-8b", tmp_path, seed=30 + i) for i, name in enumerate(NAMES)}
    victim = sims["victim"]
    db = tmp_path / "ledger.db"
    power = ", power: {{source: sim, url: '{}', interval_s: 0.05}}"
    # A short cooldown, so the restarted backend is tried again soon after it answers its health check.
    config = proxy_yaml([(n, s.url, power.format(s.url)) for n, s in sims.items()],
                        f"request_timeout_s: {TIMEOUT_S}, health_interval_s: 0.2, circuit_cooldown_s: 1",
                        f"sqlite:///{db}")
    proxy = ProxyProc(config, tmp_path)
    killed_at: dict[str, float] = {}

    def kill_while_busy() -> None:
        # While it is generating for several streams (its own gauge: the proxy's in-flight count
        # includes streams the backend has finished sending), in one thread so nothing comes
        # between the reading and the signal.
        wait_until(lambda: victim.running() >= 4, 20, "streams running on the victim")
        victim.kill()

    async def script(load: StreamLoad) -> None:
        await load.until(BEFORE)
        killed_at["start"] = time.monotonic()
        await asyncio.to_thread(kill_while_busy)
        killed_at["done"] = time.monotonic()
        await load.until(len(load.outcomes) + AFTER)

    # One request in 16 names a model nobody serves: 404 before any backend.
    load = StreamLoad(proxy, "kill", CONCURRENCY, DEADLINE_S, lambda i: 32 + i % 33,
                      lambda i: "no-such-model" if i % 16 == 5 else MODEL)
    try:
        outcomes = load.run(script)
        refused_ids = {o.request_id for o in outcomes if int(o.request_id.rsplit("-", 1)[1]) % 16 == 5}
        tally(figures, outcomes)
        for o in outcomes:
            assert o.result not in ("hung", "unclean"), o
            assert o.elapsed_s < DEADLINE_S, o
        refused = [o for o in outcomes if o.request_id in refused_ids]
        assert refused and all(o.detail == "404 model_not_found" and o.backend is None for o in refused)
        failed = [o for o in outcomes if o.result == "clean" and o.request_id not in refused_ids]
        # Only streams running on the victim at the kill failed, each with an error event.
        assert failed, "no stream was cut by the kill"
        assert all(o.backend == "victim" and o.detail == "stream error upstream_error" for o in failed), failed
        assert all(o.start_s < killed_at["done"] for o in failed), failed
        # Sent after the kill: all answered by the survivors (a pick of the dead one is refused
        # there before any byte reaches the client, and fails over).
        after = [o for o in outcomes if o.start_s > killed_at["done"] and o.request_id not in refused_ids]
        assert after and all(o.result == "ok" and o.backend in ("a", "b") for o in after), after

        # Restarted on its port: traffic returns to it and its energy is measured again.
        victim.restart()
        wait_until(lambda: (_backends(proxy)["victim"]["healthy"]
                            and _backends(proxy)["victim"]["power_source_healthy"] is True),
                   30, "the restarted backend and its power source to be back")

        resumed = StreamLoad(proxy, "resume", 3, DEADLINE_S, lambda i: 24).run(lambda load: load.until(9))
        tally(figures, resumed)
        assert all(o.result == "ok" for o in resumed), resumed
        again = [o.request_id for o in resumed if o.backend == "victim"]
        assert again, "no request reached the restarted backend"
        measured: dict[str, dict] = {}

        def all_measured() -> bool:
            for rid in again:
                final = measured.get(rid) or _final(proxy, rid)
                if final is not None:
                    measured[rid] = final
            return len(measured) == len(again)

        wait_until(all_measured, 30, "the restarted backend's requests to be measured")
        truth_j = sum(victim.truth(r)["joules"] for r in again)
        mine_j = sum(measured[r]["joules"] for r in again)
        print(f"\nrestarted backend: {len(again)} requests, {mine_j:.2f} J attributed, {truth_j:.2f} J true")
        assert all(measured[r]["joules"] > 0 for r in again), measured
        # The counter restarted from zero: the joules must neither vanish nor jump.
        assert mine_j == pytest.approx(truth_j, rel=0.25), (mine_j, truth_j)
    finally:
        proxy.stop()
        for sim in sims.values():
            sim.stop()
    log = proxy.log()
    assert "Traceback" not in log, log[-3000:]

    # After the proxy exited (everything still waiting for a measurement was booked at shutdown).
    booked = sqlite_ledger(db)
    everything = outcomes + resumed
    figures.ledger = sum(o.request_id in booked for o in everything)
    answered = {o.request_id: o for o in everything if o.backend is not None}
    assert set(booked) == set(answered), (set(booked) ^ set(answered))
    for rid, o in answered.items():
        assert booked[rid].backend == o.backend and booked[rid].completion_tokens == o.tokens, (o, booked[rid])
    figures.check()
