"""The split-weight learner: pure, fed like the attributor, checked against the simulator's
physics in virtual time (no sockets: the learner does no I/O)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from proxy.energy.attribution import Attributor
from proxy.energy.learn import SplitLearner, SplitWeights
from proxy.energy.timeline import EnergyTimeline
from proxy.sim.engine import Engine, Request
from proxy.sim.profiles import get_profile


def drive(profile_name: str, seed: int, requests: int = 400, concurrency: int = 14,
          interval_s: float = 0.1) -> tuple[SplitLearner, dict[str, float]]:
    """Closed loop on a simulated engine: chat, long prompts and embeddings, 60% streamed; the
    learner sees what a proxy sees (opens, token arrivals of streams, closes, a sample every
    `interval_s`). Returns the learner and the weights the engine's physics imply at this batch."""
    rng = random.Random(seed)
    profile = get_profile(profile_name)
    eng, learner = Engine(profile), SplitLearner(0.05)
    t_s, next_sample_s, last_j, made, done = 0.0, interval_s, 0.0, 0, 0
    streamed: dict[str, bool] = {}

    def new() -> None:
        nonlocal made
        rid, u = f"r{made}", rng.random()
        made += 1
        if u < 0.1:
            req = Request(rid, rng.randint(20, 2000), 0, is_embedding=True)
        elif u < 0.3:
            req = Request(rid, rng.randint(2000, 8000), rng.randint(8, 200))
        else:
            req = Request(rid, int(rng.lognormvariate(5, 1)) + 20, rng.randint(8, 300))
        streamed[rid] = not req.is_embedding and rng.random() < 0.6
        eng.add(req, t_s)
        learner.open(rid, t_s, streamed[rid], req.prompt_tokens, req.is_embedding)

    for _ in range(concurrency):
        new()
    while done < requests:
        step = eng.plan_step(t_s)
        assert step is not None
        while next_sample_s <= step.end_s:
            e_j = eng.energy_j(next_sample_s)
            learner.interval(next_sample_s - interval_s, next_sample_s, e_j - last_j)
            last_j, next_sample_s = e_j, next_sample_s + interval_s
        events = eng.finish_step(step)
        t_s = step.end_s
        for ev in events:
            if streamed[ev.request_id] and ev.tokens:
                learner.tokens(ev.request_id, t_s, ev.tokens)
            if ev.finished:
                rec = eng.record(ev.request_id)
                assert rec is not None
                learner.close(ev.request_id, t_s, rec.prompt_tokens, rec.completion_tokens)
                done += 1
                new()
    _, parts_s = profile.decode_costs_s([300] * concurrency)
    token_j = parts_s[0] * profile.power_w(concurrency)
    truth = {"prefill_weight": profile.prefill_j_per_token() / token_j,
             "decode_context_weight": profile.kv_s_per_context_token * profile.power_w(concurrency) / token_j}
    return learner, truth


@pytest.mark.parametrize(("profile", "seed"), [("h100-llama3.1-8b", 1), ("h100-llama3.1-8b", 2),
                                               ("a100-llama3.1-8b", 3)])
def test_learns_length_and_context_terms_the_prior_lacks(profile: str, seed: int) -> None:
    learner, truth = drive(profile, seed)
    w = learner.weights
    assert w.learned and w.intervals > 30  # one-second windows
    # The prior (0.05, no length or context term) is far from the physics; the fit is close.
    assert w.prefill_weight_sq > 0 and w.decode_context_weight > 0
    assert 0.3 * truth["decode_context_weight"] < w.decode_context_weight < 2 * truth["decode_context_weight"]
    # An 8k prompt's weight, all terms together, within a factor 1.5 of the physics'.
    true_8k = 8000 * truth["prefill_weight"] * (1 + 8000 / get_profile(profile).attention_crossover_tokens)
    learned_8k = 8000 * (w.prefill_weight + w.prefill_weight_sq * 8000)
    assert true_8k / 1.5 < learned_8k < 1.5 * true_8k


