"""EnergyTimeline: samples (counter joules or power watts) to joules over any span."""

from __future__ import annotations

import pytest

from proxy.energy.timeline import EnergyTimeline


def counter(*readings: tuple[float, float]) -> EnergyTimeline:
    timeline = EnergyTimeline()
    for t_s, energy_j in readings:
        timeline.add_energy_sample(t_s, energy_j)
    return timeline


def test_empty_timeline_reads_zero() -> None:
    timeline = EnergyTimeline()
    assert timeline.energy_j(5.0) == 0.0
    assert timeline.joules_between(0.0, 10.0) == 0.0
    assert timeline.power_w_at(1.0) == 0.0
    assert timeline.last_sample_s is None
    assert not timeline.covered(0.0)
    assert timeline.sample_after(0.0) is None


def test_linear_interpolation_between_counter_samples() -> None:
    timeline = counter((10.0, 5000.0), (12.0, 5400.0), (13.0, 5500.0))
    assert timeline.joules_between(10.0, 12.0) == pytest.approx(400.0)
    assert timeline.joules_between(10.0, 11.0) == pytest.approx(200.0)
    assert timeline.joules_between(11.5, 12.5) == pytest.approx(100.0 + 50.0)
    assert timeline.power_w_at(11.0) == pytest.approx(200.0)
    assert timeline.power_w_at(12.5) == pytest.approx(100.0)
    assert timeline.sample_after(10.0) == (12.0, pytest.approx(400.0))
    assert timeline.covered(13.0) and not timeline.covered(13.01)
    assert timeline.first_sample_s == 10.0 and timeline.last_sample_s == 13.0
    assert timeline.kind == "energy"


def test_power_samples_are_integrated_with_the_trapezoid_rule() -> None:
    timeline = EnergyTimeline()
    timeline.add_power_sample(0.0, 100.0)
    timeline.add_power_sample(1.0, 300.0)
    timeline.add_power_sample(3.0, 300.0)
    assert timeline.joules_between(0.0, 1.0) == pytest.approx(200.0)
    assert timeline.joules_between(0.0, 3.0) == pytest.approx(800.0)
    # Constant inside an interval: half of the first interval's joules by its midpoint.
    assert timeline.joules_between(0.0, 0.5) == pytest.approx(100.0)
    # Past the last sample the last reading holds.
    assert timeline.joules_between(3.0, 5.0) == pytest.approx(600.0)
    assert timeline.kind == "power"


def test_counter_reset_continues_the_curve() -> None:
    # The driver restarted between 2 s and 3 s: the counter starts again near zero.
    timeline = counter((0.0, 1000.0), (1.0, 1100.0), (2.0, 1200.0), (3.0, 40.0), (4.0, 140.0))
    assert timeline.joules_between(0.0, 2.0) == pytest.approx(200.0)
    assert timeline.joules_between(2.0, 3.0) == pytest.approx(40.0)
    assert timeline.joules_between(3.0, 4.0) == pytest.approx(100.0)
    assert timeline.joules_between(0.0, 4.0) == pytest.approx(340.0)


def test_counter_wrap_never_goes_backwards() -> None:
    top_j = 2.0**32 / 1000  # a 32-bit millijoule counter's last value, in joules
    timeline = counter((0.0, top_j - 100.0), (1.0, top_j - 10.0), (2.0, 20.0), (3.0, 70.0))
    values = [timeline.energy_j(t / 10) for t in range(31)]
    assert values == sorted(values)
    assert timeline.joules_between(2.0, 3.0) == pytest.approx(50.0)
    assert timeline.joules_between(1.0, 2.0) == pytest.approx(20.0)


def test_out_of_order_and_duplicate_samples() -> None:
    timeline = counter((0.0, 0.0), (2.0, 200.0), (1.0, 50.0), (2.0, 150.0), (2.0, 200.0))
    assert len(timeline) == 2
    assert timeline.joules_between(0.0, 2.0) == pytest.approx(200.0)
    # A same-time higher reading is taken; its joules land in the next interval, because an
    # earlier sample's value never changes once read.
    timeline.add_energy_sample(2.0, 230.0)
    assert timeline.joules_between(0.0, 2.0) == pytest.approx(200.0)
    timeline.add_energy_sample(3.0, 330.0)
    assert timeline.joules_between(2.0, 3.0) == pytest.approx(130.0)
    assert timeline.joules_between(0.0, 3.0) == pytest.approx(330.0)


