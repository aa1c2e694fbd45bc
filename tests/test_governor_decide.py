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
    cheapest_to_wake,
    decide,
    decide_cap,
    park_advice,
    serve_cost_per_token,
    swap_advice,
)

PARAMS = GovernorParams(slo_ttft_s=2.0, slo_tpot_s=0.2, hold_s=15.0, max_step_w=100.0)


def backend(in_flight: int = 1, rate: float = 0.5, cap_w: float = 700.0, name: str = "h100",
            last_change_s: float | None = None, model: EfficiencyModel | None = None,
            g_per_kwh: float | None = None) -> BackendInput:
    """`g_per_kwh`: the carbon objective's cost per joule at that grid; None: the joules one."""
    return BackendInput(name=name, model=model or EfficiencyModel(), in_flight=in_flight, arrival_rate_per_s=rate,
                        mean_request_s=2.0, gpus=1, min_w=200.0, max_w=700.0, cap_w=cap_w,
                        last_change_s=last_change_s,
                        cost_per_j=1.0 if g_per_kwh is None else g_per_kwh / 3.6e6)


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
    awake, asleep = backend(in_flight=3, rate=1.0, name="dirty", g_per_kwh=400), backend(0, 0.0, name="clean", g_per_kwh=100)
    swap = swap_advice([asleep], [awake], PARAMS)
    assert swap is not None and (swap.wake, swap.relieve) == ("clean", "dirty") and "25%" in swap.reason
    # Within the margin (a 10% cleaner grid), or the other way round: no wake-up.
    assert swap_advice([replace(asleep, cost_per_j=360 / 3.6e6)], [awake], PARAMS) is None
    assert swap_advice([replace(asleep, cost_per_j=awake.cost_per_j)],
                       [replace(awake, cost_per_j=asleep.cost_per_j)], PARAMS) is None
    # Nothing awake carries load: nothing to take over.
    assert swap_advice([asleep], [backend(0, 0.0, name="dirty", g_per_kwh=400)], PARAMS) is None


def _drawing(idle_w: float, busy_w: float) -> EfficiencyModel:
    """A model that has seen the GPU idle at `idle_w`, and at `busy_w` making 100 tokens/s per
    request with one to four requests decoding."""
    m = EfficiencyModel()
    for i in range(200):
        n = i % 5
        m.observe_interval(n, idle_w if n == 0 else busy_w + 10.0 * n, 100.0 * n, float(i), in_flight=n)
    m.refresh()
    return m


def test_swaps_move_load_between_grids_not_between_equal_gpus_on_one_grid() -> None:
    # One grid, the parked GPU's model cheaper (learnt elsewhere, or noise): the router, not a
    # wake-up, arbitrates between GPUs whose joules weigh the same.
    awake = backend(in_flight=3, rate=1.0, name="a", model=_drawing(100.0, 400.0), g_per_kwh=400)
    asleep = backend(0, 0.0, name="b", model=_drawing(50.0, 150.0), g_per_kwh=400)
    assert serve_cost_per_token(asleep, 3.0) < 0.8 * serve_cost_per_token(awake, 3.0)
    assert swap_advice([asleep], [awake], PARAMS) is None
    assert swap_advice([replace(asleep, cost_per_j=399 / 3.6e6)], [awake], PARAMS) is not None


def test_serving_cost_counts_idle_power() -> None:
    # The same climb from idle per token, twice the idle draw: dearer to keep awake.
    lean, idle_heavy = _drawing(50.0, 250.0), _drawing(150.0, 350.0)
    assert lean.fill_j_per_token(0.0, 1.0) == pytest.approx(idle_heavy.fill_j_per_token(0.0, 1.0), rel=0.05)
    assert serve_cost_per_token(backend(model=idle_heavy), 1.0) > 1.3 * serve_cost_per_token(backend(model=lean), 1.0)


def test_carbon_parks_the_idle_backend_with_the_most_idle_grams_first() -> None:
    # Room to park one of two equal idle GPUs: under the joules objective the first listed,
    # under the carbon one the one on the dirtier grid.
    busy = backend(in_flight=4, rate=1.0, name="busy")
    joules = park_advice([busy, backend(0, 0.0, name="clean"), backend(0, 0.0, name="dirty")], PARAMS)
    assert list(joules) == ["clean"]
    carbon = park_advice([replace(busy, cost_per_j=100 / 3.6e6), backend(0, 0.0, name="clean", g_per_kwh=40),
                          backend(0, 0.0, name="dirty", g_per_kwh=585)], PARAMS)
    assert list(carbon) == ["dirty"]


def test_the_cleanest_parked_backend_is_the_one_to_wake() -> None:
    parked = [backend(0, 0.0, name="dirty", g_per_kwh=585), backend(0, 0.0, name="clean", g_per_kwh=44)]
    assert cheapest_to_wake(parked) == "clean"
    assert cheapest_to_wake([backend(0, 0.0, name="x"), backend(0, 0.0, name="y")]) == "x"  # equals: first
    assert cheapest_to_wake([]) is None
