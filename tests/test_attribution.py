"""Attributor: per-request joules from samples and request events; energy is conserved."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.energy.attribution import (
    Attributor,
    Estimate,
    Final,
    ScheduledRequest,
    attribute_schedule,
)
from proxy.energy.attribution.weights import TokenWeights
from proxy.energy.timeline import EnergyTimeline

REL = 1e-9


def watts(power_w: float, until_s: float, step_s: float = 1.0) -> list[tuple[float, float]]:
    """Counter readings (s, J) of a constant `power_w` from 0 s to `until_s`."""
    n = round(until_s / step_s)
    return [(i * step_s, power_w * i * step_s) for i in range(n + 1)]


def streamed(
    request_id: str, start_s: float, first_s: float, end_s: float, per_s: int, prompt: int = 0
) -> ScheduledRequest:
    """A stream with its first (empty) chunk at `first_s`, then `per_s` one-token chunks a second."""
    n = round((end_s - first_s) * per_s)
    arrivals = [(first_s, 0)] + [(first_s + i / per_s, 1) for i in range(1, n + 1)]
    return ScheduledRequest(request_id, start_s, end_s, prompt, n, True, arrivals)


def assert_books_balance(attributor: Attributor) -> None:
    """attributed + idle + carried == measured, and measured is the timeline's own figure."""
    measured_j = attributor.finalized_joules_measured
    books_j = (attributor.finalized_joules_attributed + attributor.finalized_joules_idle
               + attributor.carried_joules)
    assert books_j == pytest.approx(measured_j, rel=REL, abs=1e-9)
    first_s, until_s = attributor.first_finalized_s, attributor.finalized_until_s
    if first_s is not None and until_s is not None:
        assert measured_j == pytest.approx(
            attributor.timeline.joules_between(first_s, until_s), rel=REL, abs=1e-9)


def test_one_request_alone_gets_its_span_and_the_rest_is_idle() -> None:
    joules, idle_j = attribute_schedule(watts(100.0, 10.0), [streamed("a", 2.0, 2.0, 5.0, 10)])
    assert joules["a"] == pytest.approx(300.0, rel=REL)
    assert idle_j == pytest.approx(700.0, rel=REL)


def test_two_overlapping_streams_at_equal_rates_split_the_overlap_in_half() -> None:
    requests = [streamed("a", 0.0, 0.0, 4.0, 10), streamed("b", 2.0, 2.0, 6.0, 10)]
    joules, idle_j = attribute_schedule(watts(100.0, 6.0), requests)
    assert joules["a"] == pytest.approx(200.0 + 100.0, rel=REL)
    assert joules["b"] == pytest.approx(100.0 + 200.0, rel=REL)
    assert idle_j == pytest.approx(0.0, abs=1e-9)


def test_prefill_weight_balances_prompt_tokens_against_generated_ones() -> None:
    # 0-1 s: "a" is in prefill (1000 prompt tokens x 0.1 = 100) while "b" generates 100 tokens:
    # 50/50. 1-2 s: both generate 100 tokens: 50/50 again. "a"'s first chunk lands exactly on
    # the 1 s sample and counts with its decode time after it.
    a = ScheduledRequest("a", 0.0, 2.0, 1000, 100, True,
                         [(1.0, 1)] + [(1.0 + i / 100, 1) for i in range(1, 100)])
    b = streamed("b", 0.0, 0.0, 2.0, 100)
    joules, _ = attribute_schedule(watts(100.0, 2.0), [a, b], prefill_weight=0.1)
    assert joules == {"a": pytest.approx(100.0, rel=REL), "b": pytest.approx(100.0, rel=REL)}
    # Prompt tokens count for nothing with prefill_weight 0: "b" takes all of 0-1 s.
    joules, _ = attribute_schedule(watts(100.0, 2.0), [a, b], prefill_weight=0.0)
    assert joules["b"] == pytest.approx(150.0, rel=REL)


def test_a_token_decoded_alone_carries_the_whole_steps_shared_work() -> None:
    # 0-1 s as above, with step_weight 1: "b" decodes alone (a batch of 1), so each of its
    # tokens weighs 1 + 1/1 against "a"'s prompt of 100: b takes 2/3 of the second, not 1/2.
    a = ScheduledRequest("a", 0.0, 2.0, 1000, 100, True,
                         [(1.0, 1)] + [(1.0 + i / 100, 1) for i in range(1, 100)])
    b = streamed("b", 0.0, 0.0, 2.0, 100)
    flat, _ = attribute_schedule(watts(100.0, 2.0), [a, b], prefill_weight=0.1)
    shared, _ = attribute_schedule(watts(100.0, 2.0), [a, b],
                                   weights=TokenWeights(0.1, step_weight=1.0))
    # From 1 s both decode in a batch of 2: equal tokens, equal shares (as without the term).
    assert shared["b"] - 50.0 == pytest.approx(200.0 / 3.0, rel=0.02)
    assert shared["b"] > flat["b"] + 15.0
    assert shared["a"] + shared["b"] == pytest.approx(200.0, rel=REL)