def test_prior_until_enough_busy_intervals() -> None:
    learner = SplitLearner(0.07, min_intervals=5)
    assert learner.weights == SplitWeights(0.07)
    learner.open("a", 0.0, True, 100)
    # Open requests hold their intervals back: nothing is learned, the prior stays.
    for k in range(10):
        assert learner.interval(0.1 * k, 0.1 * (k + 1), 50.0).prefill_weight == 0.07
    assert learner.pending == 10
    # An idle interval (nothing in flight for part of it) is never learned from.
    learner.tokens("a", 0.2, 1)
    learner.close("a", 0.5, 100, 1)
    w = learner.interval(1.0, 1.1, 11.0)
    assert learner.pending == 0 and not w.learned and w.prefill_weight == 0.07


def test_an_early_fit_from_fewer_windows_for_a_caller_that_must_settle_now() -> None:
    learner, _truth = drive("h100-llama3.1-8b", 1, requests=60)  # about 5 windows
    assert not learner.weights.learned and 2.0 < learner.weights.intervals < learner.min_intervals
    early = learner.early_weights(2.0)
    assert early is not None and early.learned and early.step_weight > 0
    assert early.prefill_weight != learner.prior.prefill_weight
    assert learner.early_weights(learner.weights.intervals + 1.0) is None
    assert SplitLearner(0.05).early_weights(2.0) is None  # no windows at all: only the prior
    learner, _truth = drive("h100-llama3.1-8b", 1, requests=150)
    assert learner.weights.learned and learner.early_weights(2.0) == learner.weights


def test_unclosed_request_does_not_stall_learning_forever() -> None:
    learner = SplitLearner(0.05, max_pending_s=5.0, min_intervals=1)
    learner.open("stuck", 0.0, True, 10)
    learner.interval(0.0, 0.1, 5.0)
    learner.open("b", 10.0, False, 200)
    learner.close("b", 10.5, 200, 20)
    learner.interval(10.0, 10.5, 40.0)
    assert learner.pending <= 1
    learner.interval(20.0, 20.1, 1.0)
    assert learner.pending == 0


@pytest.mark.parametrize("bad", [-0.1])
def test_bad_prior_is_refused(bad: float) -> None:
    with pytest.raises(ValueError):
        SplitLearner(bad)


def _two_streams(weights: SplitWeights | None) -> dict[str, float]:
    """Two streams side by side on an attributor, one over a 6000-token context: their joules."""
    at = Attributor(EnergyTimeline(), prefill_weight=0.05)
    if weights is not None:
        weights.apply_to(at)
    at.timeline.add_energy_sample(0.0, 0.0)
    at.open("short", 0.0, True, 100)
    at.open("long", 0.0, True, 6000)
    for k in range(1, 21):
        for rid in ("short", "long"):
            at.tokens(rid, 0.05 * k, 1)
        at.timeline.add_energy_sample(0.05 * k, 10.0 * k)
    for rid, prompt in (("short", 100), ("long", 6000)):
        at.close(rid, 1.0, prompt, 20)
    at.timeline.add_energy_sample(1.1, 200.0)
    return {f.request_id: f.joules for f in at.advance()}


def test_learned_weights_reach_the_attributor() -> None:
    flat = _two_streams(None)
    learned = _two_streams(SplitWeights(0.05, prefill_weight_sq=3e-6, decode_context_weight=7e-5,
                                        learned=True))
    assert sum(flat.values()) == pytest.approx(sum(learned.values()))  # still conserving
    # The long prompt's prefill weighs more (quadratic term), its tokens too (context term).
    assert learned["long"] / learned["short"] > 1.2 * flat["long"] / flat["short"]


def test_a_wild_fit_is_bounded() -> None:
    """Windows where long-context tokens look 1000x dearer: the context term stops at its cap,
    so no request can be billed many times its due from a few noisy windows."""
    learner = SplitLearner(0.05, min_intervals=5)
    t_s = 0.0
    for k in range(30):
        prompt = 8000 if k % 2 else 10
        learner.open(f"r{k}", t_s, True, prompt)
        for i in range(1, 11):
            learner.tokens(f"r{k}", t_s + 0.1 * i, 1)
        learner.close(f"r{k}", t_s + 1.0, prompt, 10)
        learner.open(f"p{k}", t_s, False, 100)  # some prefill, so the fit may run
        learner.close(f"p{k}", t_s + 1.0, 100, 0)
        w = learner.interval(t_s, t_s + 1.0, 1000.0 if k % 2 else 1.0)
        t_s += 1.0
    assert w.learned
    assert 0 < w.decode_context_weight <= 5e-4
    assert 0.005 <= w.prefill_weight <= 0.5 and w.prefill_weight_sq <= w.prefill_weight / 1000


