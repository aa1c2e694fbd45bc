"""Simulator: GPU profiles, the pure batching engine, and the HTTP server over a real socket."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sim.engine import Engine, Request
from proxy.sim.profiles import PROFILES, get_profile
from proxy.sim.server import make_app

H100 = get_profile("h100-llama3.1-8b")
MODEL = "llama-3.1-8b"


def wait_until(cond: Callable[[], Any], timeout_s: float = 5.0) -> Any:
    """Poll `cond` until it returns something truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(0.01)


# -- profiles -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("batch", "csv_j_per_token"), [(8, 0.4548), (64, 0.1186), (512, 0.0702)])
def test_h100_joules_per_token_match_mlenergy_csv(batch: int, csv_j_per_token: float) -> None:
    # Rows of shared/reference/mlenergy-v3-llama31.csv (Llama-3.1-8B, 1xH100).
    assert H100.joules_per_token(batch) == pytest.approx(csv_j_per_token, rel=0.05)


def test_profiles_are_sane() -> None:
    assert set(PROFILES) >= {"h100-llama3.1-8b", "b200-llama3.1-8b", "a100-llama3.1-8b", "l4-llama3.1-8b"}
    for p in PROFILES.values():
        steps = [p.step_time_s(b) for b in range(1, 2 * p.max_batch)]
        assert all(t > 0 for t in steps)
        assert all(b >= a for a, b in zip(steps, steps[1:], strict=False)), p.name
        for b in (0.5, 1, 3, 7, 100, p.max_batch, 10_000):
            assert p.idle_w <= p.power_w(b) <= p.board_limit_w, (p.name, b)
        # Larger batches are cheaper per token on every GPU.
        assert p.joules_per_token(p.max_batch) < p.joules_per_token(1) / 5
    # Below the measured range H100 power falls ~40 W per halving; step time follows the line.
    assert H100.power_w(4) == pytest.approx(H100.power_w(8) - 40.0)
    assert H100.step_time_s(1) == pytest.approx(6.8e-3 + 0.089e-3, rel=0.02)
    assert H100.step_time_s(10_000) == H100.decode_points[-1][1]


def test_unknown_profile_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="h100-llama3.1-8b"):
        get_profile("tpu-v9")


# -- engine ---------------------------------------------------------------------------------------

def _run(engine: Engine, now_s: float = 0.0) -> float:
    """Run steps back to back until the engine is empty; returns the end time."""
    while (step := engine.plan_step(now_s)) is not None:
        engine.finish_step(step)
        now_s = step.end_s
    return now_s


@pytest.mark.parametrize("batch", [1, 8, 64, 256])
def test_step_time_and_power_follow_profile(batch: int) -> None:
    eng = Engine(H100)
    for i in range(batch):
        eng.add(Request(f"r{i}", prompt_tokens=10, max_output_tokens=5), 0.0)
    prefill = eng.plan_step(0.0)
    assert prefill is not None and len(prefill.prefill) == batch and not prefill.decode
    assert prefill.duration_s == pytest.approx(batch * H100.prefill_s(10))
    assert prefill.power_w == pytest.approx(H100.prefill_power_w)
    eng.finish_step(prefill)
    decode = eng.plan_step(0.0)
    assert decode is not None and len(decode.decode) == batch
    assert decode.start_s == prefill.end_s  # back to back, whatever now_s says
    # The measured curve is the step at the reference context; these contexts (11 tokens) are
    # shorter, so the step is a little quicker, by their KV reads only.
    kv_s = H100.kv_s_per_context_token * (11 - H100.ref_context_tokens) * batch
    assert decode.duration_s == pytest.approx(H100.step_time_s(batch) + kv_s)
    assert 0.7 * H100.step_time_s(batch) < decode.duration_s < H100.step_time_s(batch)
    assert decode.power_w == pytest.approx(H100.power_w(batch))


def test_ttft_includes_prefill_and_waiting_for_the_step_boundary() -> None:
    eng = Engine(H100)
    eng.add(Request("a", prompt_tokens=1000, max_output_tokens=50), 0.0)
    step = eng.plan_step(0.0)
    assert step is not None
    eng.finish_step(step)
    a = eng.record("a")
    assert a is not None and a.first_token_s == pytest.approx(H100.prefill_s(1000))
    # "b" arrives mid-step: it waits for the boundary, then shares a step with a's decode.
    step = eng.plan_step(step.end_s)
    assert step is not None
    eng.add(Request("b", prompt_tokens=500, max_output_tokens=3), step.start_s + 0.001)
    eng.finish_step(step)
    nxt = eng.plan_step(step.end_s)
    assert nxt is not None and [r.request_id for r in nxt.prefill] == ["b"]
    assert nxt.duration_s == pytest.approx(H100.prefill_s(500) + H100.decode_costs_s([1002])[0])
    eng.finish_step(nxt)
    b = eng.record("b")
    assert b is not None and b.first_token_s == nxt.end_s and b.completion_tokens == 1
    assert b.first_token_s - b.arrival_s > H100.prefill_s(500)