def test_a_staggered_batch_of_fifty_conserves_and_twins_are_equal() -> None:
    requests = []
    for j in range(25):
        for twin in "xy":
            start_s = j * 0.2
            requests.append(streamed(f"{j}{twin}", start_s, start_s + 0.3, start_s + 2.3, 20,
                                     prompt=500 + 40 * j))
    # A wobbly power curve sampled every 0.1 s.
    samples, total_j = [], 0.0
    for i in range(91):
        samples.append((i / 10, total_j))
        total_j += 0.1 * (300.0 + 150.0 * math.sin(i / 3))
    joules, idle_j = attribute_schedule(samples, requests, prefill_weight=0.1)
    timeline = EnergyTimeline()
    for t_s, energy_j in samples:
        timeline.add_energy_sample(t_s, energy_j)
    assert math.fsum(joules.values()) + idle_j == pytest.approx(
        timeline.joules_between(0.0, 9.0), rel=REL)
    for j in range(25):
        assert joules[f"{j}x"] == pytest.approx(joules[f"{j}y"], rel=REL)
        assert joules[f"{j}x"] > 0


def test_idle_gaps_separate_versus_share() -> None:
    requests = [ScheduledRequest("a", 1.0, 2.0, 0, 10, False),
                ScheduledRequest("b", 4.0, 5.0, 0, 10, False)]
    joules, idle_j = attribute_schedule(watts(100.0, 6.0), requests, idle="separate")
    assert joules == {"a": pytest.approx(100.0), "b": pytest.approx(100.0)}
    assert idle_j == pytest.approx(400.0)
    # share: idle joules wait for the next busy moment (0-1 s goes to "a", 2-4 s to "b"); the
    # tail after the last request has no one to go to and stays idle.
    joules, idle_j = attribute_schedule(watts(100.0, 6.0), requests, idle="share")
    assert joules == {"a": pytest.approx(200.0), "b": pytest.approx(300.0)}
    assert idle_j == pytest.approx(100.0)
    # An idle stretch longer than share_max_s is idle even in share mode.
    joules, idle_j = attribute_schedule(watts(100.0, 6.0), requests, idle="share",
                                        share_max_s=1.5)
    assert joules == {"a": pytest.approx(200.0), "b": pytest.approx(100.0)}
    assert idle_j == pytest.approx(300.0)


def test_share_mode_live_books_balance_with_the_carry() -> None:
    attributor = Attributor(idle="share")
    for t_s, energy_j in watts(100.0, 3.0):
        attributor.timeline.add_energy_sample(t_s, energy_j)
    attributor.advance()
    assert attributor.carried_joules == pytest.approx(300.0)
    assert attributor.finalized_joules_idle == 0.0
    assert_books_balance(attributor)
    attributor.open("a", 3.0, False)
    attributor.close("a", 4.0, 10, 10)
    attributor.timeline.add_energy_sample(4.0, 400.0)
    (final,) = attributor.advance()
    assert final.joules == pytest.approx(400.0)
    assert attributor.carried_joules == 0.0
    assert_books_balance(attributor)


def test_counter_wrap_mid_request() -> None:
    samples = [(0.0, 1000.0), (1.0, 1100.0), (2.0, 50.0), (3.0, 150.0), (4.0, 250.0)]
    joules, idle_j = attribute_schedule(samples, [streamed("a", 0.0, 0.0, 4.0, 10)])
    assert joules["a"] == pytest.approx(350.0, rel=REL)
    assert idle_j == pytest.approx(0.0, abs=1e-9)


def test_sample_gap_mid_request_is_constant_power() -> None:
    # The source is silent from 1 s to 6 s (500 J counted across the gap: 100 W).
    samples = [(0.0, 0.0), (1.0, 100.0), (6.0, 600.0), (7.0, 700.0)]
    requests = [streamed("long", 0.0, 0.0, 7.0, 10), streamed("short", 2.0, 2.0, 3.0, 10)]
    joules, _ = attribute_schedule(samples, requests)
    assert joules["short"] == pytest.approx(50.0, rel=REL)
    assert joules["long"] == pytest.approx(650.0, rel=REL)


