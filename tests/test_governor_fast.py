"""The fast raise (proxy/governor/fast.py): deeper caps chosen with the fast knobs, and a queue
forming under a cap raises it at once between two decisions, in the pure advice, the simulator's
governor (virtual time) and the live governor against the simulator backend's agent API; in
advise mode nothing changes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import tests.conftest as c
from policies.model import EfficiencyModel
from proxy.backends import BackendPool
from proxy.config import parse_config
from proxy.governor.actuate import Governor
from proxy.governor.burst import at_now
from proxy.governor.decide import BackendInput, GovernorParams, decide_cap
from proxy.governor.fast import FAST_RAISE, fast_raise_advice, queue_reason
from proxy.metrics import Metrics
from proxy.sim.fleet import parse_fleet, simulate
from proxy.sim.traces import TraceRequest

PARAMS = GovernorParams(slo_ttft_s=2.0, slo_tpot_s=0.2, fast=True)


def capped(cap_w: float = 300.0, in_flight: int = 1, waiting: int = 0, oldest_wait_s: float = 0.0) -> BackendInput:
    decided = BackendInput(name="h100", model=EfficiencyModel(), in_flight=1, arrival_rate_per_s=0.5,
                           mean_request_s=2.0, gpus=1, min_w=200.0, max_w=700.0, cap_w=cap_w)
    return at_now(decided, in_flight, waiting, oldest_wait_s)


def test_a_first_token_wait_raises_to_the_safe_cap_then_to_the_maximum() -> None:
    wait_s = PARAMS.fast_wait_share * PARAMS.slo_ttft_s
    assert queue_reason(capped(waiting=1, oldest_wait_s=0.9 * wait_s), PARAMS) is None
    queued = capped(waiting=3, oldest_wait_s=wait_s + 0.05)
    first = fast_raise_advice(queued, PARAMS, safe_cap_w=450.0, now_s=10.0, last_raise_s=None)
    assert first is not None and (first.previous_cap_w, first.cap_w) == (300.0, 450.0)
    assert "awaited its first token" in first.reason
    at_safe = capped(cap_w=450.0, waiting=3, oldest_wait_s=wait_s + 0.2)
    # Still queued at the safe cap: the maximum, but not before the last raise had time to act.
    assert fast_raise_advice(at_safe, PARAMS, 450.0, 10.0 + PARAMS.fast_dwell_s / 2, last_raise_s=10.0) is None
    second = fast_raise_advice(at_safe, PARAMS, 450.0, 10.0 + PARAMS.fast_dwell_s, last_raise_s=10.0)
    assert second is not None and second.cap_w == 700.0
    # Nothing above the maximum, and nothing for a backend whose decision named no safe cap.
    assert fast_raise_advice(capped(cap_w=700.0, waiting=3, oldest_wait_s=1.0), PARAMS, 450.0, 20.0, None) is None
    assert fast_raise_advice(queued, PARAMS, None, 20.0, None) is None


def test_a_batch_past_the_tpot_the_model_predicts_raises_too() -> None:
    model = EfficiencyModel()
    crowded = next(n for n in range(1, 4096) if model.tpot_upper_s(n) > PARAMS.fast_tpot_share * PARAMS.slo_tpot_s)
    assert queue_reason(capped(in_flight=crowded - 1), PARAMS) is None
    why = queue_reason(capped(in_flight=crowded), PARAMS)
    assert why is not None and "TPOT" in why


def test_with_the_fast_raise_the_decision_caps_deeper_and_names_a_safe_cap() -> None:
    b = BackendInput(name="h100", model=EfficiencyModel(), in_flight=4, arrival_rate_per_s=2.0, mean_request_s=4.0,
                     gpus=1, min_w=200.0, max_w=700.0, cap_w=700.0)
    slow = decide_cap(b, GovernorParams(max_step_w=1000.0), 100.0)
    fast = decide_cap(b, GovernorParams(fast=True, max_step_w=1000.0, fast_max_step_w=1000.0), 100.0)
    assert slow.safe_cap_w is None
    assert fast.cap_w <= slow.cap_w and fast.safe_cap_w is not None
    assert fast.safe_cap_w == pytest.approx(slow.cap_w)  # the conservative knobs' choice


def _burst_trace() -> list[TraceRequest]:
    # One request every 2 s lets the governor cap the lone H100 deeply; 120 long prompts at 40.5 s
    # queue for their first token under that cap.
    trace = [TraceRequest(float(t), 200, 50) for t in range(0, 60, 2)] + [TraceRequest(40.5, 3000, 200)] * 120
    return sorted(trace, key=lambda r: r.arrival_s)


def test_a_queue_on_a_deeply_capped_simulated_backend_raises_its_cap_within_the_wait_limit() -> None:
    fleet = parse_fleet({"backends": [{"name": "h100", "profile": "h100-llama3.1-8b"}]})
    r = simulate(fleet, _burst_trace(), "efficiency+governor", park=False, fast_raise=True)
    assert r.governor is not None
    gov = r.governor["h100"]
    assert all(t_s >= 40.5 for t_s, _, _ in gov["fast_raised"])  # no queue before the burst
    assert gov["fast_raised"], "no fast raise after the burst"
    t_s, from_w, to_w = gov["fast_raised"][0]
    assert from_w < 500.0, "the governor did not cap the lightly loaded H100 deeply"
    # The first request of the burst waits `fast_wait_share` of the TTFT SLO, then the next
    # 100 ms sample raises the cap (a step under way may finish first).
    assert t_s <= 40.5 + PARAMS.fast_wait_share * PARAMS.slo_ttft_s + 0.3 and to_w > from_w
    # Without it (the default) the cap stays until the decision at 45 s.
    slow = simulate(fleet, _burst_trace(), "efficiency+governor", park=False)
    assert slow.governor is not None and slow.governor["h100"]["fast_raises"] == 0


# -- live, against the simulator backend's agent API -------------------------------------------


def _live(sim: c.SimBackend, mode: str) -> tuple[Governor, Any]:
    power = f"power: {{source: sim, url: '{sim.url}'}}"
    config = parse_config(f"backends:\n  - {{name: h100, url: '{sim.url}/v1', models: [m], {power}}}\n"
                          f"governor: {{mode: {mode}, interval_s: 3600, fast_raise: true}}\n")
    pool = BackendPool(config)
    return Governor(config, pool, Metrics()), pool.backends[0]


def _limit_w(sim: c.SimBackend) -> float:
    return float(httpx.get(f"{sim.url}/v1/power/limits", timeout=5).json()["gpus"][0]["power_limit_w"])


def _queue(backend: Any, waited_s: float, n: int = 3) -> None:
    """`n` requests in flight on `backend`, awaiting their first token for `waited_s` s."""
    backend.in_flight = n
    for _ in range(n):
        backend.efficiency.sent(time.time() - waited_s)


Body = Callable[[Governor, Any, c.SimBackend, float, float], Awaitable[None]]


def _run_live(tmp_path: Path, mode: str, body: Body) -> None:
    """A sim backend governed in `mode` with one decision taken at light load, then `body(gov,
    backend, sim, board_w, cap_w)` while the governor's own loop runs; everything stopped after."""
    sim = c.SimBackend("h100-llama3.1-8b", tmp_path)
    try:
        board_w = _limit_w(sim)

        async def go() -> None:
            gov, backend = _live(sim, mode)
            try:
                await gov.start()
                backend.in_flight = 1  # one request, none queued
                await gov.tick()
                d = gov.targets[0].decision
                assert d is not None and d.safe_cap_w is not None and d.cap_w < board_w, "no cap at light load"
                await body(gov, backend, sim, board_w, d.cap_w)
            finally:
                backend.in_flight = 0
                await gov.close()

        asyncio.run(asyncio.wait_for(go(), 30))
        assert _limit_w(sim) == board_w  # put back on close (apply), never changed (advise)
    finally:
        sim.stop()