def test_full_batch_queues() -> None:
    profile = get_profile("l4-llama3.1-8b")
    eng = Engine(profile)
    for i in range(profile.max_batch + 5):
        eng.add(Request(f"r{i}", prompt_tokens=10, max_output_tokens=2), 0.0)
    step = eng.plan_step(0.0)
    assert step is not None and len(step.prefill) == profile.max_batch
    assert (eng.num_running, eng.num_waiting, eng.kv_cache_usage) == (profile.max_batch, 5, 1.0)
    eng.finish_step(step)
    step = eng.plan_step(0.0)
    assert step is not None and not step.prefill  # no free slot until the batch finishes
    eng.finish_step(step)
    assert eng.num_running == 0 and eng.num_waiting == 5
    step = eng.plan_step(0.0)
    assert step is not None and len(step.prefill) == 5


def test_prefill_token_budget_spreads_admission() -> None:
    eng = Engine(H100)
    for i in range(4):
        eng.add(Request(f"r{i}", prompt_tokens=3000, max_output_tokens=2), 0.0)
    step = eng.plan_step(0.0)
    assert step is not None and step.prefill_tokens == 6000 <= H100.max_prefill_tokens


def test_embedding_is_prefill_only_and_idle_is_billed_to_nobody() -> None:
    eng = Engine(H100)
    eng.add(Request("e", prompt_tokens=400, max_output_tokens=0, is_embedding=True), 2.0)
    step = eng.plan_step(2.5)  # the GPU starts when the request arrived, not when polled
    assert step is not None and step.start_s == 2.0
    events = eng.finish_step(step)
    assert [(e.request_id, e.tokens, e.finished) for e in events] == [("e", 0, True)]
    rec = eng.record("e")
    assert rec is not None and rec.completion_tokens == 0 and rec.finished
    assert rec.joules == pytest.approx(H100.embed_s(400) * H100.embed_power_w)
    assert eng.idle_energy_j(10.0) == pytest.approx(H100.idle_w * (10.0 - step.duration_s))
    assert eng.energy_j(10.0) == pytest.approx(rec.joules + eng.idle_energy_j(10.0))


def test_abort_pays_for_its_steps_and_frees_the_slot() -> None:
    eng = Engine(H100)
    eng.add(Request("a", prompt_tokens=100, max_output_tokens=100), 0.0)
    eng.add(Request("b", prompt_tokens=100, max_output_tokens=100), 0.0)
    eng.finish_step(eng.plan_step(0.0))  # type: ignore[arg-type]
    step = eng.plan_step(0.0)
    assert step is not None
    assert eng.abort("a", step.start_s + 0.001)
    events = eng.finish_step(step)
    assert [e.request_id for e in events] == ["b"]
    a = eng.record("a")
    assert a is not None and a.aborted and a.finished and a.joules > 0 and eng.num_running == 1
    eng.add(Request("w", prompt_tokens=5, max_output_tokens=5), step.end_s)
    assert eng.abort("w", step.end_s) and eng.record("w").joules == 0.0  # type: ignore[union-attr]
    assert not eng.abort("nope", 0.0)


def test_truth_follows_physical_cost_not_token_counts() -> None:
    """Ground truth that token-count attribution cannot reproduce: prefill grows faster than
    linearly with the prompt, a long context pays more per decode token, an embedding is not
    priced like a prefill of the same size."""
    eng = Engine(H100)
    eng.add(Request("short", prompt_tokens=1000, max_output_tokens=40), 0.0)
    eng.add(Request("long", prompt_tokens=7000, max_output_tokens=40), 0.0)
    step = eng.plan_step(0.0)
    assert step is not None and len(step.prefill) == 2
    short_j, long_j = step.prefill_j
    assert long_j > 1.15 * 7 * short_j  # attention's quadratic term
    eng.finish_step(step)
    before = {r: eng.record(r).joules for r in ("short", "long")}  # type: ignore[union-attr]
    step = eng.plan_step(0.0)
    assert step is not None and not step.prefill and len(step.decode) == 2
    eng.finish_step(step)
    paid = {r: eng.record(r).joules - before[r] for r in ("short", "long")}  # type: ignore[union-attr]
    # The long one pays its extra KV-cache reads on top of an equal share.
    extra_j = H100.kv_s_per_context_token * 6000 * H100.power_w(2)
    assert paid["long"] - paid["short"] == pytest.approx(extra_j)
    assert math.fsum(paid.values()) == pytest.approx(step.energy_j)
    # At the reference context the decode step is the measured curve's.
    ref = [int(H100.ref_context_tokens)] * 64
    assert H100.decode_costs_s(ref)[0] == pytest.approx(H100.step_time_s(64), rel=1e-3)
    emb = Engine(H100)
    emb.add(Request("e", prompt_tokens=4000, max_output_tokens=0, is_embedding=True), 0.0)
    e_step = emb.plan_step(0.0)
    assert e_step is not None
    e_j = e_step.prefill_j[0]
    assert e_j != pytest.approx(H100.prefill_s(4000) * H100.prefill_power_w, rel=0.05)