def test_non_streamed_request_holds_back_the_intervals_it_overlaps() -> None:
    attributor = Attributor(prefill_weight=0.1)
    timeline = attributor.timeline
    attributor.open("n", 0.0, stream=False)
    attributor.open("s", 0.0, stream=True, prompt_tokens=0)
    attributor.tokens("s", 0.0, 0)
    timeline.add_energy_sample(0.0, 0.0)
    for i in range(1, 201):
        attributor.tokens("s", i / 100, 1)
        if i % 100 == 0:
            timeline.add_energy_sample(i / 100, i)
            assert attributor.advance() == []  # "n"'s weight is not known yet
    estimate = attributor.close("s", 2.0, 0, 200)
    assert estimate.method == "estimated"
    for t_s in (3.0, 4.0):
        timeline.add_energy_sample(t_s, 100.0 * t_s)
        assert attributor.advance(t_s) == []
    # 400 tokens over 4 s: the same 100 tokens/s as "s", so they halve 0-2 s.
    assert attributor.close("n", 4.0, 0, 400) == Estimate(pytest.approx(300.0), "measured")
    finals = {f.request_id: f for f in attributor.advance()}
    assert finals["s"].joules == pytest.approx(100.0, rel=REL)
    assert finals["n"].joules == pytest.approx(300.0, rel=REL)
    assert finals["s"].first_token_s == 0.0 and finals["n"].first_token_s is None
    assert all(f.method == "measured" for f in finals.values())
    assert_books_balance(attributor)


def test_estimate_before_the_covering_sample_then_measured_final() -> None:
    attributor = Attributor()
    timeline = attributor.timeline
    timeline.add_energy_sample(0.0, 0.0)
    attributor.open("r", 0.5, stream=True, prompt_tokens=50)
    for i in range(6, 26):
        attributor.tokens("r", i / 10, 1)
        if i % 10 == 0:
            timeline.add_energy_sample(i / 10, 10.0 * i)
            assert attributor.advance(i / 10) == []
    estimate = attributor.close("r", 2.5, 50, 20)
    assert estimate.method == "estimated"
    assert estimate.joules == pytest.approx(200.0, rel=1e-6)  # extrapolated at 100 W
    timeline.add_energy_sample(3.0, 330.0)  # the last half second ran hotter
    (final,) = attributor.advance(3.0)
    assert isinstance(final, Final)
    assert (final.request_id, final.method) == ("r", "measured")
    assert final.joules == pytest.approx(150.0 + 0.5 * 130.0, rel=REL)
    assert (final.prompt_tokens, final.completion_tokens) == (50, 20)
    assert (final.start_s, final.first_token_s, final.end_s) == (0.5, 0.6, 2.5)
    assert_books_balance(attributor)
    assert attributor.finalized_joules_idle == pytest.approx(330.0 - final.joules, rel=REL)


def test_close_is_measured_when_samples_already_cover_the_end() -> None:
    attributor = Attributor()
    attributor.timeline.add_energy_sample(0.0, 0.0)
    attributor.open("r", 0.2, stream=True)  # no prompt guess: waits for close's count
    attributor.tokens("r", 0.4, 3)
    attributor.timeline.add_energy_sample(1.0, 100.0)
    assert attributor.advance() == []
    estimate = attributor.close("r", 0.8, 10, 3)
    assert estimate == Estimate(pytest.approx(60.0), "measured")
    (final,) = attributor.advance()
    assert final.joules == estimate.joules


def test_a_prompt_guess_at_open_lets_intervals_settle_at_the_first_token() -> None:
    attributor = Attributor()
    attributor.timeline.add_energy_sample(0.0, 0.0)
    attributor.open("done", 0.0, stream=True, prompt_tokens=10)
    attributor.tokens("done", 0.1, 1)
    attributor.close("done", 0.5, 10, 1)
    attributor.open("guessed", 0.6, stream=True, prompt_tokens=100)
    attributor.open("unguessed", 0.6, stream=True)
    attributor.tokens("guessed", 0.7, 1)
    attributor.tokens("unguessed", 0.7, 1)
    attributor.timeline.add_energy_sample(1.0, 100.0)
    assert attributor.advance(1.0) == []  # "unguessed" has no prefill weight yet
    attributor.close("unguessed", 1.0, 100, 1)
    assert [f.request_id for f in attributor.advance(1.0)] == ["done", "unguessed"]
    assert_books_balance(attributor)


def test_weightless_requests_in_flight_split_equally() -> None:
    # Both requests wait between 1 s and 2 s: no tokens, no prefill; they halve it.
    requests = [ScheduledRequest("a", 0.0, 3.0, 0, 2, True, [(0.0, 0), (0.5, 1), (2.5, 1)]),
                ScheduledRequest("b", 0.0, 3.0, 0, 1, True, [(0.0, 0), (2.5, 1)])]
    joules, _ = attribute_schedule(watts(100.0, 3.0), requests, prefill_weight=0.0)
    assert joules["a"] == pytest.approx(100.0 + 50.0 + 50.0, rel=REL)
    assert joules["b"] == pytest.approx(0.0 + 50.0 + 50.0, rel=REL)


