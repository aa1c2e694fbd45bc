"""The attainment target (proxy/governor/clock.py): a fleet clock set from measured latency, in
the pure feedback, the model's SLO tally, the decisions, the simulator's governor (virtual
time) and the live governor against the simulator backend's agent API."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from pathlib import Path

import pytest

import tests.conftest as c
from policies.model import EfficiencyModel
from proxy.backends import BackendPool
from proxy.config import parse_config
from proxy.governor.actuate import Governor
from proxy.governor.capmodel import capped
from proxy.governor.clock import ClockParams, FleetClock, cap_for_clock_w, next_clock
from proxy.governor.decide import LOWER, BackendInput, GovernorParams, decide
from proxy.metrics import Metrics
from proxy.sim.fleet import parse_fleet, simulate
from proxy.sim.traces import synth_trace

P = ClockParams(target=0.95)


def ratios(met: int, missed: int, met_ratio: float = 0.5, missed_ratio: float = 1.5) -> list[float]:
    return [met_ratio] * met + [missed_ratio] * missed


# -- the feedback ---------------------------------------------------------------------------------


def test_the_clock_falls_while_the_target_quantile_stays_under_the_setpoint() -> None:
    state = FleetClock()
    for _ in range(3):
        state = next_clock(state, ratios(100, 0), P)
    assert state.clock == pytest.approx(0.85 ** 3)  # at most 15% an interval
    assert state.quantile == 0.5 and state.floor == 0.0
    for _ in range(20):
        state = next_clock(state, ratios(100, 0), P)
    assert state.clock == P.lowest  # and never below the lowest


def test_a_missed_target_raises_the_clock_and_sets_a_floor_above_where_it_happened() -> None:
    state = FleetClock(clock=0.6)
    missed = next_clock(state, ratios(90, 10), P)  # 10% missed against a 95% target
    assert missed.quantile == 1.5 and missed.clock == pytest.approx(0.6 * 1.25)  # the largest rise
    assert missed.floor == pytest.approx(0.65)
    # The floor goes a step above the lowest of the last three intervals' clocks: the misses of a
    # queue's drain come after the clock has risen from where the queue formed.
    drained = next_clock(FleetClock(clock=0.8, before=(0.55, 0.7)), ratios(90, 10), P)
    assert drained.floor == pytest.approx(0.6) and drained.before == (0.7, 0.8)
    # Back on target, the clock falls again, but not below the floor, which decays slowly.
    fallen = next_clock(FleetClock(0.7, missed.floor), ratios(100, 0), P)
    assert fallen.clock == pytest.approx(0.64) and fallen.floor == pytest.approx(0.64)
    # Within the target but above the setpoint: it rises a little, the floor stays.
    near = next_clock(FleetClock(0.7, 0.6), ratios(96, 4, met_ratio=0.95), P)
    assert 0.7 < near.clock < 0.72 and near.floor == 0.6


def test_a_request_with_no_first_token_is_a_miss_and_too_few_requests_change_nothing() -> None:
    state = FleetClock(clock=0.8)
    few = next_clock(state, ratios(P.min_finished - 1, 0), P)
    assert (few.clock, few.floor, few.before) == (0.8, 0.0, (0.8,))  # the interval still counts as one
    lost = next_clock(state, [0.3] * 50 + [math.inf] * 5, P)
    assert lost.clock == pytest.approx(1.0) and lost.floor == pytest.approx(0.85)
    assert lost.judged == 55 and lost.pending == ()


def test_too_few_requests_wait_for_the_next_intervals_but_not_for_long() -> None:
    # Little traffic: 8 requests an interval. The clock moves at the third, on all 24.
    state = FleetClock(clock=0.8)
    for _ in range(2):
        state = next_clock(state, ratios(8, 0), P)
        assert state.clock == 0.8 and state.judged == 0
    assert [len(g) for g in state.pending] == [8, 8]
    state = next_clock(state, ratios(6, 2), P)  # 2 misses of 24: over 5%, so the clock rises
    assert state.clock == pytest.approx(0.8 * P.rise) and state.judged == 24 and state.pending == ()
    # Requests older than `carry_intervals` intervals are not judged: 4 a time never reach 20.
    for _ in range(2 * P.carry_intervals):
        state = next_clock(state, ratios(4, 0), P)
        assert state.judged == 24 and len(state.pending) <= P.carry_intervals
    assert state.clock == pytest.approx(0.8 * P.rise)


def test_a_saturated_fleet_holds_the_clock_before_any_latency_shows_a_queue() -> None:
    state = next_clock(FleetClock(clock=0.7), ratios(100, 0), P, saturated=True)
    # The queues' caps follow them between decisions (follow.py); the clock only stops falling,
    # and a moment's saturation is no measured miss: no floor.
    assert state.clock == pytest.approx(0.7) and state.floor == 0.0
    missed = next_clock(FleetClock(clock=0.7), ratios(90, 10), P, saturated=True)
    assert missed.clock == pytest.approx(0.875)  # a measured miss still raises it
    # Full at two decisions in a row: a backlog is building; the clock rises a little.
    again = next_clock(state, ratios(100, 0), P, saturated=True)
    assert state.saturated and again.clock == pytest.approx(0.7 * P.saturated_rise) and again.floor == 0.0
    assert not next_clock(again, ratios(100, 0), P).saturated


@pytest.mark.parametrize("clock", [0.55, 0.7, 0.9])
def test_the_clocks_cap_holds_a_fully_loaded_gpu_to_that_clock(clock: float) -> None:
    idle_w, board_w = 110.0, 700.0
    cap_w = cap_for_clock_w(clock, idle_w, 200.0, board_w)
    seconds, watts = capped(1.0, board_w, cap_w, idle_w, 1.0)  # compute-bound: time goes as 1 / clock
    assert watts == pytest.approx(cap_w) and 1.0 / seconds == pytest.approx(clock)
    assert cap_for_clock_w(0.3, idle_w, 200.0, board_w) == 200.0  # never below the minimum


# -- the model's tally ----------------------------------------------------------------------------


def test_the_model_tallies_each_streamed_requests_latency_over_the_slo() -> None:
    m = EfficiencyModel()
    t = m.sent(0.0)
    m.first_token(0.5, t)
    m.finished(2.5, t, 0.5, 11)
    assert m.slo_ratios == []  # no limits: nothing counted
    m.slo_limits_s = (1.0, 0.1)
    a = m.sent(0.0)
    m.first_token(0.5, a)
    m.finished(2.5, a, 0.5, 11)  # TTFT 0.5 of 1 s, TPOT 0.2 of 0.1 s
    b = m.sent(0.0)
    m.finished(1.0, b, None, 0)  # no first token
    m.finished(1.0, m.sent(0.0, stream=False), None, 5)  # non-streamed: no TTFT to judge
    assert m.slo_ratios == [pytest.approx(2.0), math.inf]


# -- decisions ------------------------------------------------------------------------------------


def _loaded(cap_w: float = 700.0, last_change_s: float | None = None) -> BackendInput:
    return BackendInput(name="h100", model=EfficiencyModel(), in_flight=4, arrival_rate_per_s=1.0,
                        mean_request_s=4.0, gpus=1, min_w=200.0, max_w=700.0, cap_w=cap_w,
                        last_change_s=last_change_s)


def test_a_decision_follows_the_clock_where_it_is_deeper_than_the_models_cap() -> None:
    params = GovernorParams(slo_target=0.95)
    b = _loaded()
    model_only = decide([b], params, 100.0)[0]
    clocked = decide([b], params, 100.0, clock=0.6)[0]
    expected_w = round(cap_for_clock_w(0.6, b.model.idle_w, 200.0, 700.0), 1)
    assert expected_w < model_only.cap_w
    assert clocked.action == LOWER and clocked.cap_w == expected_w and "fleet clock 0.60" in clocked.reason
    assert decide([b], params, 100.0, clock=1.0)[0] == model_only  # uncapped: the model decides alone
    held = decide([_loaded(last_change_s=95.0)], params, 100.0, clock=0.6)[0]
    assert held.cap_w == 700.0 and "changed 5.0 s ago" in held.reason
    assert decide([b], GovernorParams(), 100.0, clock=0.6)[0] == model_only  # no target: no clock


# -- virtual time ---------------------------------------------------------------------------------


def test_in_the_simulator_a_target_caps_deeper_and_keeps_the_attainment() -> None:
    fleet = parse_fleet({"backends": [{"name": "h100", "profile": "h100-llama3.1-8b", "count": 2},
                                      {"name": "a100", "profile": "a100-llama3.1-8b", "count": 2}]})
    trace = synth_trace(10.0, 150.0, seed=3)
    runs = {t: simulate(fleet, trace, "efficiency+governor", park=False, slo_target=t) for t in (None, 0.95)}
    base, target = runs[None], runs[0.95]
    assert base.governor is not None and target.governor is not None
    clocks = [ratio for _, ratio in target.governor["h100-0"]["fleet_clock"]]
    assert len(clocks) >= 8 and min(clocks) < 0.85
    assert "fleet_clock" not in base.governor["h100-0"]
    assert target.output_tokens / target.joules > 1.05 * base.output_tokens / base.joules
    assert target.slo_attainment >= 0.95


# -- live, against the simulator backend's agent API ------------------------------------------


def test_live_apply_the_clock_falls_on_fast_requests_and_rises_on_slow_ones(
        h100_sim: c.SimBackend, caplog: pytest.LogCaptureFixture) -> None:
    sim = h100_sim
    board_w = sim.limit_w()
    config, pool = sim.governed("{mode: apply, interval_s: 3600, slo_target: 0.95}")
    backend, model = pool.backends[0], pool.backends[0].efficiency

    def served(n: int, ttft_s: float) -> None:
        """`n` requests of 11 tokens, each with this TTFT and a 50 ms TPOT, just finished."""
        for _ in range(n):
            sent_s = time.time() - ttft_s - 0.5
            ticket = model.sent(sent_s)
            model.first_token(sent_s + ttft_s, ticket)
            model.finished(sent_s + ttft_s + 0.5, ticket, sent_s + ttft_s, 11)

    async def go() -> None:
        gov = Governor(config, pool, Metrics())
        assert model.slo_limits_s == (2.0, 0.2)
        try:
            await gov.start()
            backend.in_flight = 4  # busy enough that the model alone keeps the board limit
            await gov.tick()  # nothing finished yet: the clock stays
            assert gov.clock.clock == 1.0
            served(50, ttft_s=0.2)
            await gov.tick()
            view = gov.view("h100")
            assert view is not None and view["clock"]["ratio"] == pytest.approx(0.85)
            assert view["clock"]["latency_quantile"] == pytest.approx(0.25) and view["clock"]["slo_target"] == 0.95
            assert (view["clock"]["judged_requests"], view["clock"]["waiting_requests"]) == (50, 0)
            assert sim.limit_w() <= round(cap_for_clock_w(0.85, model.idle_w, 200.0, board_w), 1)
            assert gov.metrics.governor_clock._value.get() == pytest.approx(0.85)
            served(50, ttft_s=3.0)  # all over the TTFT SLO
            await gov.tick()
            assert gov.clock.clock == pytest.approx(1.0) and gov.clock.floor == pytest.approx(0.9)
        finally:
            backend.in_flight = 0
            await gov.close()

    with caplog.at_level(logging.INFO, logger="joulegate.governor"):
        asyncio.run(asyncio.wait_for(go(), 30))
    assert sim.limit_w() == board_w  # put back on close
    lines = [r.getMessage() for r in caplog.records if "fleet clock" in r.getMessage()]
    assert any("fleet clock 0.85 (from 1.00" in x and "95th percentile" in x for x in lines)
    assert any("fleet clock 1.00 (from 0.85" in x for x in lines)


def test_advise_mode_runs_no_clock(tmp_path: Path) -> None:
    config = parse_config("backends:\n  - {name: h100, url: 'http://127.0.0.1:9/v1', models: [m]}\n"
                          "governor: {mode: advise, slo_target: 0.95}\n")
    pool = BackendPool(config)
    gov = Governor(config, pool, Metrics())
    assert gov.clock_params is None and pool.backends[0].efficiency.slo_limits_s is None