def test_prefill_runs_at_its_own_power_then_decode() -> None:
    eng = Engine(H100)
    eng.add(Request("a", prompt_tokens=100, max_output_tokens=50), 0.0)
    eng.finish_step(eng.plan_step(0.0))  # type: ignore[arg-type]
    eng.add(Request("b", prompt_tokens=6000, max_output_tokens=5), 0.0)
    step = eng.plan_step(0.0)
    assert step is not None and step.prefill and step.decode
    mid_prefill = step.start_s + step.prefill_s / 2
    mid_decode = (step.start_s + step.prefill_s + step.end_s) / 2
    assert eng.power_w(mid_prefill) == pytest.approx(H100.prefill_power_w)
    assert eng.power_w(mid_decode) == pytest.approx(H100.power_w(1))
    e0 = eng.energy_j(step.start_s)
    assert eng.energy_j(step.start_s + step.prefill_s) - e0 == pytest.approx(step.prefill_energy_j)
    assert eng.energy_j(step.end_s) - e0 == pytest.approx(step.energy_j)


def test_finished_records_are_bounded() -> None:
    eng = Engine(H100, max_finished=10)
    for i in range(30):
        eng.add(Request(f"r{i}", prompt_tokens=5, max_output_tokens=1), 0.0)
    _run(eng)
    assert eng.record("r0") is None and eng.record("r29") is not None


_workload = st.lists(
    st.tuples(
        st.floats(0.0, 0.2),           # gap to the previous arrival, s
        st.integers(1, 5000),          # prompt tokens
        st.integers(1, 60),            # output tokens
        st.booleans(),                 # embedding?
        st.none() | st.floats(0.0, 0.3),  # abort this long after arrival
    ),
    min_size=1, max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(_workload, st.sampled_from(sorted(PROFILES)))
def test_energy_is_conserved_on_random_workloads(workload: list[tuple[Any, ...]], name: str) -> None:
    """sum(request joules) + idle joules == the counter, and the counter never decreases."""
    eng = Engine(get_profile(name), start_s=0.0)
    events: list[tuple[float, int, Any]] = []
    t = 0.0
    for i, (gap, prompt, out, emb, abort_after) in enumerate(workload):
        t += gap
        events.append((t, 0, Request(f"r{i}", prompt, out, emb)))
        if abort_after is not None:
            events.append((t + abort_after, 1, f"r{i}"))
    events.sort(key=lambda e: (e[0], e[1]))
    now_s, step, last_j = 0.0, None, 0.0

    def check(at_s: float) -> None:
        nonlocal last_j
        e = eng.energy_j(at_s)
        assert e >= last_j - 1e-9
        last_j = e

    while events or step is not None or eng.has_work:
        if step is None:
            step = eng.plan_step(now_s)
        if step is not None and (not events or step.end_s <= events[0][0]):
            now_s = step.end_s
            check(now_s)
            eng.finish_step(step)
            step = None
            continue
        now_s, kind, what = events.pop(0)
        check(now_s)
        if kind == 0:
            eng.add(what, now_s)
        else:
            eng.abort(what, now_s)
    end_s = now_s + 1.0
    billed = math.fsum(r.joules for r in eng.records())
    assert billed == pytest.approx(eng.attributed_j, rel=1e-9, abs=1e-9)
    assert billed + eng.idle_energy_j(end_s) == pytest.approx(eng.energy_j(end_s), rel=1e-9)
    assert all(r.finished for r in eng.records())
    for r in eng.records():
        if not r.aborted and not r.is_embedding:
            assert r.completion_tokens == r.max_output_tokens


# -- server over a real socket --------------------------------------------------------------------

class SimServer:
    """A simulator app on an ephemeral port, served from a background thread's event loop."""

    def __init__(self, profile: str = "h100-llama3.1-8b", seed: int = 0) -> None:
        self.loop = asyncio.new_event_loop()
        self._app = make_app(profile, seed=seed)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._runner = web.AppRunner(self._app, handler_cancellation=True, access_log=None)
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=10)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="sim", max_retries=0, timeout=10)

    async def _start(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]

    def get(self, path: str) -> Any:
        resp = self.http.get(path)
        resp.raise_for_status()
        return resp.json() if resp.headers["content-type"].startswith("application/json") else resp.text

    def close(self) -> None:
        self.http.close()
        self.client.close()
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    server = SimServer()
    yield server
    server.close()


