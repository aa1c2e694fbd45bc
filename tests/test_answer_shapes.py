"""The engine's own token counts are booked for every answer shape.

The official openai SDK against `joulegate serve` in front of a simulated engine that answers as
real ones do: reasoning deltas, tool-call argument deltas, image prompts, streams that ignore
`stream_options`, and the Responses API. The booked tokens (the request's record, the usage
totals) must equal the engine's `usage`; where the engine gives none, every generated delta
counts and the prompt is estimated from its text.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from aiohttp import web

from proxy.usage import MEDIA_PART_TOKENS, Usage, answer_usage, estimate_prompt_tokens, read_usage
from tests.conftest import (
    ADMIN_KEY,
    KEYS,
    MODEL,
    ProxyProc,
    SimBackend,
    backend_yaml,
    free_port,
    sdk_client,
    tenants_yaml,
    wait_until,
)

ENDLESS_MODEL = "endless-model"
MAX_SSE_LINE_BYTES = 256 * 1024
#: A 64 KiB "image": as a data URL its bytes would be ~22k tokens if counted as text.
IMAGE_URL = "data:image/png;base64," + base64.b64encode(bytes(range(256)) * 256).decode()


class EndlessBackend:
    """A real HTTP server whose streams send two tokens, then one line that never ends."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.sent_bytes = 0
        self.ended: str | None = None  # how the endless line ended: the proxy must close it
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        assert ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        async def models(_: web.Request) -> web.Response:
            return web.json_response({"object": "list", "data": [{"id": ENDLESS_MODEL, "object": "model"}]})

        async def endless(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for word in ("one", " two"):
                chunk = {"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
                await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            await resp.write(b'data: {"choices":[{"index":0,"delta":{"content":"')
            try:
                while self.sent_bytes < 256 * MAX_SSE_LINE_BYTES:
                    await resp.write(b"x" * 16384)
                    self.sent_bytes += 16384
                self.ended = "complete"
            except (ConnectionError, asyncio.CancelledError) as exc:
                self.ended = type(exc).__name__
                raise
            return resp

        async def start() -> None:
            app = web.Application()
            app.router.add_get("/v1/models", models)
            app.router.add_post("/v1/chat/completions", endless)
            runner = web.AppRunner(app, handler_cancellation=True)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimBackend]:
    backend = SimBackend("h100-llama3.1-8b", tmp_path_factory.mktemp("shapes"))
    yield backend
    backend.stop()


@pytest.fixture(scope="module")
def endless() -> EndlessBackend:
    return EndlessBackend()


@pytest.fixture(scope="module")
def proxy(sim: SimBackend, endless: EndlessBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProc]:
    config = f"server: {{max_sse_line_bytes: {MAX_SSE_LINE_BYTES}}}\nbackends:\n"
    config += backend_yaml("h100", sim.url, [MODEL], f", power: {{source: sim, url: '{sim.url}', interval_s: 0.05}}")
    config += backend_yaml("endless", endless.url, [ENDLESS_MODEL])
    config += "ledger: 'memory://?flush_interval_s=0.05'\n" + tenants_yaml()
    proc = ProxyProc(config, tmp_path_factory.mktemp("shapes-proxy"))
    yield proc
    proc.stop()
    assert "Traceback" not in proc.log()


@pytest.fixture(scope="module")
def client(proxy: ProxyProc) -> openai.OpenAI:
    return sdk_client(proxy)


def new_id() -> str:
    return f"shape-{uuid.uuid4().hex[:12]}"


def booked(proxy: ProxyProc, request_id: str, key: str = KEYS["acme"]) -> dict[str, Any]:
    """The proxy's record of a request (`GET /v1/energy/requests/{id}`)."""
    resp = httpx.get(f"{proxy.url}/v1/energy/requests/{request_id}", timeout=10,
                     headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 200, resp.text
    return resp.json()


def tokens_of(view: dict[str, Any]) -> tuple[int, int, int]:
    return view["prompt_tokens"], view["completion_tokens"], view["reasoning_tokens"]


def chat_usage(usage: Any) -> tuple[int, int, int]:
    details = usage.completion_tokens_details
    return usage.prompt_tokens, usage.completion_tokens, details.reasoning_tokens if details else 0


def image_messages() -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                         {"type": "image_url", "image_url": {"url": IMAGE_URL}}]}]


