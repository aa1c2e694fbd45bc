"""A cold start settled again once the split weights are learned (restate.py): pure, in
virtual time, against a hand-made timeline and against the simulator's physics."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from bench.attribution import make_plan
from bench.attribution_virtual import figures, replay
from proxy.config import BackendConfig, Config, PowerConfig
from proxy.energy.attribution import Attributor, Final
from proxy.energy.attribution.restate import ColdStart
from proxy.energy.attribution.weights import TokenWeights
from proxy.energy.learn import SplitWeights
from proxy.energy.meter import BackendMeter, EnergyMeter
from proxy.energy.sources import PowerSample
from proxy.energy.timeline import EnergyTimeline

LEARNED = TokenWeights(prefill_weight=0.2, prefill_weight_sq=1e-5, decode_context_weight=1e-4,
                       step_weight=4.0)


def traffic(call: Callable[..., object], advance: Callable[[float], list[Final]],
            timeline: EnergyTimeline) -> list[Final]:
    """Six requests over 3 s on a backend drawing 300 W busy, 60 W idle, sampled every 0.1 s:
    streams with a first token and chunks, a non-streamed answer, an embedding, one left
    open at the end. Returns the finals `advance` handed out, in order."""
    out: list[Final] = []
    energy_j, t_s = 0.0, 0.0
    opened = {"a": (0.05, True, 40, False), "b": (0.3, True, 3000, False), "c": (0.5, False, 200, False),
              "d": (0.9, False, 500, True), "e": (1.4, True, 80, False), "f": (2.7, True, 30, False)}
    firsts = {"a": 0.2, "b": 0.8, "e": 1.6, "f": 2.85}
    ends = {"a": (1.5, 40, 30), "b": (2.2, 3000, 60), "c": (1.9, 200, 50), "d": (1.0, 500, 0),
            "e": (2.5, 80, 20)}
    timeline.add_energy_sample(0.0, 0.0)
    for i in range(1, 31):
        t_s, lo_s = i / 10, (i - 1) / 10  # exact neighbours: each event in one interval
        for rid, (at_s, stream, prompt, embedding) in opened.items():
            if lo_s <= at_s < t_s:
                call("open", rid, at_s, stream, prompt, embedding)
        for rid, first_s in firsts.items():
            end_s = ends.get(rid, (9.0, 0, 0))[0]
            # a first token, then a chunk of 2 every 0.1 s until the end
            k = 0
            while first_s + k / 10 < min(end_s, t_s):
                tok_s = first_s + k / 10
                if lo_s <= tok_s < t_s:
                    call("tokens", rid, tok_s, 1 if k == 0 else 2)
                k += 1
        for rid, (end_s, prompt, completion) in ends.items():
            if lo_s <= end_s < t_s:
                call("close", rid, end_s, prompt, completion)
        busy = any(opened[r][0] < t_s and ends.get(r, (9.0,))[0] > lo_s for r in opened)
        energy_j += (300.0 if busy else 60.0) * 0.1
        timeline.add_energy_sample(t_s, energy_j)
        out.extend(advance(t_s))
    return out


def test_the_replay_settles_as_if_the_learned_weights_had_been_there_from_the_start() -> None:
    known = Attributor(EnergyTimeline(), prefill_weight=0.05)
    known.weights = LEARNED
    expected = traffic(lambda name, *a: getattr(known, name)(*a), known.advance, known.timeline)
    assert {f.request_id for f in expected} == {"a", "b", "c", "d", "e"}

    timeline = EnergyTimeline()
    live = Attributor(timeline, prefill_weight=0.05)
    cold = ColdStart(hold_s=60.0, min_windows=40.0)

    def call(name: str, *args: object) -> object:
        cold.record(name, *args)
        return getattr(live, name)(*args)

    def advance(now_s: float) -> list[Final]:
        cold.record("advance", now_s, timeline.last_sample_s)
        got = live.advance(now_s)
        _, out, over = cold.settle(live, got, lambda: LEARNED, 0.0, now_s, make)
        assert out == [] and not over  # held while the weights are the prior
        return out

    def make() -> Attributor:
        return Attributor(timeline, prefill_weight=0.05)

    assert traffic(call, advance, timeline) == []
    assert len(cold.held) == 5
    prior = {f.request_id: f.joules for f in cold.held}
    fresh, out, over = cold.settle(live, [], lambda: LEARNED, 40.0, 3.0, make)
    assert over and fresh is not live and fresh.weights == LEARNED
    assert [f.request_id for f in out] == [f.request_id for f in expected]
    for got, want in zip(out, expected, strict=True):
        assert math.isclose(got.joules, want.joules, rel_tol=1e-12)
        assert got.method == want.method
    # The weights changed the split: the embedding and the long prompt cost more than the prior said.
    restated = {f.request_id: f.joules for f in out}
    assert restated["d"] > prior["d"] * 1.05 and restated["b"] > prior["b"]
    assert all(f.method == "measured" for f in out)
    # The replacement carries on: the open request settles there, once.
    fresh.close("f", 3.05, 30, 3)
    timeline.add_energy_sample(3.1, timeline.energy_j(3.0) + 30.0)
    assert [f.request_id for f in fresh.advance(3.1)] == ["f"]
    books = fresh.books
    assert math.isclose(books.attributed_j + books.idle_j, books.measured_j, rel_tol=1e-12)


def test_a_replay_in_small_chunks_settles_the_same() -> None:
    """Each `settle` replays a chunk: until it has caught up, the live attributor stays."""
    known = Attributor(EnergyTimeline(), prefill_weight=0.05)
    known.weights = LEARNED
    expected = traffic(lambda name, *a: getattr(known, name)(*a), known.advance, known.timeline)

    timeline = EnergyTimeline()
    live = Attributor(timeline, prefill_weight=0.05)
    cold = ColdStart(chunk_events=25)

    def call(name: str, *args: object) -> object:
        cold.record(name, *args)
        return getattr(live, name)(*args)

    def advance(now_s: float) -> list[Final]:
        cold.record("advance", now_s, timeline.last_sample_s)
        return live.advance(now_s)

    cold.held.extend(traffic(call, advance, timeline))
    recorded_n = len(cold.events)
    calls, over, attributor = 0, False, live
    while not over:
        attributor, out, over = cold.settle(live, [], lambda: LEARNED, 40.0, 3.0,
                                            lambda: Attributor(timeline, prefill_weight=0.05))
        calls += 1
        assert over or (attributor is live and out == [])
    assert calls == math.ceil(recorded_n / 25) > 3
    assert [(f.request_id, round(f.joules, 9)) for f in out] == [(f.request_id, round(f.joules, 9)) for f in expected]


def test_held_finals_go_out_as_settled_when_the_weights_are_not_learned_in_time() -> None:
    timeline = EnergyTimeline()
    live = Attributor(timeline, prefill_weight=0.05)
    cold = ColdStart(hold_s=1.0, min_windows=40.0)
    out: list[Final] = []

    def call(name: str, *args: object) -> object:
        cold.record(name, *args)
        return getattr(live, name)(*args)

    def advance(now_s: float) -> list[Final]:
        nonlocal cold_over
        if cold_over:
            got = live.advance(now_s)
            out.extend(got)
            return got
        cold.record("advance", now_s, timeline.last_sample_s)
        attributor, got, cold_over = cold.settle(live, live.advance(now_s), lambda: None, 3.0,
                                                 now_s, lambda: Attributor(timeline))
        assert attributor is live
        out.extend(got)
        return got

    cold_over = False
    traffic(call, advance, timeline)
    # "d" ended at 1.0 s (the first held); its hold ran out after 2.0 s: everything held so far
    # went out then, each once, and later finals directly.
    assert cold_over
    assert sorted(f.request_id for f in out) == ["a", "b", "c", "d", "e"]


def test_restating_a_busy_cold_start_brings_tenant_totals_closer_to_the_physics() -> None:
    """The simulator's truth (its own physics, not the split's) on a cold, busy backend:
    restated, the largest per-tenant error and the per-request p90 both fall (seeds 1 and 2)."""
    for seed in (1, 2):
        plan = make_plan(600, seed)
        kept, _ = replay(plan, "h100-llama3.1-8b", 0.1, True, 16, learn=True, restate=False)
        restated, cons = replay(plan, "h100-llama3.1-8b", 0.1, True, 16, learn=True, restate=True)
        assert set(restated) == set(kept)  # every request settled, once
        assert abs(cons) < 1e-6
        _, tenant_kept, _, p90_kept = figures(list(kept.values()))
        _, tenant_restated, _, p90_restated = figures(list(restated.values()))
        assert tenant_restated < tenant_kept - 0.2, (seed, tenant_kept, tenant_restated)
        assert p90_restated is not None and p90_kept is not None and p90_restated < p90_kept


class _StubLearner:
    """Stands in for SplitLearner: its weights are set by the test."""

    def __init__(self) -> None:
        self.weights = SplitWeights(0.05)

    def open(self, *_: object) -> None: ...
    def tokens(self, *_: object) -> None: ...
    def close(self, *_: object) -> None: ...
    def interval(self, *_: object) -> None: ...

    def early_weights(self, _min_windows: float) -> SplitWeights | None:
        return self.weights if self.weights.learned else None


def _meter(finals: list[Final]) -> tuple[EnergyMeter, BackendMeter]:
    power = PowerConfig(source="dcgm", url="http://127.0.0.1:9/metrics")
    config = Config(backends=[BackendConfig(name="gpu", url="http://127.0.0.1:9/v1", power=power)])
    energy = EnergyMeter(config, lambda _backend, final: finals.append(final))
    meter = energy.meters["gpu"]
    meter.learner = _StubLearner()  # type: ignore[assignment]
    return energy, meter


def _sample(meter: BackendMeter, t_s: float, power_w: float = 300.0) -> None:
    last_s = meter.timeline.last_sample_s
    e_j = 0.0 if last_s is None else meter.timeline.energy_j(last_s) + power_w * (t_s - last_s)
    meter._on_sample(PowerSample(t_s, e_j, power_w))


def test_the_live_meter_holds_the_cold_finals_and_books_them_once_restated() -> None:
    finals: list[Final] = []
    energy, meter = _meter(finals)
    cold_attributor = meter.attributor
    t0 = time.time()  # the meter reads the wall clock for the hold's deadlines
    _sample(meter, t0)
    energy.open("gpu", "long", t0 + 0.01, True, 50)  # in flight throughout: the backend never idles
    for k in range(16):  # decoding from 0.05 s on, a chunk every 50 ms
        energy.tokens("gpu", "long", t0 + 0.05 * (k + 1), 1 if k == 0 else 2)
        if k == 1:
            energy.open("gpu", "r1", t0 + 0.11, True, 4000)  # its prefill while "long" decodes
        if k == 6:
            energy.tokens("gpu", "r1", t0 + 0.351, 1)
        if k == 7:
            energy.tokens("gpu", "r1", t0 + 0.401, 2)
    result = energy.close_request("gpu", "r1", t0 + 0.45, 4000, 3, embedding=False)
    assert result is not None and result.method == "estimated"
    for i in range(1, 8):
        _sample(meter, t0 + i / 10)
    assert finals == [] and meter.cold is not None and len(meter.cold.held) == 1  # settled, held
    prior_j = meter.cold.held[0].joules

    meter.learner.weights = SplitWeights(0.2, learned=True, intervals=40.0)  # type: ignore[union-attr]
    _sample(meter, t0 + 0.8)
    assert [f.request_id for f in finals] == ["r1"] and finals[0].method == "measured"
    assert finals[0].joules > prior_j  # a prompt token weighs 0.2 now, not 0.05
    assert meter.cold is None and meter.attributor is not cold_attributor
    assert meter.attributor.prefill_weight == 0.2

    # The replacement carries on with the request still in flight: booked once, there.
    energy.close_request("gpu", "long", t0 + 0.85, 50, 31, embedding=False)
    _sample(meter, t0 + 0.9)
    assert [f.request_id for f in finals] == ["r1", "long"]
    books = meter.attributor.books
    assert math.isclose(books.attributed_j + books.idle_j, books.measured_j, rel_tol=1e-9)
    assert math.isclose(books.measured_j, 300.0 * 0.9, rel_tol=1e-6)  # times near 1.8e9 s


def test_a_stopping_proxy_books_the_finals_it_held() -> None:
    finals: list[Final] = []
    energy, meter = _meter(finals)
    t0 = time.time()
    _sample(meter, t0)
    energy.open("gpu", "long", t0 + 0.01, True, 50)
    energy.tokens("gpu", "long", t0 + 0.05, 1)
    energy.open("gpu", "r1", t0 + 0.02, False, 300)
    energy.close_request("gpu", "r1", t0 + 0.25, 300, 20, embedding=False)
    for i in range(1, 5):
        _sample(meter, t0 + i / 10)
    assert finals == [] and meter.cold is not None and meter.cold.held
    asyncio.run(energy.close())
    assert [f.request_id for f in finals] == ["r1"]  # the prior's split: nothing was learned
