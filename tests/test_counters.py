"""GpuCounters, the pure per-GPU counter logic every power source shares: resets and wraps per
GPU (never on the sum), implausible steps discarded and their gap interpolated."""

from __future__ import annotations

import pytest

from proxy.energy.sources.counters import DEFAULT_MAX_W, MAX_DISCARDS, GpuCounters, GpuRead, Step
from proxy.energy.timeline import EnergyTimeline

DAY_AND_A_HALF_MJ = (130e9, 125e9)  # two H100s' counters after ~1.5 days at ~1 kW


def two_gpus(a_mj: float, b_mj: float, limit_w: float | None = 700.0) -> list[GpuRead]:
    return [GpuRead("GPU-a", a_mj, 300.0, limit_w), GpuRead("GPU-b", b_mj, 200.0, limit_w)]


def run_with_restart(counters: GpuCounters, timeline: EnergyTimeline, seconds: int = 100) -> None:
    """GPU a at 300 W and GPU b at 200 W, read every 0.1 s; GPU b's driver reloads at t = 50 s
    (its counter restarts at 0 and counts on)."""
    a0, b0 = DAY_AND_A_HALF_MJ
    for i in range(seconds * 10 + 1):
        t_s = i / 10.0
        a_mj = a0 + 300_000.0 * t_s
        b_mj = b0 + 200_000.0 * t_s if t_s < 50.0 else 200_000.0 * (t_s - 49.95)
        step = counters.step(t_s, two_gpus(a_mj, b_mj))
        assert not step.discarded
        assert step.energy_j is not None
        timeline.add_energy_sample(t_s, step.energy_j)


def test_one_gpu_restarting_rebases_that_gpu_only() -> None:
    counters, timeline = GpuCounters(), EnergyTimeline()
    run_with_restart(counters, timeline)
    truth_j = 500.0 * 100.0
    assert timeline.joules_between(0.0, 100.0) == pytest.approx(truth_j, rel=0.01)
    assert counters.resets == 1 and counters.discarded == 0
    # What today's sum-then-check did: the sum drops from 255e9 to 130e9 mJ and the timeline
    # books the whole new sum as joules since a restart, ~2,600x the run.
    summed = EnergyTimeline()
    a0, b0 = DAY_AND_A_HALF_MJ
    for i in range(1001):
        t_s = i / 10.0
        b_mj = b0 + 200_000.0 * t_s if t_s < 50.0 else 200_000.0 * (t_s - 49.95)
        summed.add_energy_sample(t_s, (a0 + 300_000.0 * t_s + b_mj) / 1000.0)
    assert summed.joules_between(0.0, 100.0) > 1000 * truth_j


def test_the_summed_cumulative_starts_at_the_raw_sum_and_never_goes_back() -> None:
    counters = GpuCounters()
    first = counters.step(0.0, two_gpus(*DAY_AND_A_HALF_MJ))
    assert first.energy_j == pytest.approx(sum(DAY_AND_A_HALF_MJ) / 1000.0)
    assert first.power_w == pytest.approx(500.0)
    restarted = counters.step(0.1, two_gpus(DAY_AND_A_HALF_MJ[0] + 30_000, 5_000))
    assert restarted.resets == 1 and not restarted.gap_before
    assert restarted.energy_j == pytest.approx(first.energy_j + 30.0 + 5.0)


def test_a_wrap_with_a_known_modulus_is_a_plausible_step_not_a_reset() -> None:
    counters = GpuCounters(wrap_mj=2**32)
    counters.step(0.0, [GpuRead("g", 2**32 - 10_000, None, 700.0)])
    step = counters.step(0.1, [GpuRead("g", 20_000, None, 700.0)])
    assert step.resets == 0 and counters.resets == 0
    assert step.energy_j == pytest.approx((2**32 - 10_000) / 1000.0 + 30.0)


