"""Clients for the fault scenarios: one request's outcome as a user sees it, and the ledger's view.

Every call runs under `asyncio.wait_for(deadline_s)`: a request still open at its deadline is
`hung`, whatever the proxy does later. The deadline is the proxy's request_timeout_s plus a
margin for this slow, shared machine; it is a bound, never a synchronisation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson

from tests.conftest import KEYS, MODEL, ProxyProc, backend_yaml, tenants_yaml
from tests.faults.conftest import Figures
from tests.faults.servers import FaultServer

MESSAGES = [{"role": "user", "content": "What does a fault cost in joules?"}]
ERROR_FIELDS = {"message", "type", "param", "code"}


@dataclass
class Outcome:
    """One request as its client saw it."""

    request_id: str
    result: str  # ok | clean | hung | unclean
    backend: str | None  # x-energy-backend: a backend's answer was relayed, so it is billed
    tokens: int  # content chunks (one token each) the client received
    elapsed_s: float
    detail: str = ""  # the error's status/code, or what went wrong
    start_s: float = 0.0  # time.monotonic() when it was sent


def client(proxy: ProxyProc, timeout_s: float) -> openai.AsyncOpenAI:
    """The async openai SDK as tenant acme: no retries (a retry would hide the fault)."""
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=KEYS["acme"], max_retries=0,
                              timeout=timeout_s)


def _clean_error(body: object) -> bool:
    """An OpenAI-shaped error object: {"message", "type", "param", "code"}."""
    return isinstance(body, dict) and set(body) == ERROR_FIELDS and isinstance(body["message"], str)


async def sdk_stream(sdk: openai.AsyncOpenAI, request_id: str, max_tokens: int, deadline_s: float,
                     model: str = MODEL, on_start: Callable[[str], None] | None = None) -> Outcome:
    """One streamed chat completion with usage through the SDK, classified.

    ok: every token, a finish_reason and the usage chunk; clean: an OpenAI-shaped status error or
    SSE error event (the SDK raises APIError with its body); anything else is unclean.
    `on_start(request_id)` is called when the first chunk has arrived.
    """
    start = time.monotonic()
    seen: dict[str, Any] = {"backend": None, "tokens": 0}

    async def go() -> Outcome:
        raw = await sdk.chat.completions.with_raw_response.create(
            model=model, messages=MESSAGES, max_tokens=max_tokens, stream=True,
            stream_options={"include_usage": True}, extra_headers={"x-request-id": request_id})
        seen["backend"] = raw.headers.get("x-energy-backend")
        finish, usage, announce = None, None, on_start
        async for chunk in raw.parse():  # the legacy raw response parses synchronously
            if announce is not None:
                announce(request_id)
                announce = None
            if chunk.choices:
                seen["tokens"] += bool(chunk.choices[0].delta.content)
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
        complete = finish == "length" and usage is not None and usage.completion_tokens == seen["tokens"] == max_tokens
        return _outcome(request_id, "ok" if complete else "unclean", seen, start,
                        "" if complete else f"incomplete: {seen['tokens']} tokens, finish {finish}, usage {usage}")

    try:
        return await asyncio.wait_for(go(), deadline_s)
    except TimeoutError:
        return _outcome(request_id, "hung", seen, start, f"no answer in {deadline_s} s")
    except openai.APIStatusError as exc:
        seen["backend"] = exc.response.headers.get("x-energy-backend")
        clean = exc.status_code != 500 and _clean_error(exc.body)
        return _outcome(request_id, "clean" if clean else "unclean", seen, start, f"{exc.status_code} {exc.code}")
    except openai.APIConnectionError as exc:  # the connection broke: no error event arrived
        return _outcome(request_id, "unclean", seen, start, f"connection: {exc.__cause__!r}")
    except openai.APIError as exc:  # an SSE `data: {"error": ...}` event
        clean = _clean_error(exc.body)
        return _outcome(request_id, "clean" if clean else "unclean", seen, start, f"stream error {exc.code}")
    except Exception as exc:  # a JSON decode error on garbage, or anything else
        return _outcome(request_id, "unclean", seen, start, repr(exc))


def _outcome(request_id: str, result: str, seen: dict[str, Any], start: float, detail: str) -> Outcome:
    return Outcome(request_id, result, seen["backend"], seen["tokens"], time.monotonic() - start, detail, start)


async def http_post(client: httpx.AsyncClient, request_id: str, payload: dict[str, Any], deadline_s: float,
                    key: str = KEYS["acme"]) -> tuple[Outcome, bytes, int]:
    """POST a chat completion with plain httpx (no SDK parsing): (outcome, body, status).

    A 200 is `ok` if a non-streamed body is JSON, or a stream ends with [DONE]; a stream that
    ends in a well-formed SSE error event, or an OpenAI-shaped error status other than 500, is
    `clean`. `tokens` counts the content chunks in complete events.
    """
    start = time.monotonic()
    headers = {"Authorization": f"Bearer {key}", "x-request-id": request_id}

    async def go() -> tuple[Outcome, bytes, int]:
        async with client.stream("POST", "/v1/chat/completions", headers=headers, json=payload) as resp:
            body = await resp.aread()
        backend = resp.headers.get("x-energy-backend")
        result, detail = classify_body(resp.status_code, resp.headers.get("content-type", ""), body)
        tokens = body.count(b'"content":"')
        return Outcome(request_id, result, backend, tokens, time.monotonic() - start, detail), body, resp.status_code

    try:
        return await asyncio.wait_for(go(), deadline_s)
    except TimeoutError:
        return Outcome(request_id, "hung", None, 0, time.monotonic() - start, f"no answer in {deadline_s} s"), b"", 0
    except httpx.HTTPError as exc:
        return Outcome(request_id, "unclean", None, 0, time.monotonic() - start, repr(exc)), b"", 0


def classify_body(status: int, content_type: str, body: bytes) -> tuple[str, str]:
    """(result, detail) of a complete response, as `http_post` describes."""
    if status != 200:
        try:
            error = orjson.loads(body).get("error")
        except (orjson.JSONDecodeError, AttributeError):
            error = None
        clean = status != 500 and _clean_error(error)
        return ("clean" if clean else "unclean"), f"{status} {error.get('code') if clean else body[:80]!r}"
    if content_type.startswith("text/event-stream"):
        if body.endswith(b"data: [DONE]\n\n"):
            return "ok", ""
        last = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
        try:
            error = orjson.loads(last.removeprefix(b"data: ")).get("error") if last.startswith(b"data: ") else None
        except (orjson.JSONDecodeError, AttributeError):
            error = None
        if _clean_error(error):
            return "clean", f"stream error {error['code']}"
        return "unclean", f"stream ended without [DONE] or an error event: {body[-120:]!r}"
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return "unclean", f"200 with a body that is not JSON: {body[:80]!r}"
    return "ok", ""


async def gather_bounded(calls: Iterable[Callable[[], Awaitable[Outcome]]], concurrency: int) -> list[Outcome]:
    """Run the calls with at most `concurrency` open at once; their outcomes in order."""
    gate = asyncio.Semaphore(concurrency)

    async def one(call: Callable[[], Awaitable[Outcome]]) -> Outcome:
        async with gate:
            return await call()

    return await asyncio.gather(*(one(c) for c in calls))


def tally(fig: Figures, outcomes: Iterable[Outcome], ledger_ids: set[str] | None = None) -> None:
    """Add `outcomes` to the scenario's row; with `ledger_ids`, count those of them booked."""
    for o in outcomes:
        fig.sent += 1
        fig.succeeded += o.result == "ok"
        fig.clean += o.result == "clean"
        fig.hung += o.result == "hung"
        fig.unclean += o.result == "unclean"
        fig.answered += o.backend is not None
        if ledger_ids is not None:
            fig.ledger += o.request_id in ledger_ids
        if o.result in ("hung", "unclean"):
            fig.notes.append(f"{o.request_id}: {o.result} {o.detail}")