def test_learns_an_embedding_weight_apart_from_the_prefill_weight() -> None:
    # Each second: a stream decodes 50-150 tokens, another prefills P prompt tokens, an embedding
    # request embeds Q tokens; a decode token costs 1 J, a prompt token 0.05 J, an embedded one
    # 0.15 J (an encoder pass priced apart). The learner tells the two prompt kinds apart.
    rng = random.Random(7)
    learner = SplitLearner(0.05)
    for k in range(120):
        t_s = float(k)
        prompt, embedded, decoded = rng.randint(200, 3000), rng.randint(200, 3000), rng.randint(50, 150)
        learner.open(f"d{k}", t_s, True, 10)
        learner.open(f"p{k}", t_s, True, prompt)
        learner.open(f"e{k}", t_s, False, embedded, True)
        for i in range(decoded):
            learner.tokens(f"d{k}", t_s + (i + 1) / decoded, 1)
        learner.tokens(f"p{k}", t_s + 1.0, 1)
        for rid, p, c in ((f"d{k}", 10, decoded), (f"p{k}", prompt, 1), (f"e{k}", embedded, 0)):
            learner.close(rid, t_s + 1.0, p, c)
        learner.interval(t_s, t_s + 1.0, decoded + 1 + 0.05 * prompt + 0.15 * embedded)
    w = learner.weights
    assert w.learned and w.embed_weight is not None
    assert w.embed_weight == pytest.approx(0.15, rel=0.2)
    assert w.prefill_weight == pytest.approx(0.05, rel=0.2)
    assert w.prompt(1000, True) > 2 * w.prompt(1000, False)


def test_a_queued_streams_prompt_counts_where_it_went_through_not_while_it_waited() -> None:
    # Every 2 s: a stream decodes a token every 10 ms throughout; another waits 1.89 s in the
    # queue and is prefilled in the step before its first token (prompt tokens at 0.05 J, a
    # decode token at 1 J). Spread over its wait, half its prompt would land in the first
    # second's window, where no prefill happened, and bias the fit.
    rng = random.Random(3)
    learner = SplitLearner(0.05)
    for k in range(80):
        t0 = 2.0 * k
        prompt = rng.randint(500, 3000)
        learner.open(f"d{k}", t0, True, 10)
        learner.open(f"p{k}", t0, True, prompt)
        for i in range(1, 201):
            learner.tokens(f"d{k}", t0 + i / 100, 1)
            if i == 190:
                learner.tokens(f"p{k}", t0 + 1.9, 1)
        learner.close(f"d{k}", t0 + 2.0, 10, 200)
        learner.close(f"p{k}", t0 + 2.0, prompt, 1)
        learner.interval(t0, t0 + 1.0, 100.0)
        learner.interval(t0 + 1.0, t0 + 2.0, 101.0 + 0.05 * prompt)
    w = learner.weights
    assert w.learned
    # One stream decodes throughout: a token weighs 1 + step_weight (a batch of 1) here.
    assert w.prefill(2000) / (1.0 + w.step_weight) == pytest.approx(0.05 * 2000, rel=0.15)


def test_a_steps_shared_work_is_told_apart_from_the_tokens_in_it() -> None:
    # Seconds of 1 or 8 streams decoding over 100 steps (0.2 J a token, 1 J a step, 0.02 J a
    # prompt token): a token alone costs 1.2 J, one in a batch of 8 0.325 J. One flat weight
    # per token would bill a lone stream a third of its due; the fit finds the step's share.
    rng = random.Random(5)
    learner = SplitLearner(0.05)
    for k in range(80):
        t0, batch = 2.0 * k, 1 if k % 2 else 8
        streams = {f"s{k}-{i}": (rng.randint(50, 400), 100 if i == 0 else rng.randint(20, 100))
                   for i in range(batch)}
        for rid, (prompt, _) in streams.items():
            learner.open(rid, t0, True, prompt)
        for tick in range(1, 101):
            for rid, (prompt, n) in streams.items():
                if tick <= n:
                    learner.tokens(rid, t0 + tick / 100, 1)
                if tick == n:
                    learner.close(rid, t0 + tick / 100, prompt, n)
        tokens = sum(n for _, n in streams.values())
        prompts = sum(p for p, _ in streams.values())
        learner.interval(t0, t0 + 1.0, 0.2 * tokens + 1.0 * 99 + 0.02 * prompts)
        learner.interval(t0 + 1.0, t0 + 2.0, 50.0)  # idle: not learned from
    w = learner.weights
    assert w.learned

    def token_j(batch: int) -> float:  # what the weights make of a token, at zero context
        return 1.0 + w.step_weight / batch

    # Within 20%: the prompt and context terms, which this workload barely tells apart, take
    # some of it. Without the step term the ratio would be 1.
    assert token_j(1) / token_j(8) == pytest.approx(1.2 / 0.325, rel=0.2)