def test_bad_readings_and_the_other_kind_are_ignored() -> None:
    timeline = counter((0.0, 10.0), (1.0, float("nan")), (1.0, -5.0), (float("inf"), 20.0))
    timeline.add_power_sample(2.0, 500.0)  # a counter timeline does not also integrate power
    timeline.add_energy_sample(2.0, 30.0)
    assert len(timeline) == 2
    assert timeline.joules_between(0.0, 2.0) == pytest.approx(20.0)


def test_extrapolation_forwards_and_backwards() -> None:
    timeline = counter((10.0, 0.0), (11.0, 100.0), (13.0, 500.0))
    # After the last sample: the last interval's power (200 W).
    assert timeline.joules_between(13.0, 14.5) == pytest.approx(300.0)
    assert timeline.power_w_at(20.0) == pytest.approx(200.0)
    # Before the first: the first interval's power (100 W).
    assert timeline.joules_between(8.0, 10.0) == pytest.approx(200.0)
    assert timeline.power_w_at(0.0) == pytest.approx(100.0)
    single = counter((5.0, 7.0))
    assert single.joules_between(0.0, 10.0) == 0.0


def test_sampling_gap_is_one_long_interval_at_constant_power() -> None:
    # The source was silent from 1 s to 6 s; the counter kept counting (500 J across the gap).
    timeline = counter((0.0, 0.0), (1.0, 300.0), (6.0, 800.0), (7.0, 1100.0))
    assert timeline.power_w_at(3.0) == pytest.approx(100.0)
    assert timeline.joules_between(2.0, 3.0) == pytest.approx(100.0)
    assert timeline.joules_between(0.5, 6.5) == pytest.approx(150.0 + 500.0 + 150.0)


def test_a_modelled_bridge_stands_in_for_a_silent_counter_which_then_rebases() -> None:
    timeline = counter((0.0, 5_000.0), (1.0, 5_300.0))  # 300 W
    timeline.add_modelled_power(4.0, 200.0)  # silent from 1 s: modelled at 200 W
    timeline.add_modelled_power(6.0, 250.0)
    # Back at 7 s: the counter gained 3,000 J since 1 s, which the bridge already covers.
    timeline.add_energy_sample(7.0, 8_300.0)
    timeline.add_energy_sample(8.0, 8_700.0)  # 400 W, measured again
    assert timeline.joules_between(1.0, 4.0) == pytest.approx(600.0)
    assert timeline.joules_between(4.0, 6.0) == pytest.approx(500.0)
    assert timeline.joules_between(6.0, 7.0) == pytest.approx(250.0)  # the rebase step: bridge power
    assert timeline.joules_between(7.0, 8.0) == pytest.approx(400.0)


def test_a_bridge_can_start_an_empty_timeline_and_power_readings_follow_it() -> None:
    timeline = EnergyTimeline()
    timeline.add_modelled_power(0.0, 100.0)
    timeline.add_modelled_power(2.0, 100.0)
    timeline.add_power_sample(3.0, 300.0)  # trapezoid from the bridge's 100 W
    assert timeline.kind == "power"
    assert timeline.joules_between(0.0, 3.0) == pytest.approx(200.0 + 200.0)
    late = EnergyTimeline()
    late.add_modelled_power(0.0, 50.0)
    late.add_modelled_power(1.0, 50.0)
    late.add_energy_sample(2.0, 123_456.0)  # first counter reading ever: only a base
    late.add_energy_sample(3.0, 123_556.0)
    assert late.kind == "energy"
    assert late.joules_between(0.0, 3.0) == pytest.approx(50.0 + 50.0 + 100.0)


def test_memory_is_bounded_by_max_age() -> None:
    timeline = EnergyTimeline(max_age_s=10.0)
    for i in range(50_000):
        timeline.add_energy_sample(i * 0.1, i * 50.0)  # 500 W
    assert len(timeline) <= 102
    assert len(timeline._t_s) <= 2 * 1024 + 102  # dropped entries are compacted away
    last_s = timeline.last_sample_s
    assert last_s is not None and timeline.first_sample_s is not None
    assert last_s - timeline.first_sample_s <= 10.0 + 0.1 + 1e-9
    assert timeline.joules_between(last_s - 5.0, last_s) == pytest.approx(2500.0)
    assert timeline.sample_after(0.0) == (timeline.first_sample_s, pytest.approx(
        timeline.energy_j(timeline.first_sample_s)))


def test_max_age_must_be_positive() -> None:
    with pytest.raises(ValueError):
        EnergyTimeline(max_age_s=0.0)
