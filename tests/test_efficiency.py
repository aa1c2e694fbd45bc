"""Efficiency routing, its learned model, the virtual-time fleet simulator and trace synthesis."""

from __future__ import annotations

import copy
import csv
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies.base import BackendView, RequestInfo
from policies.curves import KNOTS, knot_of, segment_of
from policies.efficiency import Efficiency
from policies.least_loaded import LeastLoaded
from policies.model import EfficiencyModel, LoadTracker
from policies.round_robin import RoundRobin
from proxy.sim.engine import Engine, Request
from proxy.sim.fleet import (
    FleetError,
    backend_capacity_rps,
    parse_fleet,
    simulate,
)
from proxy.sim.profiles import get_profile
from proxy.sim.simulate_cli import main_simulate
from proxy.sim.traces import (
    TraceError,
    TraceRequest,
    main_trace,
    read_trace,
    synth_trace,
    write_trace,
)

REQ = RequestInfo(model="llama-3.1-8b")
H100, A100, L4 = (get_profile(f"{g}-llama3.1-8b") for g in ("h100", "a100", "l4"))


def view(name: str, load: int = 0, **kw: object) -> BackendView:
    return BackendView(name=name, healthy=kw.pop("healthy", True), in_flight=load, **kw)  # type: ignore[arg-type]