def test_power_samples_feed_attribution_too() -> None:
    samples = [(0.0, 100.0), (1.0, 300.0), (2.0, 300.0)]
    joules, idle_j = attribute_schedule(samples, [ScheduledRequest("a", 0.5, 1.5, 0, 5, False)],
                                        sample_kind="power_w")
    assert joules["a"] == pytest.approx(100.0 + 150.0, rel=REL)
    assert idle_j == pytest.approx(500.0 - 250.0, rel=REL)


def test_a_single_chunk_stream_is_weighed_like_a_non_streamed_one() -> None:
    requests = [ScheduledRequest("burst", 0.0, 2.0, 0, 200, True, [(2.0, 200)]),
                streamed("steady", 0.0, 0.0, 2.0, 100)]
    joules, _ = attribute_schedule(watts(100.0, 2.0), requests)
    assert joules["burst"] == pytest.approx(100.0, rel=REL)
    assert joules["steady"] == pytest.approx(100.0, rel=REL)


def test_samples_must_reach_every_end() -> None:
    with pytest.raises(ValueError, match="samples end before"):
        attribute_schedule(watts(100.0, 1.0), [ScheduledRequest("a", 0.0, 2.0, 0, 1, False)])


def test_late_events_land_in_the_next_open_interval() -> None:
    attributor = Attributor(prefill_weight=0.0)
    attributor.timeline.add_energy_sample(0.0, 0.0)
    attributor.open("a", 0.0, stream=True)
    attributor.tokens("a", 0.0, 0)
    attributor.timeline.add_energy_sample(1.0, 100.0)
    attributor.advance(1.0)
    attributor.open("b", 0.5, stream=True)  # reported after 0-1 s was settled
    attributor.tokens("b", 0.6, 0)
    attributor.tokens("a", 1.5, 10)
    attributor.tokens("b", 0.9, 10)  # counts with b's decode time in 1-2 s
    attributor.close("a", 2.0, 0, 10)
    attributor.close("b", 2.0, 0, 10)
    attributor.timeline.add_energy_sample(2.0, 200.0)
    finals = {f.request_id: f.joules for f in attributor.advance(2.0)}
    assert finals == {"a": pytest.approx(150.0), "b": pytest.approx(50.0)}
    assert_books_balance(attributor)


def test_an_id_reused_while_its_namesake_settles_is_a_new_request() -> None:
    attributor = Attributor(prefill_weight=0.0)
    attributor.timeline.add_energy_sample(0.0, 0.0)
    attributor.open("x", 0.0, stream=True)
    attributor.tokens("x", 0.1, 0)
    attributor.close("x", 0.4, 0, 0)  # failed: the client retries with the same id
    attributor.open("x", 0.5, stream=True)
    attributor.tokens("x", 0.6, 0)
    attributor.tokens("x", 0.8, 5)
    attributor.close("x", 1.0, 0, 5)
    attributor.timeline.add_energy_sample(1.0, 100.0)
    first, second = attributor.advance(1.0)
    assert (first.end_s, first.joules) == (0.4, pytest.approx(40.0))
    assert (second.end_s, second.joules) == (1.0, pytest.approx(50.0))
    assert attributor._requests == {} and attributor._alias == {}
    assert_books_balance(attributor)


def test_misuse_is_loud_and_strays_are_ignored() -> None:
    attributor = Attributor()
    attributor.open("a", 0.0, stream=True)
    with pytest.raises(ValueError):
        attributor.open("a", 0.1, stream=True)
    attributor.tokens("nobody", 0.2, 5)
    with pytest.raises(KeyError):
        attributor.close("nobody", 1.0, 0, 0)
    assert attributor.open_requests == 1
    with pytest.raises(ValueError):
        Attributor(idle="sometimes")  # type: ignore[arg-type]


def test_stalled_non_streamed_request_is_forced_after_max_pending() -> None:
    attributor = Attributor(max_pending_s=5.0)
    attributor.open("stuck", 0.0, stream=False, prompt_tokens=10)
    finals: list[Final] = []
    for i in range(21):
        t_s = float(i)
        if i < 20:
            attributor.open(f"s{i}", t_s, stream=True, prompt_tokens=5)
            attributor.tokens(f"s{i}", t_s + 0.2, 4)
            attributor.close(f"s{i}", t_s + 0.5, 5, 4)
        attributor.timeline.add_energy_sample(t_s, 100.0 * t_s)
        finals += attributor.advance(t_s)
    assert attributor.finalized_until_s == pytest.approx(15.0)
    assert {f.request_id for f in finals} == {f"s{i}" for i in range(15)}
    assert all(f.method == "measured" for f in finals)
    assert attributor.close("stuck", 20.0, 10, 30).method == "estimated"
    finals = {f.request_id: f for f in attributor.advance(20.0)}
    assert set(finals) == {"stuck"} | {f"s{i}" for i in range(15, 20)}
    assert finals["stuck"].method == "estimated"  # its weights in 0-15 s were provisional
    assert finals["s19"].method == "measured"
    assert_books_balance(attributor)
    assert attributor._requests == {} and attributor._unknown == {}