def test_a_restart_resumes_the_fit_aged_by_the_time_it_was_down() -> None:
    """state() -> JSON -> restore(): the same weights right away; after many half-lives of
    downtime the evidence is gone and the prior is back; a malformed state is refused."""
    import json

    learner, _truth = drive("h100-llama3.1-8b", 1, requests=250)
    assert learner.weights.learned
    saved = json.loads(json.dumps(learner.state()))
    t_s = saved["t_s"]

    resumed = SplitLearner(0.05)
    w = resumed.restore(saved, now_s=t_s)
    assert w.learned and w == learner.weights  # nothing aged: the very same fit
    assert resumed.ttft_s(4000) == pytest.approx(learner.ttft_s(4000))

    aged = SplitLearner(0.05).restore(saved, now_s=t_s + 60.0)  # half a half-life
    assert aged.learned and aged.intervals == pytest.approx(learner.weights.intervals * 0.5 ** 0.5)

    stale = SplitLearner(0.05).restore(saved, now_s=t_s + 20 * 120.0)
    assert not stale.learned and stale.prefill_weight == 0.05

    for bad in ({**saved, "version": 99}, {**saved, "xy": [1.0]}, {**saved, "gram": "x"},
                {**saved, "n_eff": float("nan")}, {"version": 1}):
        with pytest.raises(ValueError):
            SplitLearner(0.05).restore(bad, now_s=t_s)


def test_the_proxy_keeps_its_split_weights_across_a_restart(sims: dict, tmp_path: Path) -> None:
    """energy.state_file: read at start (the backend's weights are learned before any request),
    written back at shutdown; a corrupt file is logged and the prior is used."""
    import json
    import time

    import httpx

    from tests.conftest import ADMIN_KEY, ProxyProc, backend_yaml, tenants_yaml

    learner, _truth = drive("h100-llama3.1-8b", 2, requests=250)
    state = learner.state()
    state["t_s"] = time.time()  # as if saved just now
    # A backend no longer configured: ignored at start, gone from the file written at shutdown.
    (tmp_path / "weights.json").write_text(json.dumps({"h100": state, "retired": state}))
    sim = sims["h100"]
    config = ("backends:\n" + backend_yaml("h100", sim.url, extra=f", power: {{source: sim, url: '{sim.url}'}}")
              + "energy: {state_file: weights.json}\n" + tenants_yaml() + "ledger: 'memory://'\n")

    def weights(proxy: ProxyProc) -> dict:
        views = httpx.get(proxy.url + "/v1/energy/backends", timeout=5,
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["data"]
        return next(v for v in views if v["name"] == "h100")["split_weights"]

    proxy = ProxyProc(config, tmp_path)
    try:
        resumed = weights(proxy)
        assert resumed["learned"] is True
        assert resumed["prefill_weight"] == pytest.approx(learner.weights.prefill_weight, rel=0.05)
    finally:
        proxy.stop()  # SIGTERM: a graceful shutdown (uvicorn re-raises the signal after it)
    saved = json.loads((tmp_path / "weights.json").read_text())
    assert set(saved) == {"h100"} and saved["h100"]["n_eff"] > 10

    (tmp_path / "weights.json").write_text("{not json")
    proxy = ProxyProc(config, tmp_path)
    try:
        assert weights(proxy)["learned"] is False
        assert "not read" in proxy.log()
    finally:
        proxy.stop()