def trained(idle_w: float, p1_w: float, w_per_doubling: float, step_s: float, slope_s: float,
            *, ttft_per_wait_s: float = 0.05, top: int = 128, t_s: float = 0.0) -> EfficiencyModel:
    """A model fed synthetic observations of a GPU with these curves, at loads 0..top."""
    m = EfficiencyModel()
    for i in range(40):
        m.observe_interval(0, idle_w, 0.0, t_s + 0.1 * i, in_flight=0)
    n_levels = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if n <= top]
    for rep in range(30):
        for n in n_levels:
            power = p1_w + w_per_doubling * math.log2(n)
            rate = n / (step_s + slope_s * n)
            # At its max batch `top` the engine has a queue behind the batch.
            m.observe_interval(n, power, rate, t_s + 10 + rep, in_flight=2 * n if n == top else n)
            q = max(1, n // 8)
            m.observe_request(n, t_s + 10 + rep, ttft_s=0.05 + ttft_per_wait_s * q,
                              tpot_s=step_s + slope_s * n, waiting=q)
    m.refresh()
    return m


def h100_like() -> EfficiencyModel:
    return trained(110, 366, 40, 0.0068, 0.000089, top=256)


def l4_like() -> EfficiencyModel:
    return trained(25, 55, 3.5, 0.060, 0.00073, ttft_per_wait_s=0.4, top=32)


# -- the three policies on hand-built views ----------------------------------------------------


def test_round_robin_and_least_loaded_known_answers() -> None:
    views = [view("a", 5), view("b", 1), view("c", 3)]
    rr = RoundRobin()
    assert [rr.choose(REQ, views, 0.0) for _ in range(4)] == ["a", "b", "c", "a"]
    assert LeastLoaded().choose(REQ, views, 0.0) == "b"


def test_efficiency_packs_onto_the_busy_gpu_rather_than_waking_an_idle_one() -> None:
    models = {"busy": h100_like(), "idle": h100_like()}
    policy = Efficiency(models)
    # Same GPU type: one more request where the batch already runs costs a few hundredths
    # of a joule per token; waking the idle GPU costs its jump from idle to ~370 W.
    assert policy.choose(REQ, [view("idle", 0), view("busy", 20)], 0.0) == "busy"
    assert models["busy"].marginal_j_per_token(20) < 0.1 < models["idle"].marginal_j_per_token(0)


def test_efficiency_wakes_the_gpu_that_is_cheaper_at_the_load_it_would_get() -> None:
    # Two idle GPUs and 60 requests in flight elsewhere (a full, ineligible one): the H100
    # serves that scale at far fewer joules per token than an L4 would.
    models = {"l4": l4_like(), "h100": h100_like(), "full": h100_like()}
    policy = Efficiency(models, slo_ttft_s=2.0, slo_tpot_s=0.2)
    full = view("full", 60, max_concurrency=60)
    assert policy.choose(REQ, [view("l4"), view("h100"), full], 0.0) == "h100"


def test_efficiency_never_breaks_the_slo_when_another_backend_holds_it() -> None:
    models = {"cheap": h100_like(), "other": h100_like()}
    # A tight TPOT SLO caps the H100s at ~50 requests (step time 6.8 ms + 0.089 ms each).
    policy = Efficiency(models, slo_ttft_s=2.0, slo_tpot_s=0.012)
    cap = models["cheap"].plan(policy.ttft_limit_s, policy.tpot_limit_s).cap
    assert 40 < cap < 60
    # Below its cap the fuller backend is the cheaper place for the next tokens...
    assert policy.choose(REQ, [view("cheap", int(cap) - 5), view("other", 3)], 0.0) == "cheap"
    # ...at its cap it is out, however cheap its next token would be.
    assert policy.choose(REQ, [view("cheap", int(cap)), view("other", 3)], 0.0) == "other"


def test_efficiency_watches_the_queue_before_the_first_token() -> None:
    models = {"a": h100_like(), "b": h100_like()}
    policy = Efficiency(models)
    tickets = [models["a"].sent(100.0) for _ in range(10)]
    # Ten requests on "a" still waiting for their first token, the oldest for 1 s by now:
    # a saturated engine, whatever the curves say.
    assert models["a"].oldest_wait_s(101.0) == pytest.approx(1.0)
    assert policy.choose(REQ, [view("a", 10), view("b", 3)], 101.0) == "b"
    for ticket in tickets:
        models["a"].first_token(101.0, ticket)
    assert models["a"].waiting == 0 and models["a"].oldest_wait_s(101.0) == 0.0
    assert policy.choose(REQ, [view("a", 10), view("b", 3)], 101.0) == "a"


def test_efficiency_spills_to_most_headroom_and_skips_the_unusable() -> None:
    models = {"a": h100_like(), "b": h100_like(), "c": h100_like()}
    policy = Efficiency(models)
    cap = models["a"].plan(policy.ttft_limit_s, policy.tpot_limit_s).cap
    over = [view("a", int(3 * cap)), view("b", int(2 * cap)), view("c", 0, healthy=False)]
    assert policy.choose(REQ, over, 0.0) == "b"
    assert policy.choose(REQ, [view("c", healthy=False), view("a", 1, max_concurrency=1)], 0.0) is None
    assert policy.choose(REQ, [], 0.0) is None


def test_efficiency_spills_away_from_a_standing_queue() -> None:
    # Both over their caps; "a" by fewer requests in flight, but its queue has waited 5 s (a
    # backend whose learnt caps say more than it serves): the spill must not keep feeding it.
    models = {"a": h100_like(), "b": h100_like()}
    policy = Efficiency(models)
    cap = models["a"].plan(policy.ttft_limit_s, policy.tpot_limit_s).cap
    over = [view("a", int(1.5 * cap)), view("b", int(2 * cap))]
    assert policy.choose(REQ, over, 100.0) == "a"
    models["a"].sent(95.0)
    assert policy.choose(REQ, over, 100.0) == "b"


def test_efficiency_routes_unknown_backends_on_the_prior() -> None:
    policy = Efficiency()
    assert policy.choose(REQ, [view("x"), view("y")], 0.0) == "x"  # equal priors: first listed
    assert policy.choose(REQ, [view("x"), view("y", 2)], 0.0) == "y"  # then it packs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(loads=st.lists(st.integers(0, 600), min_size=1, max_size=6),
       waits=st.lists(st.integers(0, 40), min_size=6, max_size=6),
       kinds=st.lists(st.booleans(), min_size=6, max_size=6))