def test_requests_whose_samples_never_come_are_given_up_on() -> None:
    attributor = Attributor(max_pending_s=5.0)
    attributor.timeline.add_energy_sample(0.0, 0.0)
    attributor.timeline.add_energy_sample(1.0, 100.0)
    attributor.open("r", 1.5, stream=True, prompt_tokens=10)
    attributor.tokens("r", 1.6, 1)
    attributor.close("r", 2.0, 10, 1)
    assert attributor.advance(6.0) == []
    (final,) = attributor.advance(7.5)
    assert final.method == "estimated" and final.joules == pytest.approx(50.0)
    assert attributor._requests == {}


def test_requests_in_a_modelled_span_settle_estimated_and_the_books_balance() -> None:
    timeline = EnergyTimeline()
    attributor = Attributor(timeline, prefill_weight=0.0)
    for t_s, e_j in watts(100.0, 2.0):
        timeline.add_energy_sample(t_s, e_j)
    attributor.open("before", 0.0, stream=False)
    attributor.close("before", 1.5, 0, 10)
    attributor.open("during", 2.5, stream=False)
    attributor.close("during", 3.5, 0, 10)
    attributor.open("after", 5.5, stream=False)
    attributor.close("after", 6.5, 0, 10)
    timeline.add_modelled_power(4.0, 80.0)  # the source went silent after 2 s
    attributor.mark_modelled(2.0, 4.0)
    timeline.add_energy_sample(5.0, 123.0)  # back: re-bases; the step to it is modelled too
    attributor.mark_modelled(4.0, 5.0)
    timeline.add_energy_sample(7.0, 323.0)
    finals = {f.request_id: f for f in attributor.advance()}
    assert finals["before"].method == "measured"
    assert finals["during"].method == "estimated"
    assert finals["during"].joules == pytest.approx(80.0)
    assert finals["after"].method == "measured"
    assert finals["after"].joules == pytest.approx(100.0)
    assert_books_balance(attributor)


def test_per_request_state_stays_bounded_over_a_long_run() -> None:
    attributor = Attributor(EnergyTimeline(max_age_s=30.0), max_pending_s=20.0)
    timeline = attributor.timeline
    finals = 0
    for i in range(20_000):
        t_s = i / 10
        request_id = f"r{i}"
        attributor.open(request_id, t_s + 0.01, stream=i % 3 != 0, prompt_tokens=20)
        for k in range(2, 7):
            attributor.tokens(request_id, t_s + k / 100, 2)
        attributor.close(request_id, t_s + 0.08, 20, 10)
        timeline.add_energy_sample(t_s + 0.1, 40.0 * i)
        finals += len(attributor.advance(t_s + 0.1))
        if i % 1000 == 0:
            assert len(attributor._requests) <= 1
            assert len(attributor._unknown) == 0
            assert len(attributor._ready) == 0
    assert finals == 20_000
    assert len(timeline) <= 302
    assert len(timeline._t_s) <= 2 * 1024 + 302
    assert_books_balance(attributor)


# -- conservation on random schedules ----------------------------------------------------------


@st.composite
def schedules(draw: st.DrawFn) -> tuple[list, list[ScheduledRequest], str, float, str]:
    kind = draw(st.sampled_from(["energy_j", "power_w"]))
    idle = draw(st.sampled_from(["separate", "share"]))
    prefill_weight = draw(st.sampled_from([0.0, 0.1, 1.0]))
    requests = []
    for n in range(draw(st.integers(0, 8))):
        start_s = draw(st.floats(0.0, 20.0))
        end_s = start_s + draw(st.floats(0.0, 10.0))
        stream = draw(st.booleans())
        prompt = draw(st.integers(0, 2000))
        times = sorted(draw(st.lists(st.floats(start_s, end_s), max_size=12)))
        counts = draw(st.lists(st.integers(0, 5), min_size=len(times), max_size=len(times)))
        arrivals = list(zip(times, counts, strict=True)) if stream else []
        requests.append(ScheduledRequest(f"r{n}", start_s, end_s, prompt, sum(counts), stream,
                                         arrivals))
    times = sorted(set(draw(st.lists(st.floats(-1.0, 32.0), min_size=1, max_size=30))))
    times.append(32.0 + draw(st.floats(0.01, 2.0)))  # always past every end
    samples, value = [], draw(st.floats(0.0, 1e6))
    for t_s in times:
        if kind == "power_w":
            value = draw(st.floats(0.0, 700.0))
        elif draw(st.integers(0, 9)) == 0:
            value = draw(st.floats(0.0, 100.0))  # counter reset
        else:
            value += draw(st.floats(0.0, 500.0))
        samples.append((t_s, value))
    return samples, requests, idle, prefill_weight, kind