TEXT = [{"role": "user", "content": "Tell me something about the weather in Lisbon."}]


# -- pure: reading usage, estimating prompts ------------------------------------------------------

def test_usage_is_read_in_every_shape() -> None:
    assert read_usage({"prompt_tokens": 7, "completion_tokens": 9,
                       "completion_tokens_details": {"reasoning_tokens": 4}}) == Usage(7, 9, 4)
    assert read_usage({"prompt_tokens": 7, "total_tokens": 7}) == Usage(7, 0, 0)  # embeddings
    assert read_usage({"input_tokens": 5, "output_tokens": 8, "output_tokens_details": {"reasoning_tokens": 6},
                       "input_tokens_details": {"cached_tokens": 0}}) == Usage(5, 8, 6)
    # Upstream JSON is never trusted: wrong types and negatives are 0; no object, no usage.
    assert read_usage({"prompt_tokens": "7", "completion_tokens": -1, "completion_tokens_details": None}) == \
        Usage(0, 0, 0)
    assert read_usage({"input_tokens": True, "output_tokens": 3.5}) == Usage(0, 0, 0)
    assert read_usage(None) is None and read_usage([1]) is None
    assert answer_usage({"type": "response.completed", "response": {"usage": {"input_tokens": 1,
                                                                              "output_tokens": 2}}}) == Usage(1, 2, 0)
    assert answer_usage({"object": "response", "usage": None}) is None


