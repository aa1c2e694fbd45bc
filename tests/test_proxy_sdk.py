"""The official openai SDK, sync and async, against `joulegate serve` over real sockets."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from aiohttp import web

from tests.conftest import (
    ADMIN_KEY,
    KEYS,
    MODEL,
    ProxyProc,
    SimBackend,
    async_sdk_client,
    backend_yaml,
    free_port,
    sdk_client,
    stream_chat_raw,
    tenants_yaml,
    wait_until,
)

SLOW_MODEL = "slow-model"
BROKEN_MODEL = "broken-model"
DEAD_MODEL = "dead-model"


class BrokenBackend:
    """A real HTTP server that passes health checks and answers inference with a bare 500."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        async def models(_: web.Request) -> web.Response:
            return web.json_response({"object": "list", "data": [{"id": BROKEN_MODEL, "object": "model"}]})

        async def broken(_: web.Request) -> web.Response:
            return web.Response(status=500, text="Internal Server Error\nTraceback: upstream secrets here")

        async def start() -> None:
            app = web.Application()
            app.router.add_get("/v1/models", models)
            app.router.add_post("/v1/chat/completions", broken)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()


@pytest.fixture(scope="session")
def proxy(sims: dict[str, SimBackend], session_tmp: Path) -> Iterator[ProxyProc]:
    slow = SimBackend("l4-llama3.1-8b", session_tmp, model=SLOW_MODEL)
    broken = BrokenBackend()
    config = "server: {max_body_bytes: 65536}\nbackends:\n"
    for name, sim in sims.items():
        config += backend_yaml(name, sim.url)
    config += backend_yaml("slow", slow.url, [SLOW_MODEL], ", max_concurrency: 1")
    config += backend_yaml("broken", broken.url)
    config += backend_yaml("dead", f"http://127.0.0.1:{free_port()}", [DEAD_MODEL])
    config += "routing: {policy: round_robin}\nledger: memory://\n" + tenants_yaml()
    proc = ProxyProc(config, session_tmp)
    yield proc
    code = proc.stop()
    slow.stop()
    log = proc.log()
    assert "Traceback" not in log, log[-3000:]
    for key in (*KEYS.values(), ADMIN_KEY):
        assert key not in log
    # uvicorn drains, then re-raises SIGTERM so the exit status says how it stopped.
    assert code in (0, -15), log[-2000:]


MESSAGES = [{"role": "user", "content": "How many joules does a token cost?"}]


def test_models_list_is_the_union_of_backends(proxy: ProxyProc) -> None:
    ids = {m.id for m in sdk_client(proxy).models.list()}
    assert {MODEL, SLOW_MODEL, BROKEN_MODEL, DEAD_MODEL} <= ids
    assert sdk_client(proxy).models.retrieve(MODEL).id == MODEL


def test_chat_non_streamed(proxy: ProxyProc, sims: dict[str, SimBackend]) -> None:
    raw = sdk_client(proxy).chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, extra_headers={"x-request-id": "test-chat-1"},
    )
    completion = raw.parse()
    assert completion.usage.completion_tokens == 12
    assert completion.usage.prompt_tokens > 0
    assert completion.choices[0].message.content
    assert raw.headers["x-request-id"] == "test-chat-1"
    backend = raw.headers["x-energy-backend"]
    assert backend in sims
    # The same id went upstream: the simulator that served it knows it by that id.
    truth = sims[backend].truth("test-chat-1")
    assert truth["completion_tokens"] == 12


def test_request_id_is_generated_when_absent(proxy: ProxyProc) -> None:
    raw = sdk_client(proxy).chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert len(raw.headers["x-request-id"]) >= 16


def test_chat_streamed_without_usage_withholds_the_usage_chunk(proxy: ProxyProc) -> None:
    stream = sdk_client(proxy).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, stream=True)
    chunks = list(stream)
    text_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(text_chunks) == 20
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks), "the usage chunk (choices: []) must not reach this client"


def test_chat_streamed_with_usage(proxy: ProxyProc) -> None:
    stream = sdk_client(proxy).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=16, stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 16
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 16


def test_raw_stream_is_sse_ending_in_done(proxy: ProxyProc) -> None:
    resp, body = stream_chat_raw(
        proxy, {"model": MODEL, "messages": MESSAGES, "max_tokens": 5, "stream": True})
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert body.endswith(b"data: [DONE]\n\n")
    assert body.count(b'"content":"') == 5
    assert b'"usage":{' not in body, "the client did not ask for usage"