def measured_j(samples: list[tuple[float, float]], kind: str) -> float:
    timeline = EnergyTimeline(max_age_s=math.inf)
    for t_s, value in samples:
        if kind == "energy_j":
            timeline.add_energy_sample(t_s, value)
        else:
            timeline.add_power_sample(t_s, value)
    return timeline.joules_between(samples[0][0], samples[-1][0])


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedules())
def test_random_schedules_conserve_energy(case: tuple) -> None:
    samples, requests, idle, prefill_weight, kind = case
    joules, idle_j = attribute_schedule(samples, requests, prefill_weight, idle,
                                        sample_kind=kind)
    assert set(joules) == {r.request_id for r in requests}
    assert all(j >= -1e-9 for j in joules.values())
    total_j = measured_j(samples, kind)
    assert math.fsum(joules.values()) + idle_j == pytest.approx(total_j, rel=REL, abs=1e-6)


def slice_by_slice(samples: list[tuple[float, float]], requests: list[ScheduledRequest],
                   prefill_weight: float, kind: str) -> dict[str, float]:
    """The method spelled out, slow: cut every interval at every boundary, split each slice."""
    timeline = EnergyTimeline(max_age_s=math.inf)
    for t_s, value in samples:
        (timeline.add_energy_sample if kind == "energy_j" else timeline.add_power_sample)(
            t_s, value)
    points = list(zip(timeline._t_s, timeline._e_j, strict=True))
    joules = {r.request_id: 0.0 for r in requests}
    queues = {r.request_id: [a for a in r.token_arrivals if a[1] > 0] for r in requests}
    for (a_s, a_j), (b_s, b_j) in zip(points, points[1:], strict=False):
        power_w = (b_j - a_j) / (b_s - a_s)
        pieces: list[tuple[str, float, float, float]] = []  # (id, from s, to s, weight/s)
        flights: list[tuple[str, float, float]] = []
        for r in requests:
            if r.start_s >= b_s or r.end_s <= a_s:
                continue
            lo_s, hi_s = max(r.start_s, a_s), min(r.end_s, b_s)
            flights.append((r.request_id, lo_s, hi_s))
            first_s = r.token_arrivals[0][0] if r.token_arrivals else r.end_s
            span_s = r.end_s - r.start_s
            if not r.stream or (first_s >= r.end_s and r.completion_tokens > 0):
                weight = prefill_weight * r.prompt_tokens + r.completion_tokens
                if span_s >= 1e-9 and weight > 0:
                    pieces.append((r.request_id, lo_s, hi_s, weight / span_s))
                continue
            prefill_s = first_s - r.start_s
            if first_s > a_s and prefill_s >= 1e-9 and prefill_weight * r.prompt_tokens > 0:
                pieces.append((r.request_id, lo_s, min(first_s, b_s),
                               prefill_weight * r.prompt_tokens / prefill_s))
            dlo_s = max(first_s, a_s)
            if hi_s - dlo_s >= 1e-9:
                queue = queues[r.request_id]
                count = sum(c for t, c in queue if t <= b_s)
                queues[r.request_id] = [(t, c) for t, c in queue if t > b_s]
                if count:
                    pieces.append((r.request_id, dlo_s, hi_s, count / (hi_s - dlo_s)))
        cuts = sorted({a_s, b_s, *(p[1] for p in pieces), *(p[2] for p in pieces),
                       *(f[1] for f in flights), *(f[2] for f in flights)})
        for c0, c1 in zip(cuts, cuts[1:], strict=False):
            slice_j = power_w * (c1 - c0)
            here = [p for p in pieces if p[1] <= c0 and p[2] >= c1]
            flying = [f for f in flights if f[1] <= c0 and f[2] >= c1]
            total_w = sum(p[3] for p in here)
            if here:
                for request_id, _, _, density in here:
                    joules[request_id] += slice_j * density / total_w
            elif flying:
                for request_id, _, _ in flying:
                    joules[request_id] += slice_j / len(flying)
    return joules


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedules())
def test_the_sweep_matches_the_slice_by_slice_method(case: tuple) -> None:
    samples, requests, _idle, prefill_weight, kind = case
    # The brute force assumes uniform power within a sample interval: compare like with like.
    joules, _ = attribute_schedule(samples, requests, prefill_weight, "separate",
                                   sample_kind=kind, learn_idle_power=False)
    expected = slice_by_slice(samples, requests, prefill_weight, kind)
    # Shares below a billionth of the whole interval's energy are rounding, not attribution.
    scale_j = measured_j(samples, kind)
    for request_id, joules_j in expected.items():
        assert joules[request_id] == pytest.approx(joules_j, rel=1e-6, abs=1e-9 * scale_j + 1e-12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedules(), st.sampled_from([900.0, 2.0]))