def proxy_yaml(backends: list[tuple[str, str, str]], server: str, ledger: str) -> str:
    """A proxy config: `server` settings (flow-style YAML body), backends as (name, base URL
    without /v1, extra flow-style fields) all serving MODEL, round robin, the test tenants."""
    text = f"server: {{{server}}}\nbackends:\n"
    for name, url, extra in backends:
        text += backend_yaml(name, url, [MODEL], extra)
    return text + f"routing: {{policy: round_robin}}\nledger: '{ledger}'\n" + tenants_yaml()


def post_many(proxy: ProxyProc, prefix: str, payload: dict[str, Any], n: int,
              deadline_s: float) -> list[tuple[Outcome, bytes, int]]:
    """`n` copies of `payload` sent at once with httpx (ids `prefix-0`...): `http_post`'s results."""
    async def load() -> list[tuple[Outcome, bytes, int]]:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=deadline_s + 5) as http:
            return await asyncio.gather(*(http_post(http, f"{prefix}-{i}", payload, deadline_s)
                                          for i in range(n)))

    return asyncio.run(load())


@contextmanager
def lone_fault_proxy(mode: str, tmp_path: Path, timeout_s: float) -> Iterator[tuple[FaultServer, ProxyProc, Path]]:
    """A `FaultServer(mode)` and a proxy (SQLite ledger at the yielded path) with it as its only
    backend. The circuit threshold is high: these scenarios are about each answer, not the breaker."""
    server = FaultServer(mode)
    db = tmp_path / "ledger.db"
    config = proxy_yaml([(mode, server.url, "")],
                        f"request_timeout_s: {timeout_s}, health_interval_s: 0.2, circuit_failures: 1000",
                        f"sqlite:///{db}")
    try:
        proxy = ProxyProc(config, tmp_path)
        try:
            yield server, proxy, db
        finally:
            proxy.stop()
        assert "Traceback" not in proxy.log(), proxy.log()[-3000:]
    finally:
        server.stop()