def test_efficiency_picks_an_slo_safe_backend_whenever_one_exists(
        loads: list[int], waits: list[int], kinds: list[bool]) -> None:
    models = {}
    views = []
    for i, load in enumerate(loads):
        name = f"b{i}"
        m = models[name] = _MODELS["h100" if kinds[i] else "l4"]()
        for _ in range(min(waits[i], load)):
            m.sent(50.0)
        views.append(view(name, load))
    policy = Efficiency(models)

    def safe(v: BackendView) -> bool:
        m = models[v.name]
        plan = m.plan(policy.ttft_limit_s, policy.tpot_limit_s)
        return (v.load + 1 <= plan.cap and m.waiting + 1 <= plan.wait_cap
                and m.oldest_wait_s(50.0) <= policy.max_wait_s)

    choice = policy.choose(REQ, views, 50.0)
    assert choice is not None
    if any(safe(v) for v in views):
        assert safe(next(v for v in views if v.name == choice))


# Trained once; each example gets copies (training 200 models would take seconds).
_H100_MODEL, _L4_MODEL = h100_like(), l4_like()
_MODELS = {"h100": lambda: copy.deepcopy(_H100_MODEL), "l4": lambda: copy.deepcopy(_L4_MODEL)}


# -- the learned model ---------------------------------------------------------------------------


def drive_engine(model: EfficiencyModel, profile_name: str, levels: list[int],
                 seconds_per_level: float = 10.0, prompt: int = 64, output: int = 256) -> int:
    """Closed loop: after 2 idle seconds keep `level` requests in an Engine, and feed the
    model what a proxy sees (request events, a power sample every 100 ms). Returns the
    number of power samples."""
    engine = Engine(get_profile(profile_name), max_finished=16)
    tickets: dict[str, tuple[int, int, float]] = {}
    first: dict[str, float] = {}
    t_s, samples, next_id, last_j = 2.0, 0, 0, 0.0

    def sample_until(until_s: float) -> None:
        nonlocal samples, last_j
        while 0.1 * (samples + 1) <= until_s + 1e-12:
            tick_s = 0.1 * (samples + 1)
            e_j = engine.energy_j(tick_s)
            model.power_sample(tick_s, (e_j - last_j) / 0.1)
            last_j, samples = e_j, samples + 1

    sample_until(t_s)
    for level in levels:
        stop_s = t_s + seconds_per_level
        while t_s < stop_s:
            while len(tickets) < level:
                rid = str(next_id)
                next_id += 1
                engine.add(Request(rid, prompt, output), t_s)
                tickets[rid] = model.sent(t_s)
            step = engine.plan_step(t_s)
            assert step is not None
            sample_until(step.end_s)
            events = engine.finish_step(step)
            t_s = step.end_s
            model.tokens(len(events))
            for rec in step.prefill:
                model.first_token(t_s, tickets[rec.request_id])
                first[rec.request_id] = t_s
            for e in events:
                if e.finished:
                    model.finished(t_s, tickets.pop(e.request_id), first.pop(e.request_id), output)
    model.refresh()
    return samples


@pytest.mark.parametrize("profile_name", ["h100-llama3.1-8b", "a100-llama3.1-8b", "l4-llama3.1-8b"])
def test_model_converges_to_the_profile_within_10_percent(profile_name: str) -> None:
    profile = get_profile(profile_name)
    levels = [n for n in (2, 8, 32, 128) if n <= profile.max_batch]
    model = EfficiencyModel()
    samples = drive_engine(model, profile_name, levels)
    assert 300 <= samples <= 500  # "a few hundred observations"
    assert model.idle_w == pytest.approx(profile.idle_w, rel=0.01)
    for n in levels:
        assert model.power_w(n) == pytest.approx(profile.power_w(n), rel=0.10)
        assert model.tokens_per_s(n) == pytest.approx(n / profile.step_time_s(n), rel=0.10)
        # TPOT is keyed by the load at send: requests sent just before the next level decode
        # partly in its bigger batch, which errs on the safe (slow) side; the last level is
        # steady.
        assert 0.95 <= model.tpot_s(n) / profile.step_time_s(n) <= 1.35
    assert model.tpot_s(levels[-1]) == pytest.approx(profile.step_time_s(levels[-1]), rel=0.10)


