"""The hot path, top to bottom: authenticate, read, validate, route, forward, stream, finish.

One `Relay` serves every inference route (chat, completions, embeddings, other `/v1/*` calls
that name a model). It speaks raw ASGI: no request or response objects on the way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson

from policies import Policy, RequestInfo
from policies.model import Ticket
from proxy.accounting import Accounting
from proxy.auth import Authenticator
from proxy.backends import Backend, BackendPool
from proxy.config import Config
from proxy.energy.meter import EnergyMeter
from proxy.errors import ProxyError, bad_request, model_not_found
from proxy.records import RequestRecord
from proxy.sse import StreamTap
from proxy.usage import answer_usage, estimate_prompt_tokens
from proxy.watchdog import SendWatchdog

log = logging.getLogger("joulegate.relay")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

#: (kind, field that must be present, its accepted types) per inference route.
_REQUIRED: dict[str, tuple[str, tuple[type, ...]]] = {
    "chat": ("messages", (list,)),
    "completion": ("prompt", (str, list)),
    "embedding": ("input", (str, list)),
    "response": ("input", (str, list)),
}
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_JSON = b"application/json"
# Load shedding answers say when to come back (the openai SDKs honour it when they retry).
_RETRY_SOON = [(b"retry-after", b"1")]


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


class Relay:
    """Forwards one inference request to a backend chosen by the policy and relays the answer."""

    def __init__(
        self,
        config: Config,
        pool: BackendPool,
        policy: Policy,
        auth: Authenticator,
        meter: EnergyMeter,
        accounting: Accounting,
    ) -> None:
        self.config = config
        self.pool = pool
        self.policy = policy
        self.auth = auth
        self.meter = meter
        self.accounting = accounting
        self.max_body_bytes = config.server.max_body_bytes
        self.read_timeout_s = config.server.client_read_timeout_s
        self.max_in_flight = config.server.max_in_flight
        self.in_flight = 0  # inference requests open in this process
        self.timeout = aiohttp.ClientTimeout(
            total=config.server.request_timeout_s, sock_connect=config.server.connect_timeout_s,
        )
        self.watchdog = SendWatchdog(config.server.client_write_timeout_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send, kind: str) -> None:
        authorization, request_id, declared_length = scan_headers(scope["headers"])
        key = os.urandom(12).hex()
        record = RequestRecord(  # without a client id, the proxy's key is the request's id too
            request_id=request_id or key, key=key, tenant="", model="", kind=kind,
            stream=False, start_s=time.time(),
        )
        self.in_flight += 1
        try:
            if self.max_in_flight is not None and self.in_flight > self.max_in_flight:
                raise ProxyError(503, "The proxy is at its limit of requests in flight; retry shortly.",
                                 code="overloaded", headers=_RETRY_SOON)
            principal = self.auth.authenticate(authorization)
            record.tenant = principal.tenant
            try:
                async with asyncio.timeout(self.read_timeout_s):
                    body = await _read_body(receive, declared_length, self.max_body_bytes)
            except TimeoutError:
                raise ProxyError(408, f"The request body did not arrive within {self.read_timeout_s:g} s.",
                                 code="request_timeout") from None
            # Over budget: refused before any GPU sees it.
            record.budget_left_j = await self.accounting.reserve_budget(principal.tenant, record.key)
            payload, upstream_body, withhold_usage = self._parse(body, kind, record)
            await self._forward(scope, receive, send, payload, upstream_body, withhold_usage, record)
        except ProxyError as exc:
            record.status = exc.status
            await send_error(send, exc, record.request_id)
        except ClientGone:
            record.status = 499
        finally:
            self.in_flight -= 1
            self.accounting.release_budget(record)  # a hold not handed to the ledger: refused

    # -- request ------------------------------------------------------------------------------

    def _parse(self, body: bytes, kind: str, record: RequestRecord) -> tuple[dict[str, Any], bytes, bool]:
        """Validate what the proxy relies on.

        Returns the payload, the bytes to send upstream and whether the usage chunk must be
        withheld from the client (it did not ask for usage; the proxy did on its behalf).
        """
        if not body:
            raise bad_request("The request body is empty; expected a JSON object.")
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise bad_request(f"The request body is not valid JSON: {exc.args[0]}") from None
        if not isinstance(payload, dict):
            raise bad_request("The request body must be a JSON object.")
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise bad_request("'model' is required and must be a non-empty string.", param="model")
        stream = payload.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise bad_request("'stream' must be a boolean.", param="stream")
        required = _REQUIRED.get(kind)
        if required is not None:
            field, types = required
            value = payload.get(field)
            if value is None:
                raise bad_request(f"'{field}' is required.", param=field)
            if not isinstance(value, types) or (field == "messages" and not value):
                shape = "a non-empty array" if field == "messages" else "a string or an array"
                raise bad_request(f"'{field}' must be {shape}.", param=field)
        for field in ("max_tokens", "max_completion_tokens", "n"):
            value = payload.get(field)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise bad_request(f"'{field}' must be a non-negative integer.", param=field)
        record.model = model
        record.stream = stream
        if kind != "other":  # text parts only: media bytes are not prompt tokens
            record.prompt_estimate = estimate_prompt_tokens(payload)
        else:
            record.prompt_estimate = len(body) // 4
        withhold_usage = False
        if stream and kind in ("chat", "completion"):
            options = payload.get("stream_options")
            if options is not None and not isinstance(options, dict):
                raise bad_request("'stream_options' must be an object.", param="stream_options")
            if not (options or {}).get("include_usage"):
                # Ask upstream for usage anyway; the usage chunk is withheld from this client.
                payload["stream_options"] = {**(options or {}), "include_usage": True}
                body = orjson.dumps(payload)
                withhold_usage = True
        return payload, body, withhold_usage

    # -- routing and forwarding ---------------------------------------------------------------

    def _choose(self, record: RequestRecord, payload: dict[str, Any], tried: set[str],
                failure: ProxyError | None = None) -> Backend:
        """The policy's pick among the model's backends not `tried` yet; past the last one, the
        last attempt's `failure`."""
        candidates = self.pool.for_model(record.model)
        if not candidates:
            raise model_not_found(record.model)
        views = [b.view() for b in candidates if b.name not in tried]
        info = RequestInfo(
            model=record.model,
            prompt_tokens=record.prompt_estimate,
            max_output_tokens=payload.get("max_tokens") or payload.get("max_completion_tokens"),
            stream=record.stream,
        )
        name = self.policy.choose(info, views, time.time())
        if name is None:
            if tried:
                raise failure or ProxyError(502, "No backend for this model could be reached.",
                                            code="upstream_unreachable")
            if any(v.healthy for v in views):
                raise ProxyError(429, "Every backend for this model is at its concurrency limit.",
                                 code="rate_limit_exceeded", type="rate_limit_error", headers=_RETRY_SOON)
            raise ProxyError(503, f"No healthy backend serves `{record.model}` right now.", code="no_healthy_backend",
                             headers=_RETRY_SOON)
        return self.pool.by_name[name]

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, payload: dict[str, Any], body: bytes,
        withhold_usage: bool, record: RequestRecord,
    ) -> None:
        assert self.pool.session is not None
        suffix = scope["path"][3:]  # "/v1/chat/completions" -> "/chat/completions"
        if scope.get("query_string"):
            suffix += "?" + scope["query_string"].decode("latin-1")
        tried: set[str] = set()
        failure: ProxyError | None = None
        while True:
            backend = self._choose(record, payload, tried, failure)
            tried.add(backend.name)
            headers = {**backend.upstream_headers, "X-Request-Id": record.request_id}
            backend.in_flight += 1
            sent_s = time.time()
            ticket = backend.efficiency.sent(sent_s, record.stream)
            # A rough prompt size lets attribution settle before usage arrives.
            # Keyed by record.key: clients may send the same x-request-id twice, even at once.
            self.meter.open(backend.name, record.key, sent_s, record.stream, record.prompt_estimate)
            try:
                resp = await self.pool.session.post(
                    backend.url + suffix, data=body, headers=headers, timeout=self.timeout,
                )
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
                # Nothing reached the client yet (refused, or closed or reset before answering;
                # ClientOSError includes ClientConnectorError): try another one.
                self._abandon(backend, record, ticket)
                backend.mark_down(f"{type(exc).__name__}: {exc}")
                backend.record_failure(type(exc).__name__)
                continue
            except aiohttp.ClientResponseError:
                # It did not speak HTTP (garbage status line or headers): no byte reached the
                # client, so another backend may answer. The upstream's bytes are never echoed.
                self._abandon(backend, record, ticket)
                backend.record_failure("invalid HTTP response")
                failure = ProxyError(502, "The backend did not answer in HTTP.", code="upstream_error")
                continue
            except TimeoutError:
                self._abandon(backend, record, ticket)
                backend.record_failure("timeout")
                raise ProxyError(504, "The backend did not answer in time.", code="upstream_timeout") from None
            except aiohttp.ClientError as exc:
                self._abandon(backend, record, ticket)
                backend.record_failure(type(exc).__name__)
                raise ProxyError(502, f"The backend failed: {type(exc).__name__}.", code="upstream_error") from None
            break
        record.backend = backend.name
        if resp.status >= 500:
            backend.record_failure(f"HTTP {resp.status}")
        else:
            backend.record_success()
        try:
            is_sse = resp.content_type == "text/event-stream"
            if record.stream and resp.status == 200 and is_sse:
                await self._relay_stream(receive, send, resp, payload, withhold_usage, record, ticket)
            else:
                await self._relay_whole(send, resp, record)
        finally:
            resp.release()
            backend.in_flight -= 1
            if record.end_s is None:
                # The answer broke off before it was relayed (a 502/504 here): nothing to bill,
                # but the meter must not wait for this request's weights until it gives up.
                self.meter.abort(backend.name, record.key, time.time())
            model = backend.efficiency
            if not (record.stream and record.first_token_s is not None):
                model.tokens(record.completion_tokens)  # not streamed: all at the end
            model.finished(time.time(), ticket, record.first_token_s, record.completion_tokens)

    def _abandon(self, backend: Backend, record: RequestRecord, ticket: Ticket) -> None:
        """The request never got an answer from this backend: it spent no tokens there."""
        backend.in_flight -= 1
        backend.efficiency.finished(time.time(), ticket, None, 0)
        self.meter.abort(backend.name, record.key, time.time())

    def _close_energy(self, record: RequestRecord) -> None:
        """Attribute the request's energy with the samples available now."""
        if record.backend is None or record.end_s is None:
            return
        result = self.meter.close_request(
            record.backend, record.key, record.end_s, record.prompt_tokens,
            record.completion_tokens, record.kind == "embedding",
        )
        if result is not None:
            record.joules = result.joules
            record.energy_method = result.method

    async def _relay_whole(self, send: Send, resp: aiohttp.ClientResponse, record: RequestRecord) -> None:
        """A non-streamed answer (or an upstream error): read it all, add energy headers, send."""
        try:
            data = await resp.read()
        except TimeoutError as exc:
            _forget_frames(exc)
            raise ProxyError(504, "The backend did not answer in time.", code="upstream_timeout") from None
        except aiohttp.ClientError as exc:
            _forget_frames(exc)
            raise ProxyError(502, f"The backend broke off its answer: {type(exc).__name__}.",
                             code="upstream_error") from None
        record.end_s = time.time()
        record.status = resp.status
        status = resp.status
        content_type = resp.headers.get("Content-Type", "application/json").encode("latin-1")
        if status == 200 and record.kind != "other":
            if not _take_usage(data, record):
                # A success the client could not parse: say what went wrong instead.
                self.pool.by_name[record.backend or ""].record_failure("invalid JSON body")
                status, data = 502, ProxyError(
                    502, "The backend answered with a body that is not valid JSON.", code="upstream_error").body()
                content_type = _JSON
                record.status = status
        elif status >= 500 and not _looks_like_error(data):
            status, data = 502, ProxyError(502, f"The backend answered HTTP {resp.status}.", code="upstream_error").body()
            content_type = _JSON
        self._close_energy(record)
        self.accounting.finished(record)
        energy = record.energy()
        headers = [(b"content-type", content_type), (b"x-request-id", record.request_id.encode())]
        if record.budget_left_j is not None:
            left_j = record.budget_left_j - (record.joules or 0.0)
            headers.append((b"x-energy-budget-remaining-joules", repr(max(left_j, 0.0)).encode()))
        if record.backend:
            headers.append((b"x-energy-backend", record.backend.encode()))
        if energy is not None and status == 200:
            headers += [
                (b"x-energy-joules", repr(energy["joules"]).encode()),
                (b"x-energy-tokens-per-joule", repr(energy["tokens_per_joule"]).encode()),
                (b"x-energy-method", energy["method"].encode()),
            ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    async def _relay_stream(
        self, receive: Receive, send: Send, resp: aiohttp.ClientResponse, payload: dict[str, Any],
        withhold_usage: bool, record: RequestRecord, ticket: Ticket,
    ) -> None:
        """Relay SSE bytes as they come; hold back usage and [DONE] to add the energy event."""
        tap = StreamTap(record.kind == "response", self.config.server.max_sse_line_bytes)
        headers = _SSE_HEADERS + [
            (b"x-request-id", record.request_id.encode()),
            (b"x-energy-backend", (record.backend or "").encode()),
        ]
        if record.budget_left_j is not None:
            headers.append((b"x-energy-budget-remaining-joules", repr(record.budget_left_j).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        client_gone = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, resp, client_gone))
        guard = self.watchdog.guard()
        error: str | None = None
        backend, meter, counted = record.backend or "", self.meter, 0
        model = self.pool.by_name[backend].efficiency
        try:
            try:
                async for chunk in resp.content.iter_any():
                    out = tap.feed(chunk)
                    if tap.delta_chunks != counted:
                        now_s = time.time()
                        if record.first_token_s is None:
                            record.first_token_s = now_s
                            model.first_token(now_s, ticket)
                        meter.tokens(backend, record.key, now_s, tap.delta_chunks - counted)
                        model.tokens(tap.delta_chunks - counted)
                        counted = tap.delta_chunks
                    if out:
                        guard.sending = True
                        await send({"type": "http.response.body", "body": out, "more_body": True})
                        guard.sending = False
                        guard.sends += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
                _forget_frames(exc)
            except asyncio.CancelledError:
                if not guard.expired:
                    raise
                # The watchdog cut a client that stopped reading: free the GPU, bill what was sent.
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
                resp.close()
                client_gone.set()
                log.warning("request %s: client took no byte for %.0f s; stream cut", record.request_id,
                            self.watchdog.write_timeout_s)
            if client_gone.is_set():
                error = "client stopped reading" if guard.expired else "client disconnected"
            elif not tap.done and error is None:
                error = "upstream closed the stream early"
        finally:
            self.watchdog.release(guard)
            watcher.cancel()
        if tap.overflow:  # cut: free the GPU, bill what was relayed
            resp.close()
            error = f"an event longer than {self.config.server.max_sse_line_bytes} bytes without a boundary"
        record.end_s = time.time()
        record.status = 200
        record.error = error
        usage = tap.usage
        if usage is not None:
            record.prompt_tokens, record.completion_tokens, record.reasoning_tokens = usage
            record.usage_reported = True
        else:
            # The engine gave no usage (it ignores stream_options, or the stream broke): bill
            # every generated delta relayed, and the prompt's estimate.
            record.completion_tokens = tap.delta_chunks
            record.prompt_tokens = _estimate_prompt_tokens(payload)
        self._close_energy(record)
        self.accounting.finished(record)
        energy = record.energy()
        if client_gone.is_set():
            return
        if error is not None:
            event = orjson.dumps({"error": {"message": f"The backend stream failed: {error}.",
                                            "type": "upstream_error", "param": None, "code": "upstream_error"}})
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"data: " + event + b"\n\n", "more_body": False})
            return
        closing = tap.finish(energy, client_wants_usage=not withhold_usage)
        await send({"type": "http.response.body", "body": closing, "more_body": False})