def test_live_calls_keep_the_books_balanced_at_every_step(case: tuple,
                                                         max_pending_s: float) -> None:
    samples, requests, idle, prefill_weight, kind = case
    attributor = Attributor(prefill_weight=prefill_weight, idle=idle, max_pending_s=max_pending_s)
    timeline = attributor.timeline
    add = timeline.add_energy_sample if kind == "energy_j" else timeline.add_power_sample
    events: list[tuple[float, int, object]] = []
    for r in requests:
        events.append((r.start_s, 0, r))
        events.extend((t_s, 1, (r.request_id, count)) for t_s, count in r.token_arrivals)
        events.append((r.end_s, 2, r))
    events.extend((t_s, 3, value) for t_s, value in samples)
    events.sort(key=lambda e: (e[0], e[1]))
    finals: dict[str, Final] = {}
    for t_s, order, payload in events:
        if order == 0:
            attributor.open(payload.request_id, t_s, payload.stream,
                            payload.prompt_tokens if payload.request_id[-1] in "02468" else 0)
        elif order == 1:
            attributor.tokens(payload[0], t_s, payload[1])
        elif order == 2:
            estimate = attributor.close(payload.request_id, t_s, payload.prompt_tokens,
                                        payload.completion_tokens)
            assert math.isfinite(estimate.joules) and estimate.joules >= -1e-9
        else:
            add(t_s, payload)
            finals.update((f.request_id, f) for f in attributor.advance(t_s))
            assert_books_balance(attributor)
    assert set(finals) == {r.request_id for r in requests}
    assert attributor._requests == {} and attributor._unknown == {}
    if all(f.method == "measured" for f in finals.values()):
        assert math.fsum(f.joules for f in finals.values()) == pytest.approx(
            attributor.finalized_joules_attributed, rel=REL, abs=1e-6)


def test_partly_idle_interval_books_its_idle_part_at_the_learned_idle_power() -> None:
    """1 s samples, 100 W idle: a request busy for the second half of an interval at 500 W."""
    a = Attributor(prefill_weight=0.0)
    tl = a.timeline
    tl.add_energy_sample(0.0, 0.0)
    tl.add_energy_sample(1.0, 100.0)  # wholly idle: learns 100 W
    a.advance(1.0)
    assert a.idle_w == pytest.approx(100.0)
    a.open("r", 1.5, stream=False, prompt_tokens=0)
    a.close("r", 2.0, 0, 10)
    tl.add_energy_sample(2.0, 100.0 + 50.0 + 250.0)  # 0.5 s idle at 100 W, 0.5 s busy at 500 W
    tl.add_energy_sample(3.0, 500.0)
    finals = {f.request_id: f.joules for f in a.advance(3.0)}
    # Uniform power would have given the request half of 300 J; it drew 250 J.
    assert finals["r"] == pytest.approx(250.0)
    assert a.finalized_joules_attributed + a.finalized_joules_idle == pytest.approx(500.0)


def feed(att: Attributor, samples: list[tuple[float, float]]) -> dict[str, float]:
    """Counter readings into a live attributor: the final joules of each request settled."""
    finals = {}
    for t_s, e_j in samples:
        att.timeline.add_energy_sample(t_s, e_j)
        finals.update((f.request_id, f.joules) for f in att.advance(t_s))
    return finals


def test_a_non_streamed_request_is_placed_where_the_streams_saw_steps() -> None:
    # One stream shows the backend's decode steps: 5 in (0.5, 1], a stall with 2 in (1, 2],
    # 10 in each of the next two seconds. A non-streamed request decoding beside it got a token
    # per step too: its 20 tokens lie where those 27 steps were, not evenly over its lifetime.
    att = Attributor(EnergyTimeline(max_age_s=math.inf), prefill_weight=0.0, max_pending_s=math.inf)
    att.open("s", 0.0, True, 0)
    att.open("n", 0.0, False, 0)
    arrivals = [(0.5, 1), *[(0.5 + 0.1 * i, 1) for i in range(1, 6)], (1.5, 1), (2.0, 1),
                *[(2.0 + 0.1 * i, 1) for i in range(1, 11)], *[(3.0 + 0.1 * i, 1) for i in range(1, 11)]]
    for t_s, n in arrivals:
        att.tokens("s", t_s, n)
    att.close("s", 4.0, 0, len(arrivals))
    att.close("n", 4.0, 0, 20)
    finals = feed(att, watts(100.0, 4.0))
    stream_w = [6, 2, 10, 10]
    placed_w = [20 * s / 27 for s in (5, 2, 10, 10)]
    # Over [0, 0.5] neither weighs anything (no prompt): those 50 J are split evenly.
    expected = 25.0 + 50.0 * placed_w[0] / (placed_w[0] + stream_w[0]) + math.fsum(
        100.0 * n / (n + s) for n, s in zip(placed_w[1:], stream_w[1:], strict=True))
    assert finals["n"] == pytest.approx(expected, rel=1e-9)
    assert finals["n"] + finals["s"] == pytest.approx(400.0, rel=1e-12)