class StreamLoad:
    """`concurrency` SDK clients, each sending streams back to back (ids `prefix-0`, ...) until
    `run`'s script returns; `outcomes` in the order they finished."""

    def __init__(self, proxy: ProxyProc, prefix: str, concurrency: int, deadline_s: float,
                 max_tokens: Callable[[int], int], model: Callable[[int], str] = lambda i: MODEL) -> None:
        self.proxy, self.prefix, self.concurrency, self.deadline_s = proxy, prefix, concurrency, deadline_s
        self.max_tokens, self.model = max_tokens, model
        self.outcomes: list[Outcome] = []
        self._sent = 0
        self._stop = asyncio.Event()
        self._progress = asyncio.Event()

    async def until(self, n: int) -> None:
        """Wait until `n` requests have finished (in any way)."""
        while len(self.outcomes) < n:
            self._progress.clear()
            await self._progress.wait()

    async def _worker(self, sdk: openai.AsyncOpenAI) -> None:
        while not self._stop.is_set():
            i, self._sent = self._sent, self._sent + 1
            self.outcomes.append(await sdk_stream(sdk, f"{self.prefix}-{i}", self.max_tokens(i), self.deadline_s,
                                                  self.model(i)))
            self._progress.set()

    def run(self, script: Callable[[StreamLoad], Awaitable[None]], timeout_s: float = 120.0) -> list[Outcome]:
        """Run the clients and `script(self)` together; stop sending when the script returns."""
        async def main() -> None:
            sdk = client(self.proxy, self.deadline_s + 5)

            async def scripted() -> None:
                try:
                    await script(self)
                finally:
                    self._stop.set()

            try:
                await asyncio.gather(scripted(), *(self._worker(sdk) for _ in range(self.concurrency)))
            finally:
                await sdk.close()

        asyncio.run(asyncio.wait_for(main(), timeout_s))
        return self.outcomes