def test_prompt_estimate_counts_text_and_a_fixed_allowance_per_media_part() -> None:
    text = "x" * 400  # 100 tokens
    assert estimate_prompt_tokens({"messages": [{"role": "user", "content": text}]}) == 100 + 3
    media = [{"type": "image_url", "image_url": {"url": IMAGE_URL}},
             {"type": "input_audio", "input_audio": {"data": "UklGR" * 20_000, "format": "wav"}},
             {"type": "file", "file": {"file_data": "JVBER" * 20_000, "filename": "a.pdf"}},
             {"type": "text", "text": text}]
    assert estimate_prompt_tokens({"messages": [{"role": "user", "content": media}]}) == 100 + 3 * MEDIA_PART_TOKENS + 3
    responses = {"instructions": "x" * 40, "input": [
        {"role": "user", "content": [{"type": "input_text", "text": text},
                                     {"type": "input_image", "image_url": IMAGE_URL},
                                     {"type": "input_file", "file_data": "JVBER" * 20_000}]},
        {"type": "function_call_output", "call_id": "c1", "output": "y" * 40}]}
    assert estimate_prompt_tokens(responses) == 10 + 100 + 2 * MEDIA_PART_TOKENS + 10 + 3
    tools = {"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "z" * 80}}]}]}
    assert estimate_prompt_tokens(tools) == 20 + 3
    assert estimate_prompt_tokens({"prompt": [1, 2, 3, 4]}) == 4  # token ids: one each
    assert estimate_prompt_tokens({"input": ["a" * 8, "b" * 8]}) == 4  # embeddings
    assert estimate_prompt_tokens({"model": "m"}) == 0
    # Hostile shapes never raise: unhashable types, deep nesting, odd values.
    deep: Any = "x" * 4
    for _ in range(100):
        deep = [{"role": "user", "content": deep}]
    for payload in ({"messages": [{"type": ["image_url"], "content": {"type": {}}}]}, {"messages": deep},
                    {"input": [None, True, 1.5, {"content": [[]]}]}, {"prompt": {"text": 5}}):
        assert estimate_prompt_tokens(payload) >= 0


# -- chat and completions, the engine reports usage -------------------------------------------------

@pytest.mark.parametrize("shape", ["", "reasoning", "tools", "reasoning,tools"])
def test_chat_not_streamed_books_the_engines_usage(proxy: ProxyProc, sim: SimBackend, client: openai.OpenAI,
                                                   shape: str) -> None:
    rid = new_id()
    resp = client.chat.completions.create(model=MODEL, messages=TEXT, max_tokens=12, extra_body={"sim_shape": shape},
                                          extra_headers={"x-request-id": rid})
    message = resp.choices[0].message
    if "tools" in shape:
        assert message.tool_calls and message.tool_calls[0].function.arguments
    assert tokens_of(booked(proxy, rid)) == chat_usage(resp.usage)
    assert resp.usage.completion_tokens == 12 == sim.truth(rid)["completion_tokens"]
    assert (resp.usage.completion_tokens_details is not None) == ("reasoning" in shape)


@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.parametrize("shape", ["reasoning", "tools", "reasoning,tools"])
def test_chat_streamed_books_the_engines_usage(proxy: ProxyProc, sim: SimBackend, client: openai.OpenAI,
                                               shape: str, include_usage: bool) -> None:
    rid = new_id()
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = client.chat.completions.create(model=MODEL, messages=TEXT, max_tokens=10, stream=True,
                                            extra_body={"sim_shape": shape}, extra_headers={"x-request-id": rid},
                                            **options)  # type: ignore[call-overload]
    chunks = list(stream)
    reasoning = sum(1 for c in chunks if c.choices and getattr(c.choices[0].delta, "reasoning_content", None))
    arguments = sum(1 for c in chunks if c.choices and c.choices[0].delta.tool_calls
                    and c.choices[0].delta.tool_calls[0].function.arguments)
    assert reasoning == (5 if "reasoning" in shape else 0)
    assert arguments == (5 if "reasoning" in shape else 10) * ("tools" in shape)
    truth = sim.truth(rid)
    expected = (truth["prompt_tokens"], truth["completion_tokens"], 5 if "reasoning" in shape else 0)
    assert tokens_of(booked(proxy, rid)) == expected
    if include_usage:
        assert chat_usage(chunks[-1].usage) == expected
    else:
        assert all(c.usage is None for c in chunks)  # the usage the proxy asked for stays withheld


def test_image_prompt_books_the_engines_count_not_the_bytes(proxy: ProxyProc, sim: SimBackend,
                                                            client: openai.OpenAI) -> None:
    rid = new_id()
    resp = client.chat.completions.create(model=MODEL, messages=image_messages(), max_tokens=3,  # type: ignore[arg-type]
                                          extra_headers={"x-request-id": rid})
    assert sim.truth(rid)["prompt_tokens"] == resp.usage.prompt_tokens > 700  # the engine's per-image count
    assert booked(proxy, rid)["prompt_tokens"] == resp.usage.prompt_tokens


# -- the engine ignores stream_options: no usage, the fallback counts every delta -------------------

@pytest.mark.parametrize("shape", ["no-usage", "no-usage,reasoning", "no-usage,tools", "no-usage,reasoning,tools"])
def test_without_usage_every_delta_kind_is_counted(proxy: ProxyProc, sim: SimBackend, client: openai.OpenAI,
                                                   shape: str) -> None:
    rid = new_id()
    stream = client.chat.completions.create(model=MODEL, messages=TEXT, max_tokens=14, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"sim_shape": shape}, extra_headers={"x-request-id": rid})
    chunks = list(stream)
    assert all(c.usage is None for c in chunks)
    view = booked(proxy, rid)
    assert view["completion_tokens"] == 14 == sim.truth(rid)["completion_tokens"]
    assert view["reasoning_tokens"] == 0  # not known without usage
    assert view["prompt_tokens"] == estimate_prompt_tokens({"messages": TEXT})