def test_model_prior_is_concave_and_saturating_before_any_data() -> None:
    m = EfficiencyModel()
    powers = [m.power_w(n) for n in (0, 1, 2, 4, 8, 16, 32, 64)]
    rates = [m.tokens_per_s(n) for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)]
    assert powers == sorted(powers) and powers[1] > 2 * powers[0]
    gains = [b - a for a, b in zip(powers[1:], powers[2:], strict=False)]
    assert max(gains) - min(gains) < 1.0  # linear in log2(n): concave in n
    rate_gains = [(b - a) for a, b in zip(rates, rates[1:], strict=False)]
    assert rates == sorted(rates) and rate_gains[-1] / 256 < rate_gains[0]  # saturating


def test_model_marginal_cost_falls_with_the_batch_as_measured() -> None:
    m = h100_like()
    assert m.marginal_j_per_token(0) > 1.0  # waking the GPU
    assert m.marginal_j_per_token(4) > m.marginal_j_per_token(64) > 0


def test_knots_and_segments() -> None:
    assert [knot_of(x) for x in (0, 0.4, 0.6, 3, 16)] == [0, 0, 1, 3, 16]
    assert KNOTS[knot_of(100)] == pytest.approx(100, rel=0.05)
    for n in (0, 5, 17, 100, 999, 10**6):
        k = segment_of(n)
        assert KNOTS[k] <= n or k == len(KNOTS) - 2
        assert n < KNOTS[k + 1] or k == len(KNOTS) - 2


def test_load_tracker_time_averages() -> None:
    tr = LoadTracker(0.0)
    tr.change(0.0, in_flight=+2)
    tr.change(0.05, decoding=+2)
    tr.tokens(10)
    assert tr.close(0.1) == pytest.approx((2.0, 1.0, 100.0))
    assert tr.close(0.1) is None


# -- the fleet simulation ------------------------------------------------------------------------

FLEET = parse_fleet({"backends": [
    {"name": "h100", "profile": "h100-llama3.1-8b"},
    {"name": "a100", "profile": "a100-llama3.1-8b"},
    {"name": "l4", "profile": "l4-llama3.1-8b", "count": 2},
]})


def test_fleet_yaml_expands_counts_and_rejects_mistakes() -> None:
    assert [b.name for b in FLEET] == ["h100", "a100", "l4-0", "l4-1"]
    with pytest.raises(FleetError, match="profile must be one of"):
        parse_fleet({"backends": [{"profile": "tpu"}]})
    with pytest.raises(FleetError, match="appears twice"):
        parse_fleet({"backends": [{"name": "x", "profile": "l4-llama3.1-8b"}] * 2})
    with pytest.raises(FleetError, match="count"):
        parse_fleet({"backends": [{"profile": "l4-llama3.1-8b", "count": 0}]})


@pytest.mark.parametrize("policy", ["round_robin", "least_loaded", "efficiency"])
def test_fleet_is_deterministic_and_conserves_energy(policy: str) -> None:
    trace = synth_trace(6.0, 20.0, seed=3)
    first = simulate(FLEET, trace, policy, attribute=True)
    second = simulate(FLEET, trace, policy)
    assert first.contract_json() == second.contract_json()
    assert first.requests == len(trace) and first.rejected == 0
    assert first.output_tokens == sum(r.output_tokens for r in trace)
    # Engines' per-request truth + idle == their counters, to rounding.
    assert first.conservation_error_j < 1e-6 * first.joules
    # The proxy's own attribution over 100 ms counter samples balances its books too.
    books = first.attribution
    assert books is not None
    assert books["books_error_j"] < 1e-6 * books["measured_joules"]
    assert books["attributed_joules"] + books["idle_joules"] == pytest.approx(
        books["measured_joules"], rel=1e-9)
    assert 0 < first.idle_energy_share < 1 and 0 < first.slo_attainment <= 1
    assert sum(b.requests for b in first.backends.values()) == len(trace)


def test_efficiency_beats_round_robin_on_a_light_load() -> None:
    trace = synth_trace(3.0, 60.0, seed=1)
    rr = simulate(FLEET, trace, "round_robin")
    eff = simulate(FLEET, trace, "efficiency")
    assert eff.output_tokens_per_joule > 1.2 * rr.output_tokens_per_joule
    assert eff.slo_attainment >= rr.slo_attainment - 0.005