def test_chat_non_streamed_returns_exactly_max_tokens(sim: SimServer) -> None:
    raw = sim.client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello " * 40}], max_tokens=17,
        extra_headers={"x-request-id": "chat-17"})
    assert raw.headers["x-request-id"] == "chat-17"
    resp = raw.parse()
    assert resp.usage is not None and resp.usage.completion_tokens == 17
    assert resp.usage.prompt_tokens == 3 + math.ceil(len("Say hello " * 40) / 4)
    assert resp.choices[0].finish_reason == "length"
    assert len((resp.choices[0].message.content or "").split()) == 17
    truth = sim.get("/sim/requests/chat-17")
    assert truth["completion_tokens"] == 17 and truth["finished"] and truth["joules"] > 0
    assert truth["arrival_s"] <= truth["first_token_s"] <= truth["end_s"] <= time.time()
    # Without max_tokens the length is drawn and the model stops on its own.
    free = sim.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert free.choices[0].finish_reason == "stop" and 1 <= free.usage.completion_tokens <= 1024  # type: ignore[union-attr]


def test_chat_streamed_one_chunk_per_token_and_usage(sim: SimServer) -> None:
    chunks = list(sim.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "stream please"}], max_tokens=9,
        stream=True, stream_options={"include_usage": True}))
    token_chunks = [c for c in chunks if c.choices]
    assert len(token_chunks) == 9
    assert all(c.choices[0].delta.content for c in token_chunks)
    assert token_chunks[0].choices[0].delta.role == "assistant"
    assert token_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 9


def test_completions_and_embeddings(sim: SimServer) -> None:
    comp = sim.client.completions.create(model=MODEL, prompt="once upon a time", max_tokens=4)
    assert comp.usage is not None and comp.usage.completion_tokens == 4 and comp.choices[0].text
    streamed = list(sim.client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=3, stream=True))
    assert [c.choices[0].text for c in streamed] == [" lorem", " ipsum", " dolor"]
    emb = sim.client.embeddings.create(model=MODEL, input=["alpha", "beta gamma"])  # SDK asks for base64
    assert [len(d.embedding) for d in emb.data] == [256, 256]
    assert emb.usage.prompt_tokens == 2 + 3
    again = sim.http.post("/v1/embeddings", json={"model": MODEL, "input": "alpha", "dimensions": 8}).json()
    assert len(again["data"][0]["embedding"]) == 8
    assert sim.http.get("/v1/models").json()["data"][0] == {
        "id": MODEL, "object": "model", "created": pytest.approx(time.time(), abs=3600), "owned_by": "joulegate-sim"}


@pytest.mark.parametrize(("body", "status", "param", "code"), [
    (b"{not json", 400, None, None),
    (b'{"model": "llama-3.1-8b", "messages": "hi"}', 400, "messages", None),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', 400, "model", None),
    (b'{"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}',
     400, "max_tokens", None),
    (b'{"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}', 404, "model", "model_not_found"),
])
def test_errors_are_openai_shaped(sim: SimServer, body: bytes, status: int, param: str | None,
                                  code: str | None) -> None:
    resp = sim.http.post("/v1/chat/completions", content=body, headers={"x-request-id": "bad-1"})
    assert resp.status_code == status and resp.headers["x-request-id"] == "bad-1"
    err = resp.json()["error"]
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, code)
    assert err["message"]