def test_without_usage_an_image_prompt_is_estimated_from_its_text(proxy: ProxyProc, sim: SimBackend,
                                                                  client: openai.OpenAI) -> None:
    rid = new_id()
    messages = image_messages()
    list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, stream=True,  # type: ignore[arg-type]
                                        extra_body={"sim_shape": "no-usage"}, extra_headers={"x-request-id": rid}))
    view = booked(proxy, rid)
    assert view["completion_tokens"] == 4
    # The question's text plus one image's allowance, not the data URL's 87 KB as text.
    assert view["prompt_tokens"] == estimate_prompt_tokens({"messages": messages})
    assert MEDIA_PART_TOKENS < view["prompt_tokens"] < MEDIA_PART_TOKENS + 20
    assert view["prompt_tokens"] < len(orjson.dumps(messages)) // 4 // 20


def test_completions_stream_without_usage(proxy: ProxyProc, sim: SimBackend, client: openai.OpenAI) -> None:
    rid = new_id()
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=9, stream=True,
                                            extra_body={"sim_shape": "no-usage"}, extra_headers={"x-request-id": rid}))
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) == 9
    assert booked(proxy, rid)["completion_tokens"] == 9 == sim.truth(rid)["completion_tokens"]


@pytest.mark.parametrize("stream", [False, True])
def test_completions_book_the_engines_usage(proxy: ProxyProc, sim: SimBackend, client: openai.OpenAI,
                                            stream: bool) -> None:
    rid = new_id()
    if stream:
        chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, stream=True,
                                                stream_options={"include_usage": True},
                                                extra_headers={"x-request-id": rid}))
        usage = chunks[-1].usage
    else:
        usage = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6,
                                          extra_headers={"x-request-id": rid}).usage
    assert usage is not None
    assert tokens_of(booked(proxy, rid)) == (usage.prompt_tokens, usage.completion_tokens, 0)


def test_embeddings_book_the_engines_prompt_tokens(proxy: ProxyProc, client: openai.OpenAI) -> None:
    rid = new_id()
    resp = client.embeddings.create(model=MODEL, input=["a short one", "and a somewhat longer second input"],
                                    extra_headers={"x-request-id": rid})
    assert tokens_of(booked(proxy, rid)) == (resp.usage.prompt_tokens, 0, 0)


# -- the Responses API ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["", "reasoning", "tools"])
def test_responses_not_streamed(proxy: ProxyProc, sim: SimBackend, client: openai.OpenAI, shape: str) -> None:
    rid = new_id()
    resp = client.responses.with_raw_response.create(
        model=MODEL, input="Say something short.", max_output_tokens=8, extra_body={"sim_shape": shape},
        extra_headers={"x-request-id": rid})
    assert resp.headers["x-energy-backend"] == "h100" and float(resp.headers["x-energy-joules"]) > 0
    parsed = resp.parse()
    usage = parsed.usage
    assert usage is not None and usage.output_tokens == 8
    if shape == "":
        assert parsed.output_text.strip()
    expected = (usage.input_tokens, usage.output_tokens, usage.output_tokens_details.reasoning_tokens)
    assert expected[2] == (4 if shape == "reasoning" else 0)
    assert tokens_of(booked(proxy, rid)) == expected
    assert sim.truth(rid)["completion_tokens"] == 8


@pytest.mark.parametrize("shape", ["", "reasoning", "tools"])
def test_responses_streamed_complete_after_its_final_event(proxy: ProxyProc, sim: SimBackend,
                                                           client: openai.OpenAI, shape: str) -> None:
    rid = new_id()
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Describe this."},
                                          {"type": "input_image", "image_url": IMAGE_URL}]}]
    events = list(client.responses.create(model=MODEL, input=items, stream=True,  # type: ignore[arg-type]
                                          extra_body={"sim_shape": shape}, extra_headers={"x-request-id": rid}))
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"  # and no error event after it
    usage = events[-1].response.usage
    assert usage is not None
    deltas = [e for e in events if e.type.endswith(".delta")]
    assert len(deltas) == usage.output_tokens == sim.truth(rid)["completion_tokens"]
    assert usage.input_tokens == sim.truth(rid)["prompt_tokens"] > 700  # the image, counted by the engine
    assert tokens_of(booked(proxy, rid)) == (usage.input_tokens, usage.output_tokens,
                                             usage.output_tokens_details.reasoning_tokens)