def test_completions_streamed_and_not(proxy: ProxyProc) -> None:
    c = sdk_client(proxy)
    done = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=7)
    assert done.usage.completion_tokens == 7
    chunks = list(c.completions.create(model=MODEL, prompt="Once", max_tokens=9, stream=True,
                                       stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 9


def test_embeddings(proxy: ProxyProc) -> None:
    result = sdk_client(proxy).embeddings.create(model=MODEL, input=["one joule", "two joules"])
    assert len(result.data) == 2
    assert len(result.data[0].embedding) > 0
    assert result.usage.prompt_tokens > 0


def test_async_concurrent_requests_spread_over_backends(proxy: ProxyProc, sims: dict[str, SimBackend]) -> None:
    async def run() -> list[str]:
        c = async_sdk_client(proxy, "globex")

        async def one(i: int) -> str:
            raw = await c.chat.completions.with_raw_response.create(
                model=MODEL, messages=MESSAGES, max_tokens=4 + i % 5, stream=False,
            )
            assert raw.parse().usage.completion_tokens == 4 + i % 5
            return raw.headers["x-energy-backend"]

        async def streamed(i: int) -> str:
            stream = await c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, stream=True)
            n = 0
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    n += 1
            assert n == 6
            return "stream"

        results = await asyncio.gather(*(one(i) for i in range(18)), *(streamed(i) for i in range(6)))
        await c.close()
        return results

    backends = asyncio.run(run())
    assert set(backends) - {"stream"} == set(sims), "round robin uses every healthy backend"


# -- errors, each in the SDK's own class ---------------------------------------------------------


def test_400_wrong_types(proxy: ProxyProc) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk_client(proxy).chat.completions.create(model=MODEL, messages="not a list")  # type: ignore[arg-type]
    assert info.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        sdk_client(proxy).chat.completions.create(model=MODEL, messages=MESSAGES, stream="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"", b"\xff\xfe", b'{"model": 5, "messages": []}'])
def test_400_malformed_bodies(proxy: ProxyProc, body: bytes) -> None:
    resp = httpx.post(proxy.url + "/v1/chat/completions", content=body,
                      headers={"Authorization": f"Bearer {KEYS['acme']}"})
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_401_missing_and_bad_key(proxy: ProxyProc) -> None:
    bad = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert "sk-wrong" not in str(info.value)
    resp = httpx.post(proxy.url + "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES})
    assert resp.status_code == 401


def test_404_unknown_model(proxy: ProxyProc) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        sdk_client(proxy).chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert info.value.code == "model_not_found"


def test_413_oversized_body(proxy: ProxyProc) -> None:
    huge = [{"role": "user", "content": "x" * 70_000}]
    with pytest.raises(openai.APIStatusError) as info:
        sdk_client(proxy).chat.completions.create(model=MODEL, messages=huge)
    assert info.value.status_code == 413


def test_429_when_every_backend_is_at_its_limit(proxy: ProxyProc) -> None:
    c = sdk_client(proxy)
    # Hold the slow backend's only slot with a long stream, then ask again.
    stream = c.chat.completions.create(model=SLOW_MODEL, messages=MESSAGES, max_tokens=200, stream=True)
    try:
        next(iter(stream))
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model=SLOW_MODEL, messages=MESSAGES, max_tokens=1)
    finally:
        stream.close()
    # Closing the stream frees the slot again.
    wait_until(lambda: _slow_accepts(c), 10, "the slow backend's slot to be free")


def _slow_accepts(c: openai.OpenAI) -> bool:
    try:
        c.chat.completions.create(model=SLOW_MODEL, messages=MESSAGES, max_tokens=1)
        return True
    except openai.RateLimitError:
        return False


def test_502_backend_answers_garbage(proxy: ProxyProc) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        sdk_client(proxy).chat.completions.create(model=BROKEN_MODEL, messages=MESSAGES)
    assert info.value.status_code == 502
    assert "secrets" not in str(info.value.body)


def test_503_no_healthy_backend(proxy: ProxyProc) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        sdk_client(proxy).chat.completions.create(model=DEAD_MODEL, messages=MESSAGES)
    assert info.value.status_code == 503


def test_unknown_route_and_method(proxy: ProxyProc) -> None:
    assert httpx.get(proxy.url + "/nope").json()["error"]["code"] == "not_found"
    resp = httpx.get(proxy.url + "/v1/chat/completions")
    assert resp.status_code == 405
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_route_table_answers(proxy: ProxyProc) -> None:
    """Each kind of route's refusal: 405 naming the allowed methods, 404 for a pass-through
    path asked with another method, 414 for an over-long query; an x-request-id on each."""
    cases = [("POST", "/v1/energy/usage", 405, "GET"), ("DELETE", "/v1/embeddings", 405, "POST"),
             ("GET", "/v1/rerank", 404, None), ("POST", "/v1/load_lora_adapter", 404, None),
             ("POST", "/v1/chat/completions?q=" + "x" * 5000, 414, None),
             ("POST", "/v1/rerank?q=" + "x" * 5000, 414, None)]
    for method, path, status, allow in cases:
        resp = httpx.request(method, proxy.url + path, timeout=10)
        assert resp.status_code == status, (method, path[:40])
        assert resp.headers.get("allow") == allow
        assert resp.headers["x-request-id"] and resp.json()["error"]["message"]


def test_health_ready_and_metrics(proxy: ProxyProc) -> None:
    assert httpx.get(proxy.url + "/healthz").status_code == 200
    assert httpx.get(proxy.url + "/readyz").json()["ready"] is True
    text = httpx.get(proxy.url + "/metrics").text
    assert "joulegate_requests_total" in text
    assert 'joulegate_backend_up{backend="dead"} 0.0' in text
