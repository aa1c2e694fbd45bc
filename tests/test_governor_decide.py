"""proxy/governor/decide.py: the cap keeps the SLO, respects the device minimum, changes at most
once per hold and by bounded steps, and parks only what the rest can cover (advice)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from policies.model import EfficiencyModel
from proxy.governor.decide import (
    HOLD,
    LOWER,
    RAISE,
    BackendInput,
    GovernorParams,
    decide,
    decide_cap,
    swap_advice,
)

PARAMS = GovernorParams(slo_ttft_s=2.0, slo_tpot_s=0.2, hold_s=15.0, max_step_w=100.0)


def backend(in_flight: int = 1, rate: float = 0.5, cap_w: float = 700.0, name: str = "h100",
            last_change_s: float | None = None, model: EfficiencyModel | None = None) -> BackendInput:
    return BackendInput(name=name, model=model or EfficiencyModel(), in_flight=in_flight, arrival_rate_per_s=rate,
                        mean_request_s=2.0, gpus=1, min_w=200.0, max_w=700.0, cap_w=cap_w,
                        last_change_s=last_change_s)


def test_light_load_lowers_by_a_bounded_step_and_saves_energy() -> None:
    d = decide_cap(backend(), PARAMS, now_s=100.0)
    # One request: near the device minimum. Not at it: a fresh model trusts loads up to 8 only,
    # and the slower service at 200 W would keep more than half of that in flight.
    assert d.action == LOWER and 200.0 < d.cap_w < 250.0
    assert decide_cap(backend(), replace(PARAMS, max_load_share=10.0), now_s=100.0).cap_w == 200.0
    assert d.j_per_token_ratio < 1.0 and "J/token" in d.reason
    # From 700 W a cap steps down to at most 100 W below the predicted draw at the loads checked
    # (caps above the draw change nothing): the prior draws ~380 W at 64 (x1.5 at bursts).
    # (A fresh model trusts loads up to 8 only: the capacity guard is lifted here.)
    model, params = EfficiencyModel(), replace(PARAMS, max_load_share=100.0)
    stepped = decide_cap(backend(in_flight=64, rate=30.0), params, now_s=100.0)
    assert stepped.action == LOWER
    assert stepped.cap_w == pytest.approx(model.power_w(64 * 1.5) - 100.0, abs=1.0)
    unbounded = decide_cap(backend(in_flight=64, rate=30.0), replace(params, max_step_w=1e9), now_s=100.0)
    assert 200.0 <= unbounded.cap_w < stepped.cap_w


def test_never_below_the_device_minimum() -> None:
    d = decide_cap(backend(cap_w=150.0), replace(PARAMS, max_step_w=1e9), now_s=100.0)
    assert d.cap_w >= 200.0
    for n in (0, 1, 8, 64):
        assert decide_cap(backend(in_flight=n, cap_w=220.0), replace(PARAMS, max_step_w=1e9), 100.0).cap_w >= 200.0


def test_slo_kept_under_heavy_load() -> None:
    tight = replace(PARAMS, slo_tpot_s=0.1, max_step_w=1e9)
    heavy = decide_cap(backend(in_flight=200, rate=100.0), tight, now_s=100.0)
    light = decide_cap(backend(in_flight=1, rate=0.5), tight, now_s=100.0)
    assert heavy.cap_w > light.cap_w  # more load, less room to slow the GPU
    # A cap that breaks the SLO at the present load is raised at once, whatever the hold.
    raised = decide_cap(backend(in_flight=200, rate=100.0, cap_w=200.0, last_change_s=99.0), tight, now_s=100.0)
    assert raised.action == RAISE and raised.cap_w > 200.0 and "SLO at risk" in raised.reason
    # Beyond what even the full limit serves: to the maximum.
    hopeless = decide_cap(backend(in_flight=5000, rate=2500.0, cap_w=300.0), tight, now_s=100.0)
    assert (hopeless.action, hopeless.cap_w) == (RAISE, 700.0)


def test_no_cap_near_capacity() -> None:
    # A fresh model trusts 8 in flight: at 64 the backend keeps its full limit, or gets it back.
    assert decide_cap(backend(in_flight=64, rate=30.0), PARAMS, now_s=100.0).action == HOLD
    back = decide_cap(backend(in_flight=64, rate=30.0, cap_w=300.0), PARAMS, now_s=100.0)
    assert (back.action, back.cap_w) == (RAISE, 700.0) and "capacity" in back.reason


def test_hysteresis_one_change_per_hold_and_dead_band() -> None:
    recent = decide_cap(backend(last_change_s=95.0), PARAMS, now_s=100.0)
    assert recent.action == HOLD and recent.cap_w == 700.0 and "at most one change" in recent.reason
    later = decide_cap(backend(last_change_s=80.0), PARAMS, now_s=100.0)
    assert later.action == LOWER
    # At the optimum already: nothing to gain, no change.
    settled = decide_cap(backend(cap_w=200.0), PARAMS, now_s=100.0)
    assert settled.action == HOLD and settled.cap_w == 200.0


def test_parking_is_advice_for_idle_backends_the_rest_can_cover() -> None:
    busy = backend(in_flight=2, rate=1.0, name="a")
    idle = backend(in_flight=0, rate=0.0, name="b")
    decisions = {d.name: d for d in decide([busy, idle], PARAMS, now_s=100.0)}
    assert decisions["b"].park and "spare capacity" in decisions["b"].park_reason
    assert not decisions["a"].park
    # Two idle backends: one always stays up.
    both_idle = decide([backend(0, 0.0, name="a"), backend(0, 0.0, name="b")], PARAMS, now_s=100.0)
    assert sum(d.park for d in both_idle) == 1
    # Load the rest cannot cover keeps the idle one up.
    swamped = decide([backend(in_flight=400, rate=200.0, name="a"), idle], PARAMS, now_s=100.0)
    assert not any(d.park for d in swamped)


def test_a_parked_backend_on_a_cleaner_grid_wakes_to_take_the_load_back() -> None:
    # Same GPUs: the awake one carries the load at 400 g/kWh; the parked one's grid is at 100.
    awake, asleep = backend(in_flight=3, rate=1.0, name="dirty"), backend(0, 0.0, name="clean")
    g_per_j = {"dirty": 400 / 3.6e6, "clean": 100 / 3.6e6}
    swap = swap_advice([(asleep, g_per_j["clean"])], [(awake, g_per_j["dirty"])], PARAMS)
    assert swap is not None and swap[0] == "clean" and "25%" in swap[1]
    # Within the margin (a 10% cleaner grid), or the other way round: no wake-up.
    assert swap_advice([(asleep, 360 / 3.6e6)], [(awake, g_per_j["dirty"])], PARAMS) is None
    assert swap_advice([(asleep, g_per_j["dirty"])], [(awake, g_per_j["clean"])], PARAMS) is None
    # Nothing awake carries load: nothing to take over.
    assert swap_advice([(asleep, g_per_j["clean"])], [(backend(0, 0.0, name="dirty"), g_per_j["dirty"])],
                       PARAMS) is None