def test_responses_stream_ends_with_the_energy_comment(proxy: ProxyProc) -> None:
    rid = new_id()
    with httpx.stream("POST", proxy.url + "/v1/responses", timeout=30, json={
            "model": MODEL, "input": "Hi", "max_output_tokens": 5, "stream": True},
            headers={"Authorization": f"Bearer {KEYS['acme']}", "x-request-id": rid}) as resp:
        body = resp.read()
    assert resp.status_code == 200
    events = body.decode().split("\n\n")
    assert events[-1] == ""
    assert events[-3].startswith("event: response.incomplete\n")  # max_output_tokens reached
    comment = events[-2]
    assert comment.startswith(": energy ")
    energy = orjson.loads(comment[len(": energy "):])
    assert energy["backend"] == "h100" and energy["joules"] > 0
    assert "[DONE]" not in body.decode() and '"upstream_error"' not in body.decode()
    assert booked(proxy, rid)["completion_tokens"] == 5


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "hi"}, "model"),
    ({"model": MODEL}, "input"),
    ({"model": MODEL, "input": 42}, "input"),
    ({"model": MODEL, "input": "hi", "stream": "yes"}, "stream"),
    # A background response runs on after its answer, outside max_in_flight and unbilled.
    ({"model": MODEL, "input": "hi", "background": True}, "background"),
])
def test_responses_bad_requests_are_openai_shaped(proxy: ProxyProc, body: dict[str, Any], param: str) -> None:
    resp = httpx.post(proxy.url + "/v1/responses", json=body, timeout=10,
                      headers={"Authorization": f"Bearer {KEYS['acme']}"})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == param


# -- totals --------------------------------------------------------------------------------------------

def test_usage_totals_carry_reasoning_tokens(proxy: ProxyProc) -> None:
    """`/v1/energy/usage` sums reasoning tokens per tenant (globex: only this test's requests)."""
    globex = sdk_client(proxy, "globex")
    chat = globex.chat.completions.create(model=MODEL, messages=TEXT, max_tokens=6,  # type: ignore[arg-type]
                                          extra_body={"sim_shape": "reasoning"})
    resp = globex.responses.create(model=MODEL, input="Think, then answer.", max_output_tokens=10,
                                   extra_body={"sim_shape": "reasoning"})
    assert chat.usage is not None and resp.usage is not None
    want = {"requests": 2, "prompt_tokens": chat.usage.prompt_tokens + resp.usage.input_tokens,
            "completion_tokens": 6 + 10, "reasoning_tokens": 3 + 5}
    total: dict[str, Any] = {}

    def flushed() -> bool:
        nonlocal total
        total = httpx.get(f"{proxy.url}/v1/energy/usage?tenant=globex", timeout=10,
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["total"]
        return total["requests"] == 2

    wait_until(flushed, 15, "the two requests in the ledger")
    assert {k: total[k] for k in want} == want


# -- a stream with one endless line ------------------------------------------------------------------

def test_an_endless_line_is_cut_and_what_was_relayed_is_billed(proxy: ProxyProc, endless: EndlessBackend) -> None:
    rid = new_id()
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", timeout=30, json={
            "model": ENDLESS_MODEL, "messages": TEXT, "stream": True},
            headers={"Authorization": f"Bearer {KEYS['acme']}", "x-request-id": rid}) as resp:
        body = resp.read()
    events = body.split(b"\n\n")
    assert len(events) == 4 and events[-1] == b""  # two tokens, then the error
    error = orjson.loads(events[2][len(b"data: "):])["error"]
    assert error["code"] == "upstream_error" and f"longer than {MAX_SSE_LINE_BYTES} bytes" in error["message"]
    # The proxy closed the upstream: the server's write failed long before its 64 MiB (what
    # it got out went to the socket buffers).
    wait_until(lambda: endless.ended is not None, 15, "the endless stream to be closed")
    assert endless.ended != "complete"
    assert endless.sent_bytes < 64 * MAX_SSE_LINE_BYTES
    view = booked(proxy, rid)
    assert view["completion_tokens"] == 2 and view["status"] == 502  # cut: booked as a failed stream