def test_decode_tokens_lie_where_the_backend_stepped_not_through_a_stall() -> None:
    # "d" decodes a step every 10 ms, but its steps stall over (0.5, 0.9] while "p" prefills
    # (1000 prompt tokens x 0.1 = 100). The clock counts 50 steps before the stall, then
    # (two streams decoding from 0.9 on, p silent) 1/2 for the stall and 5 after: d's 62 tokens
    # go 50 : 0.5 : 5, so through the stall d weighs 62 * 0.5 / 55.5, not 62 * 0.4: the
    # prefill takes that stretch's energy, as it did on the GPU.
    att = Attributor(EnergyTimeline(max_age_s=math.inf), prefill_weight=0.1, max_pending_s=math.inf)
    att.open("d", 0.0, True, 0)
    att.tokens("d", 0.0, 1)
    for i in range(1, 51):
        att.tokens("d", i / 100, 1)
    att.open("p", 0.5, True, 1000)
    att.tokens("p", 0.9, 1)
    for i in range(0, 11):
        att.tokens("d", (90 + i) / 100, 1)
    att.close("d", 1.0, 0, 62)
    att.close("p", 1.0, 1000, 1)
    finals = feed(att, watts(100.0, 1.0))
    d_stall, d_after = 62 * 0.5 / 55.5 / 0.4, 62 * 5 / 55.5 / 0.1  # d's densities (weight/s)
    p_prefill, p_after = 100 / 0.4, 1 / 0.1
    assert finals["p"] == pytest.approx(40.0 * p_prefill / (p_prefill + d_stall)
                                        + 10.0 * p_after / (p_after + d_after), rel=1e-9)
    assert finals["d"] + finals["p"] == pytest.approx(100.0, rel=1e-12)


def test_a_queued_streams_prompt_weighs_in_the_step_before_its_first_token() -> None:
    # "q" waits 0.89 s in the queue while "d" decodes a token every 10 ms; its 1000-token
    # prompt (weight 100) went through in the step that ended with its first token at 0.9 s.
    # Spread over its wait it would take about half of those 89 J; there it takes about 2 J.
    att = Attributor(EnergyTimeline(max_age_s=math.inf), prefill_weight=0.1, max_pending_s=math.inf)
    att.open("d", 0.0, True, 0)
    att.open("q", 0.0, True, 1000)
    att.tokens("d", 0.0, 1)
    for i in range(1, 101):
        att.tokens("d", i / 100, 1)
        if i == 90:
            att.tokens("q", 0.9, 1)
    att.close("d", 1.0, 0, 101)
    att.close("q", 1.0, 1000, 1)
    finals = feed(att, watts(100.0, 1.0))
    assert 1.0 < finals["q"] < 3.0
    assert finals["d"] + finals["q"] == pytest.approx(100.0, rel=1e-12)


def _stepping(offset_s: float) -> dict[str, float]:
    """Eight streams decode a step every 40 ms (ending 15 ms past each 40 ms mark, clear of
    the 100 ms samples), the i-th reading its token of each step `offset_s` x i late; a prompt
    "q" (weight 100) goes through in the step that ends at 1.015 s, an embedding "e" (weight
    40) in the one that ends at 1.335 s."""
    att = Attributor(EnergyTimeline(max_age_s=math.inf), prefill_weight=0.1, max_pending_s=math.inf)
    for i in range(8):
        att.open(f"s{i}", 0.0, True, 0)
    att.open("q", 0.5, True, 1000)
    att.open("e", 1.295, False, 400, embedding=True)
    for k in range(51):
        for i in range(8):
            att.tokens(f"s{i}", 0.015 + 0.04 * k + offset_s * i, 1)
        if k == 25:
            att.tokens("q", 1.015 + offset_s * 8, 1)
    att.close("e", 1.335, 400, 0)  # read first: a late read stretches its window (not this test's)
    for i in range(8):
        att.close(f"s{i}", 2.015 + offset_s * i, 0, 51)
    att.close("q", 2.015 + offset_s * 8, 1000, 1)
    return feed(att, watts(100.0, 2.2, 0.1))


def test_a_steps_tokens_read_milliseconds_apart_are_still_one_step() -> None:
    # The event loop reads one step's tokens from its streams one after the other: under load
    # they reach the attributor milliseconds apart. That spread is delivery, not stepping: it
    # must not squeeze the decode work into the few ms after each step (where a prompt or an
    # embedding beside it would then look like the only work in the rest of the step).
    together, apart = _stepping(0.0), _stepping(0.0005)
    for rid in ("q", "e", "s0"):
        assert apart[rid] == pytest.approx(together[rid], rel=0.05), rid
    # The answers read up to 4 ms later keep the GPU busy that much longer: 100 W x 4 ms.
    assert math.fsum(apart.values()) - math.fsum(together.values()) == pytest.approx(0.4, abs=0.05)