def test_a_one_reading_spike_is_discarded_and_the_next_step_spans_the_gap() -> None:
    counters = GpuCounters()
    a0, b0 = DAY_AND_A_HALF_MJ
    start = counters.step(0.0, two_gpus(a0, b0))
    assert start.energy_j is not None
    spike = counters.step(0.1, two_gpus(a0 + 30_000 + 1e9, b0 + 20_000))  # +1 MJ in 0.1 s
    assert spike.discarded and spike.energy_j is None and "GPU-a" in (spike.reason or "")
    after = counters.step(0.2, two_gpus(a0 + 60_000, b0 + 40_000))
    assert not after.discarded and after.gap_before
    assert after.energy_j == pytest.approx(start.energy_j + 100.0)  # 500 W x 0.2 s
    assert counters.discarded == 1 and counters.resets == 0
    assert not counters.step(0.3, two_gpus(a0 + 90_000, b0 + 60_000)).gap_before


def test_a_counter_that_stays_ahead_is_rebased_at_its_last_power() -> None:
    counters = GpuCounters()
    counters.step(0.0, two_gpus(0, 0))
    counters.step(0.1, two_gpus(30_000, 20_000))
    jump_mj = 5e9
    steps = [counters.step(0.1 * (i + 2), two_gpus(30_000 * (i + 2) + jump_mj, 20_000 * (i + 2)))
             for i in range(MAX_DISCARDS)]
    assert all(s.discarded for s in steps[:-1])
    last = steps[-1]
    assert not last.discarded and last.gap_before and last.resets == 1
    # The re-based GPU's gap at its last known power (300 W), the other GPU measured.
    dt_s = 0.1 * MAX_DISCARDS
    assert last.energy_j == pytest.approx(50.0 + 300.0 * dt_s + 200.0 * dt_s)
    follow = counters.step(0.1 * (MAX_DISCARDS + 2), two_gpus(
        30_000 * (MAX_DISCARDS + 2) + jump_mj, 20_000 * (MAX_DISCARDS + 2)))
    assert follow.energy_j == pytest.approx(last.energy_j + 50.0) and not follow.gap_before


def test_the_limit_is_the_gpus_or_2_kw() -> None:
    slack_s = 0.25
    known, unknown = GpuCounters(slack_s=slack_s), GpuCounters(slack_s=slack_s)
    for counters, limit_w in ((known, 400.0), (unknown, None)):
        counters.step(0.0, [GpuRead("g", 0.0, None, limit_w)])
    # 1 s at 1,000 W: over 1.5 x 400 W but under 2 kW.
    assert known.step(1.0, [GpuRead("g", 1e6, None, 400.0)]).discarded
    assert not unknown.step(1.0, [GpuRead("g", 1e6, None, None)]).discarded
    over_mj = DEFAULT_MAX_W * (1.0 + slack_s) * 1000.0 * 1.01
    assert unknown.step(2.0, [GpuRead("g", 1e6 + over_mj, None, None)]).discarded


def test_power_only_readings_over_the_limit_are_discarded() -> None:
    counters = GpuCounters()
    ok = counters.step(0.0, [GpuRead("g", None, 350.0, 700.0), GpuRead("h", None, 100.0, 700.0)])
    assert ok == Step(None, 450.0)
    bad = counters.step(0.1, [GpuRead("g", None, 5000.0, 700.0), GpuRead("h", None, 100.0, 700.0)])
    assert bad.discarded and counters.discarded == 1
    back = counters.step(0.2, [GpuRead("g", None, 340.0, 700.0), GpuRead("h", None, 100.0, 700.0)])
    assert back.power_w == pytest.approx(440.0) and back.gap_before


def test_a_gpu_joining_the_selection_starts_counting_from_its_first_reading() -> None:
    counters = GpuCounters()
    counters.step(0.0, [GpuRead("a", 1_000_000, None)])
    step = counters.step(0.1, [GpuRead("a", 1_030_000, None), GpuRead("b", 9e9, None)])
    assert step.energy_j == pytest.approx(1000.0 + 30.0) and step.resets == 0
    step = counters.step(0.2, [GpuRead("a", 1_060_000, None), GpuRead("b", 9e9 + 20_000, None)])
    assert step.energy_j == pytest.approx(1030.0 + 30.0 + 20.0)
