"""`joulegate simulate` with `+governor` parks idle backends: asleep, never routed to, woken by
the governor or by a request that finds no awake room, with the wake time in its TTFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.sim.fleet import SimResult, parse_fleet, simulate
from proxy.sim.simulate_cli import main_simulate
from proxy.sim.traces import TraceRequest, main_trace, synth_trace

FLEET = parse_fleet({"backends": [
    {"name": "h100", "profile": "h100-llama3.1-8b"},
    {"name": "a100", "profile": "a100-llama3.1-8b"},
    {"name": "l4", "profile": "l4-llama3.1-8b", "count": 2},
]})


def _sent_while_parked(r: SimResult) -> list[tuple[str, float]]:
    """(backend, time sent) of every request routed to a backend inside one of its parked
    intervals, the wake-up included (it is routable only once awake)."""
    assert r.governor is not None and r.request_log is not None
    wake_s = 2.0
    out = []
    for name, g in r.governor.items():
        for start, woken in g["parked_intervals_s"]:
            out += [(name, s) for b, s, _ in r.request_log if b == name and start <= s < woken + wake_s]
    return out


def _balanced(r: SimResult) -> bool:
    return r.conservation_error_j < 1e-6 * r.joules


def test_light_load_parks_idle_backends_and_saves_energy() -> None:
    trace = synth_trace(3.0, 90.0, seed=1)
    awake = simulate(FLEET, trace, "efficiency+governor", park=False)
    parked = simulate(FLEET, trace, "efficiency+governor", record_requests=True)
    assert parked.governor is not None and awake.governor is not None
    parked_s = {name: g["parked_s"] for name, g in parked.governor.items()}
    assert sum(parked_s.values()) > 60.0 and parked_s["h100"] == 0.0  # the one serving stays up
    assert "parked_s" not in awake.governor["a100"]
    assert _sent_while_parked(parked) == []
    assert parked.output_tokens == awake.output_tokens
    assert parked.joules < 0.95 * awake.joules  # asleep at half the idle draw
    assert parked.idle_joules < awake.idle_joules
    # The a100 serves nothing: idle at 95 W until parked at 15 s, then asleep at half that
    # (but for a burst's wake-up near the end, which the h100 turned out to carry alone).
    intervals = parked.governor["a100"]["parked_intervals_s"]
    a100, end_s = FLEET[1].profile, trace[-1].arrival_s
    assert intervals[0][0] == 15.0 and a100.sleep_w == 0.5 * a100.idle_w
    asleep_s = sum(min(z, end_s) - a for a, z in intervals if a < end_s)
    assert asleep_s > 60.0 and parked.backends["a100"].requests == 0
    assert parked.backends["a100"].idle_joules == pytest.approx(
        a100.idle_w * (end_s - asleep_s) + a100.sleep_w * asleep_s)
    assert parked.slo_attainment >= awake.slo_attainment - 0.01
    assert _balanced(parked)


@pytest.mark.parametrize("policy", ["round_robin", "least_loaded", "efficiency"])
def test_no_policy_routes_to_a_parked_backend(policy: str) -> None:
    fleet = parse_fleet({"backends": [{"name": "h100", "profile": "h100-llama3.1-8b"},
                                      {"name": "a100", "profile": "a100-llama3.1-8b"},
                                      {"name": "l4", "profile": "l4-llama3.1-8b"}]})
    trace = [TraceRequest(float(t), 200, 20) for t in range(0, 120, 7)]  # sparse: one every 7 s
    r = simulate(fleet, trace, policy + "+governor", record_requests=True)
    assert r.governor is not None
    assert any(g["parked_s"] > 0 for g in r.governor.values())
    assert _sent_while_parked(r) == [] and r.rejected == 0
    assert _balanced(r)


def test_rising_load_wakes_a_parked_backend_which_then_serves() -> None:
    light = synth_trace(2.0, 60.0, seed=3)
    heavy = [TraceRequest(60.0 + q.arrival_s, q.prompt_tokens, q.output_tokens)
             for q in synth_trace(10.0, 30.0, seed=4)]
    r = simulate(FLEET, light + heavy, "efficiency+governor", record_requests=True)
    assert r.governor is not None and r.request_log is not None
    woken = [name for name, g in r.governor.items() if g["wakes"] >= 1]
    assert woken and all(r.governor[n]["on_demand_wakes"] == 0 for n in woken)  # the governor's doing
    served_after = {n: sum(1 for b, s, _ in r.request_log
                           if b == n and s >= r.governor[n]["parked_intervals_s"][0][1])
                    for n in woken}
    assert max(served_after.values()) > 10
    assert _sent_while_parked(r) == []
    assert _balanced(r)


@pytest.mark.parametrize("wake_s", [0.5, 3.0])
def test_a_request_with_no_awake_room_waits_the_wake_time(wake_s: float) -> None:
    fleet = parse_fleet({"backends": [
        {"name": "h100", "profile": "h100-llama3.1-8b", "max_concurrency": 4},
        {"name": "a100", "profile": "a100-llama3.1-8b", "max_concurrency": 4}]})
    # A request every 2 s lets the governor park the a100 at 15 s; six at once at 41 s find
    # the h100 full after four.
    trace = [TraceRequest(float(t), 200, 50) for t in range(0, 40, 2)] + [TraceRequest(41.0, 200, 50)] * 6
    r = simulate(fleet, trace, "efficiency+governor", wake_s=wake_s, record_requests=True)
    assert r.governor is not None and r.request_log is not None
    assert r.governor["a100"]["on_demand_wakes"] == 1 and r.rejected == 0
    assert r.governor["a100"]["parked_intervals_s"] == [[15.0, 41.0]]
    waited = [(s, ttft) for _, s, ttft in r.request_log[-6:] if s > 41.0]
    assert len(waited) == 2  # sent when the wake-up ended, to whichever backend had room then
    for sent_s, ttft_s in waited:
        assert sent_s == pytest.approx(41.0 + wake_s)
        assert wake_s < ttft_s < wake_s + 0.5
    assert r.ttft_p99_ms > 1e3 * wake_s  # the table's figures show it
    assert _balanced(r)


def test_simulate_cli_parking_flags_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("backends:\n  - {name: h100, profile: h100-llama3.1-8b}\n"
                     "  - {name: l4, profile: l4-llama3.1-8b}\n")
    trace = tmp_path / "trace.csv"
    assert main_trace(["synth", "--rate", "1", "--duration-s", "40", "--out", str(trace)]) == 0
    out = tmp_path / "out.json"
    args = ["--fleet", str(fleet), "--trace", str(trace), "--policy", "efficiency,efficiency+governor"]
    assert main_simulate([*args, "--wake-s", "5", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "park%" in table and "(parked " in table
    gov = json.loads(out.read_text())["details"]["efficiency+governor"]["governor"]
    assert gov["l4"]["parked_s"] > 0 and {"wakes", "on_demand_wakes", "time_at_cap_s"} <= set(gov["l4"])
    assert main_simulate([*args, "--no-park", "--json", str(out)]) == 0
    assert "parked_s" not in json.loads(out.read_text())["details"]["efficiency+governor"]["governor"]["l4"]
    assert main_simulate([*args, "--wake-s", "-1"]) == 2


def test_parking_without_caps_leaves_every_gpu_at_its_board_limit() -> None:
    trace = synth_trace(3.0, 90.0, seed=1)
    both = simulate(FLEET, trace, "efficiency+governor")
    parking_only = simulate(FLEET, trace, "efficiency+governor", power_caps=False)
    assert both.governor is not None and parking_only.governor is not None
    assert sum(g["cap_changes"] for g in both.governor.values()) > 0
    for fb in FLEET:
        g = parking_only.governor[fb.name]
        assert g["cap_changes"] == 0 and list(g["time_at_cap_s"]) == [f"{fb.profile.board_limit_w:g}"]
    assert sum(g["parked_s"] for g in parking_only.governor.values()) > 60.0
    assert _balanced(parking_only)