def test_power_metrics_and_power_stream(sim: SimServer) -> None:
    readings = [sim.get("/v1/power")]
    with sim.http.stream("POST", "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 40, "stream": True}):
        for _ in range(5):
            readings.append(sim.get("/v1/power"))
    readings.append(sim.get("/v1/power"))
    energies = [r["gpus"][0]["energy_mj"] for r in readings]
    assert energies == sorted(energies) and energies[-1] > energies[0]
    gpu = readings[-1]["gpus"][0]
    assert gpu["uuid"].startswith("SIM-h100-llama3.1-8b") and gpu["name"] == H100.gpu_name
    text = sim.get("/metrics")
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"):
        assert f"\n{name}{{" in "\n" + text
    events: list[dict[str, Any]] = []
    with sim.http.stream("GET", "/v1/power/stream", params={"interval_s": 0.02}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(httpx.Response(200, content=line[6:]).json())
            if len(events) == 3:
                break
    assert [e["gpus"][0]["energy_mj"] for e in events] == sorted(e["gpus"][0]["energy_mj"] for e in events)


def test_client_disconnect_aborts_the_request(sim: SimServer) -> None:
    with sim.http.stream("POST", "/v1/chat/completions", headers={"x-request-id": "gone-1"}, json={
            "model": MODEL, "messages": [{"role": "user", "content": "long"}], "max_tokens": 5000,
            "stream": True}) as resp:
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        # The same id again while the first is in flight: refused, not merged.
        dup = sim.http.post("/v1/chat/completions", headers={"x-request-id": "gone-1"}, json={
            "model": MODEL, "messages": [{"role": "user", "content": "again"}], "max_tokens": 2})
        assert dup.status_code == 409 and dup.json()["error"]["code"] == "duplicate_request_id"
    truth = wait_until(lambda: (t := sim.get("/sim/requests/gone-1"))["finished"] and t)
    assert truth["aborted"] and 1 <= truth["completion_tokens"] < 5000 and truth["joules"] > 0
    wait_until(lambda: 'vllm:num_requests_running{model_name="llama-3.1-8b"} 0\n' in sim.get("/metrics"))
    assert sim.http.get("/sim/requests/never-seen").status_code == 404


def test_ground_truth_adds_up_to_the_counter() -> None:
    server = SimServer(seed=7)
    try:
        async def burst() -> None:
            client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="sim", max_retries=0)
            msgs = [{"role": "user", "content": "tell me about joules " * 20}]
            jobs: list[Any] = [
                client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10 + 7 * i,  # type: ignore[arg-type]
                                               stream=False, extra_headers={"x-request-id": f"c{i}"})
                for i in range(6)]
            jobs.append(client.embeddings.create(model=MODEL, input="embed me " * 100,
                                                 extra_headers={"x-request-id": "e0"}))

            async def streamed() -> None:
                stream = await client.chat.completions.create(
                    model=MODEL, messages=msgs, max_tokens=30, stream=True,  # type: ignore[arg-type]
                    extra_headers={"x-request-id": "s0"})
                async for _ in stream:
                    pass
            jobs.append(streamed())
            await asyncio.gather(*jobs)
            await client.close()

        asyncio.run(burst())
        ids = [f"c{i}" for i in range(6)] + ["e0", "s0"]
        truths = [server.get(f"/sim/requests/{rid}") for rid in ids]
        assert all(t["finished"] and t["joules"] > 0 for t in truths)
        energy = server.get("/sim/energy")
        billed = math.fsum(t["joules"] for t in truths)
        assert billed == pytest.approx(energy["attributed_joules"], rel=1e-6)
        assert billed + energy["idle_joules"] == pytest.approx(energy["joules"], rel=1e-6)
        # Batching: the six concurrent chats shared decode steps, so each paid far less than
        # the batch-1 price for its tokens.
        c5 = truths[5]
        assert c5["joules"] < 0.8 * 45 * H100.joules_per_token(1)
    finally:
        server.close()


def test_power_api_clock_can_be_skewed() -> None:
    loop = asyncio.new_event_loop()
    app = make_app("h100-llama3.1-8b", clock_skew_s=2.5)
    runner = web.AppRunner(app, access_log=None)

    async def read() -> tuple[float, float]:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with httpx.AsyncClient() as client:
            before = time.time()
            t = (await client.get(f"http://127.0.0.1:{port}/v1/power")).json()["t"]
        await runner.cleanup()
        return before, t

    try:
        before, t = loop.run_until_complete(read())
    finally:
        loop.close()
    assert 2.4 < t - before < 3.0


def test_run_serves_until_terminated() -> None:
    code = "from proxy.sim.server import run; run('l4-llama3.1-8b', '127.0.0.1', 0, 'tiny', 3)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = line.strip().rsplit(" ", 1)[-1]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1"), line
        models = httpx.get(url + "/models", timeout=5).json()
        assert models["data"][0]["id"] == "tiny"
        power = httpx.get(url.removesuffix("/v1") + "/v1/power", timeout=5).json()
        assert power["gpus"][0]["uuid"] == f"SIM-l4-llama3.1-8b-{url.split(':')[-1].split('/')[0]}"
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
