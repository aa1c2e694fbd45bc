"""Queue-following caps under an attainment target (proxy/governor/follow.py): the pure rule,
the configuration, the simulator's governor (virtual time) and the live governor against the
simulator backend's agent API."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

import tests.conftest as c
from policies.model import EfficiencyModel
from proxy.config import ConfigError, parse_config
from proxy.governor.actuate import Governor
from proxy.governor.clock import cap_for_clock_w
from proxy.governor.decide import BackendInput
from proxy.governor.follow import FollowParams, follow_advice
from proxy.metrics import Metrics
from proxy.sim.fleet import parse_fleet, simulate
from proxy.sim.simulate_cli import main_simulate
from proxy.sim.traces import main_trace, synth_trace

P = FollowParams()
SLO_TTFT_S = 2.0


def _now(cap_w: float, waiting: int = 0, oldest_wait_s: float = 0.0) -> BackendInput:
    return BackendInput(name="h100", model=EfficiencyModel(), in_flight=40, arrival_rate_per_s=8.0,
                        mean_request_s=5.0, gpus=1, min_w=200.0, max_w=700.0, cap_w=cap_w,
                        waiting=waiting, oldest_wait_s=oldest_wait_s)


# -- the rule -------------------------------------------------------------------------------------


def test_a_queue_raises_the_cap_to_a_higher_clock_at_once() -> None:
    b = _now(300.0, waiting=P.queue + 1, oldest_wait_s=0.3)
    move = follow_advice(b, 300.0, 0.6, SLO_TTFT_S, P, now_s=10.0, last_move_s=9.9)  # raising: no dwell
    boosted_w = round(cap_for_clock_w(0.8, b.model.idle_w, 200.0, 700.0), 1)
    assert move is not None and move.cap_w == boosted_w and move.previous_cap_w == 300.0
    assert f"{P.queue + 1} requests await their first token" in move.reason and "clock 0.80" in move.reason
    assert follow_advice(_now(300.0, waiting=P.queue), 300.0, 0.6, SLO_TTFT_S, P, 10.0, None) is None
    # The boosted cap is never below the decision's own.
    above = follow_advice(b, 600.0, 0.6, SLO_TTFT_S, P, 10.0, None)
    assert boosted_w < 600.0 and above is not None and above.cap_w == 600.0


def test_a_request_about_to_miss_its_ttft_gets_the_board_limit() -> None:
    stand_s = P.stand_share * SLO_TTFT_S
    move = follow_advice(_now(300.0, waiting=1, oldest_wait_s=stand_s), 300.0, 0.6, SLO_TTFT_S, P, 10.0, None)
    assert move is not None and move.cap_w == 700.0 and f"limit {stand_s:.2f} s" in move.reason
    assert follow_advice(_now(300.0, waiting=1, oldest_wait_s=stand_s - 0.01), 300.0, 0.6, SLO_TTFT_S, P,
                         10.0, None) is None


def test_once_the_queue_has_gone_the_cap_comes_back_after_the_dwell() -> None:
    b = _now(700.0)
    assert follow_advice(b, 300.0, 0.6, SLO_TTFT_S, P, now_s=10.0, last_move_s=10.0 - P.dwell_s / 2) is None
    move = follow_advice(b, 300.0, 0.6, SLO_TTFT_S, P, now_s=10.0, last_move_s=10.0 - P.dwell_s)
    assert move is not None and move.cap_w == 300.0 and "queue has gone" in move.reason
    assert follow_advice(_now(300.4), 300.0, 0.6, SLO_TTFT_S, P, 10.0, None) is None  # within the deadband


# -- configuration --------------------------------------------------------------------------------


def test_the_fast_raise_and_a_target_exclude_each_other(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="fast_raise and slo_target exclude each other"):
        parse_config("backends:\n  - {name: a, url: 'http://127.0.0.1:9/v1', models: [m]}\n"
                     "governor: {mode: apply, fast_raise: true, slo_target: 0.9}\n")
    fleet = parse_fleet({"backends": [{"name": "h100", "profile": "h100-llama3.1-8b"}]})
    with pytest.raises(ValueError, match="exclude each other"):
        simulate(fleet, synth_trace(1.0, 5.0, seed=1), "efficiency+governor", fast_raise=True, slo_target=0.9)
    fleet_file, trace_file = tmp_path / "fleet.yaml", tmp_path / "trace.csv"
    fleet_file.write_text("backends:\n  - {name: h100, profile: h100-llama3.1-8b}\n")
    assert main_trace(["synth", "--rate", "1", "--duration-s", "5", "--out", str(trace_file)]) == 0
    assert main_simulate(["--fleet", str(fleet_file), "--trace", str(trace_file), "--policy", "efficiency+governor",
                          "--fast-raise", "--slo-target", "0.9"]) == 2
    assert "exclude each other" in capsys.readouterr().err


# -- virtual time ---------------------------------------------------------------------------------


def test_in_the_simulator_caps_follow_the_queues_between_decisions() -> None:
    fleet = parse_fleet({"backends": [{"name": "h100", "profile": "h100-llama3.1-8b", "count": 2},
                                      {"name": "a100", "profile": "a100-llama3.1-8b", "count": 2}]})
    r = simulate(fleet, synth_trace(18.0, 150.0, seed=3), "efficiency+governor", park=False, slo_target=0.9)
    assert r.governor is not None
    h100 = r.governor["h100-0"]
    assert h100["follow_moves"] > 10
    caps_w = {float(w) for w in h100["time_at_cap_s"]}
    decided_w = {float(w) for w in r.governor["a100-0"]["time_at_cap_s"]}
    assert max(caps_w) == 700.0 and min(caps_w) < 400.0  # raised to the board limit and back down deep
    assert len(decided_w) > 2
    assert r.slo_attainment >= 0.9


# -- live, against the simulator backend's agent API ------------------------------------------------


def test_live_apply_a_queue_raises_the_cap_and_its_end_lowers_it(
        h100_sim: c.SimBackend, caplog: pytest.LogCaptureFixture) -> None:
    sim = h100_sim
    board_w = sim.limit_w()
    config, pool = sim.governed("{mode: apply, interval_s: 3600, slo_target: 0.9}")
    backend, model = pool.backends[0], pool.backends[0].efficiency

    async def go() -> None:
        gov = Governor(config, pool, Metrics())
        assert gov.follow is not None
        try:
            await gov.start()
            assert gov._task is not None
            gov._task.cancel()  # this test drives follow_queues itself: the loop's watch would race it
            for _ in range(2):  # fast requests: the clock falls (0.72) and the decision caps deep
                for _ in range(40):
                    sent_s = time.time() - 1.0
                    ticket = model.sent(sent_s)
                    model.first_token(sent_s + 0.2, ticket)
                    model.finished(sent_s + 0.7, ticket, sent_s + 0.2, 11)
                await gov.tick()
            assert gov.clock.clock < 0.8
            decided_w = sim.limit_w()
            assert decided_w < board_w
            assert await gov.follow_queues() == []  # no queue: nothing moves
            tickets = [model.sent(time.time()) for _ in range(FollowParams().queue + 1)]
            backend.in_flight = len(tickets)
            moves = await gov.follow_queues()
            assert len(moves) == 1 and decided_w < sim.limit_w() < board_w
            view = gov.view("h100")
            assert view is not None and view["follow_moves"] == 1
            assert view["follow"]["cap_w"] == moves[0].cap_w and "await their first token" in view["follow"]["reason"]
            for ticket in tickets:  # the queue has gone
                model.first_token(time.time(), ticket)
            backend.in_flight = 0
            assert await gov.follow_queues() == []  # within the dwell
            gov.targets[0].moved_s = time.monotonic() - FollowParams().dwell_s  # the dwell has passed
            assert len(await gov.follow_queues()) == 1
            assert sim.limit_w() == decided_w
            samples = gov.metrics.governor_decisions.collect()[0].samples
            assert any(s.labels.get("action") == "follow" and s.value == 2 for s in samples)
        finally:
            await gov.close()

    with caplog.at_level(logging.INFO, logger="joulegate.governor"):
        asyncio.run(asyncio.wait_for(go(), 30))
    assert sim.limit_w() == board_w  # put back on close
    lines = [r.getMessage() for r in caplog.records]
    assert any("await their first token" in x and "cap to" in x for x in lines)
    assert any("queue has gone" in x for x in lines)