def test_capacity_counts_prefill_and_the_tpot_slo() -> None:
    x = backend_capacity_rps(H100, 1000, 200, 0.2)
    # Decode at batch 256 (~9000 tok/s) plus 40 ms of prefill a request: ~16 req/s.
    assert 14 < x < 18
    assert backend_capacity_rps(L4, 1000, 200, 0.2) < 0.1 * x
    assert backend_capacity_rps(H100, 1000, 200, 0.02) < x  # a tight TPOT caps the batch


def test_simulate_cli_writes_the_contract_json_and_a_plot(tmp_path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("backends:\n  - {name: h100, profile: h100-llama3.1-8b}\n"
                     "  - {name: l4, profile: l4-llama3.1-8b, count: 2}\n")
    trace = tmp_path / "trace.csv"
    assert main_trace(["synth", "--rate", "4", "--duration-s", "10", "--out", str(trace)]) == 0
    out, plot = tmp_path / "out.json", tmp_path / "out.svg"
    assert main_simulate(["--fleet", str(fleet), "--trace", str(trace), "--policy",
                          "round_robin,efficiency", "--json", str(out), "--plot", str(plot)]) == 0
    data = json.loads(out.read_text())
    assert set(data["policies"]) == {"round_robin", "efficiency"}
    entry = data["policies"]["efficiency"]
    assert set(entry) == {"output_tokens_per_joule", "joules_per_request", "idle_energy_share",
                          "slo_attainment", "ttft_p50_ms", "ttft_p99_ms", "tpot_p99_ms",
                          "requests", "backends", "gco2e_total", "gco2e_per_1k_output_tokens"}
    assert set(entry["backends"]) == {"h100", "l4-0", "l4-1"}
    assert set(entry["backends"]["h100"]) == {"utilisation", "requests", "joules"}
    assert 0 <= entry["slo_attainment"] <= 1
    assert plot.read_text().startswith("<svg")
    assert main_simulate(["--fleet", str(fleet), "--trace", str(trace), "--policy", "fastest"]) == 2
    assert main_simulate(["--fleet", str(tmp_path / "nope.yaml"), "--trace", str(trace)]) == 2


# -- traces --------------------------------------------------------------------------------------


def test_trace_synth_is_seeded_bursty_and_clipped() -> None:
    a, b = synth_trace(20.0, 300.0, seed=7), synth_trace(20.0, 300.0, seed=7)
    assert a == b and a != synth_trace(20.0, 300.0, seed=8)
    assert len(a) == pytest.approx(6000, rel=0.15)
    gaps = [y.arrival_s - x.arrival_s for x, y in zip(a, a[1:], strict=False)]
    mean = sum(gaps) / len(gaps)
    cv = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps)) / mean
    assert cv > 1.2  # bursty, unlike Poisson's 1
    assert all(4 <= r.prompt_tokens <= 8192 and 1 <= r.output_tokens <= 2048 for r in a)
    assert sorted(r.arrival_s for r in a) == [r.arrival_s for r in a]
    outputs = sorted(r.output_tokens for r in a)
    assert 100 < outputs[len(outputs) // 2] < 160  # median ~129 (Azure conversation)


def test_trace_file_round_trip_and_errors(tmp_path) -> None:
    path = tmp_path / "t.csv"
    assert main_trace(["synth", "--rate", "5", "--duration-s", "30", "--seed", "2",
                       "--out", str(path)]) == 0
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["arrival_s", "prompt_tokens", "output_tokens"]
    assert read_trace(str(path)) == synth_trace(5.0, 30.0, seed=2)
    write_trace(str(path), [TraceRequest(1.5, 10, 2), TraceRequest(0.5, 3, 1)])
    assert [r.arrival_s for r in read_trace(str(path))] == [0.5, 1.5]
    path.write_text("arrival_s,prompt_tokens,output_tokens\n1.0,x,3\n")
    with pytest.raises(TraceError, match=":2:"):
        read_trace(str(path))
    path.write_text("time,in,out\n")
    with pytest.raises(TraceError, match="header"):
        read_trace(str(path))
    assert main_trace(["synth", "--rate", "0", "--duration-s", "3", "--out", str(path)]) == 2