async def _until(done: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    """Wait for `done()` (the governor's own loop watches every WATCH_S), failing after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline_s = loop.time() + timeout_s
    while not done():
        assert loop.time() < deadline_s, f"no {what} within {timeout_s} s"
        await asyncio.sleep(0.02)


def test_live_apply_a_queue_raises_the_sims_cap_within_a_bounded_time(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    async def body(gov: Governor, backend: Any, sim: c.SimBackend, board_w: float, cap_w: float) -> None:
        assert _limit_w(sim) == cap_w, "the decision's cap was not set"
        assert await gov.raise_fast() == []  # no queue, no raise
        _queue(backend, waited_s=1.0)
        await _until(lambda: _limit_w(sim) > cap_w, "fast raise")
        view = gov.view("h100")
        assert view is not None and view["fast_raises"] >= 1
        assert view["fast_raise"]["from_w"] == cap_w and "awaited its first token" in view["fast_raise"]["reason"]
        assert gov.targets[0].applied_w == _limit_w(sim)
        assert gov.metrics.governor_decisions.labels("h100", FAST_RAISE)._value.get() >= 1

    with caplog.at_level(logging.INFO, logger="joulegate.governor"):
        _run_live(tmp_path, "apply", body)
    raised = [r.getMessage() for r in caplog.records if "fast raise" in r.getMessage()]
    assert raised and "a queue forms" in raised[0] and "awaited its first token" in raised[0]


def test_live_advise_a_queue_changes_nothing_but_logs_the_advice(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    async def body(gov: Governor, backend: Any, sim: c.SimBackend, board_w: float, cap_w: float) -> None:
        _queue(backend, waited_s=1.0)
        await _until(lambda: bool((gov.view("h100") or {}).get("fast_raises")), "fast raise advice")
        view = gov.view("h100")
        assert view is not None and view["fast_raise"]["cap_w"] > cap_w and view["applied_cap_w"] is None
        assert view["cap_w"] == cap_w  # the decision's advice stands; the raise is advised on top
        assert _limit_w(sim) == board_w  # advice only

    with caplog.at_level(logging.INFO, logger="joulegate.governor"):
        _run_live(tmp_path, "advise", body)
    assert any("advise fast raise" in r.getMessage() for r in caplog.records)