# -- helpers ------------------------------------------------------------------------------------


def scan_headers(raw: list[tuple[bytes, bytes]]) -> tuple[bytes | None, str | None, int | None]:
    """Authorization, x-request-id and content-length, in one pass over the raw headers."""
    authorization = request_id = length = None
    for name, value in raw:
        if name == b"authorization":
            authorization = value
        elif name == b"x-request-id":
            text = value.decode("latin-1").strip()
            # Forwarded upstream and echoed: keep it printable and short.
            if 0 < len(text) <= 128 and text.isprintable():
                request_id = text
        elif name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                length = None
    return authorization, request_id, length


async def _read_body(receive: Receive, declared: int | None, limit: int) -> bytes:
    """The whole request body, or 413 as soon as it is known to be too large."""
    if declared is not None and declared > limit:
        raise ProxyError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body = message.get("body", b"")
    if not message.get("more_body"):
        if len(body) > limit:
            raise ProxyError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
        return body
    parts, size = [body], len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ProxyError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
        parts.append(chunk)
        if not message.get("more_body"):
            return b"".join(parts)


async def _watch_disconnect(receive: Receive, resp: aiohttp.ClientResponse, gone: asyncio.Event) -> None:
    """Close the upstream request as soon as the client goes away, freeing the GPU slot."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            resp.close()
            return


def _forget_frames(exc: BaseException) -> None:
    """Drop an upstream error's traceback. aiohttp keeps the exception on the connection's
    reader, and its traceback holds this request's frames (response, tap, record): about 20 KB
    per broken stream that even a full collection did not free (bench/soak found it)."""
    exc.__traceback__ = None


def _take_usage(data: bytes, record: RequestRecord) -> bool:
    """Read the token counts from a JSON answer; False when it is not a JSON object."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(obj, dict):
        return False
    usage = answer_usage(obj)
    if usage is not None:
        record.prompt_tokens, record.completion_tokens, record.reasoning_tokens = usage
        record.usage_reported = True
    return True


def _looks_like_error(data: bytes) -> bool:
    return data.startswith(b"{") and b'"error"' in data


def _estimate_prompt_tokens(payload: dict[str, Any]) -> int:
    """Only used when the backend never reported usage: see `proxy.usage`."""
    return estimate_prompt_tokens(payload)


#: Key of the ASGI start message that marks an answer the proxy made itself (its error code).
REFUSAL = "joulegate.refusal"


async def send_error(send: Send, exc: ProxyError, request_id: str) -> None:
    """Answer with an OpenAI-shaped error."""
    await send({
        "type": "http.response.start",
        "status": exc.status,
        "headers": [(b"content-type", _JSON), (b"x-request-id", request_id.encode()), *exc.headers],
        REFUSAL: exc.code or exc.type,  # read by the app's refusal counter; servers ignore it
    })
    await send({"type": "http.response.body", "body": exc.body()})
