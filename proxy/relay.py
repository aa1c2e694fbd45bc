"""The hot path, top to bottom: authenticate, read, validate, route, forward, stream, finish.

One `Relay` serves every inference route (chat, completions, embeddings, other `/v1/*` calls
that name a model). It speaks raw ASGI: no request or response objects on the way.

About 650 lines on purpose: the hot path stays readable top to bottom in one file; what it
reads from the client before a backend sees it is proxy/inbound.py, rate limits and budgets are
one call each into proxy/ratelimit/ and proxy/accounting.py.
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
from proxy.errors import REFUSAL, ProxyError, model_not_found, send_error
from proxy.gather import Gatherer, final_response, gatherable, streamed_body
from proxy.inbound import (
    ClientGone,
    ClientWatch,
    multipart_type,
    parse_form,
    parse_json,
    read_body,
    scan_headers,
)
from proxy.ratelimit.limiter import RateLimiter
from proxy.records import RequestRecord
from proxy.sse import StreamTap
from proxy.telemetry import SpanStart, Telemetry
from proxy.usage import answer_usage, max_output_tokens, requested_max_tokens
from proxy.watchdog import SendWatchdog

log = logging.getLogger("joulegate.relay")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
__all__ = ["REFUSAL", "Receive", "Relay", "Scope", "Send", "scan_headers", "send_error"]  # for the app

_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_JSON = b"application/json"
# Load shedding answers say when to come back (the openai SDKs honour it when they retry).
_RETRY_SOON = [(b"retry-after", b"1")]


class _Hold:
    """One attempt's claim on a backend: a place in its `in_flight`, an efficiency-model ticket
    and an open meter request. `Relay._release` gives them back and `Relay._book` ledgers the
    request; each does its work once, whichever path gets there first."""

    __slots__ = ("backend", "ticket", "held", "booked")

    def __init__(self, backend: Backend, ticket: Ticket) -> None:
        self.backend = backend
        self.ticket = ticket
        self.held = True
        self.booked = False


class _AllParked(Exception):
    """No backend to try but a parked one: wake it (Relay.waker) or answer `error`."""

    def __init__(self, error: ProxyError) -> None:
        super().__init__(error.message)
        self.error = error


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
        limiter: RateLimiter,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.policy = policy
        self.auth = auth
        self.meter = meter
        self.accounting = accounting
        self.limiter = limiter  # only for principals with rate limits
        self.telemetry = telemetry  # None: tracing off, one check per request
        self.max_body_bytes = config.server.max_body_bytes
        self.read_timeout_s = config.server.client_read_timeout_s
        self.max_in_flight = config.server.max_in_flight
        self.in_flight = 0  # inference requests open in this process
        # request_timeout_s bounds the wait for the response head and a whole non-streamed
        # answer (ClientWatch's timer, one a request); streams are bounded by the watchdog.
        self.request_timeout_s = config.server.request_timeout_s
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.server.connect_timeout_s)
        self.watchdog = SendWatchdog(config.server.client_write_timeout_s,
                                     idle_timeout_s=config.server.stream_idle_timeout_s,
                                     max_s=config.server.stream_max_s)
        # Wakes a parked backend for a model and waits for it (the governor's, in apply mode
        # with parking); True once one serves again. Only called where no other backend is left.
        self.waker: Callable[[str], Awaitable[bool]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send, kind: str) -> None:
        authorization, request_id, declared_length = scan_headers(scope["headers"])
        key = os.urandom(12).hex()
        record = RequestRecord(  # without a client id, the proxy's key is the request's id too
            request_id=request_id or key, key=key, tenant="", model="", kind=kind,
            stream=False, start_s=time.time(),
        )
        self.in_flight += 1
        watch = ClientWatch(receive)
        try:
            if self.max_in_flight is not None and self.in_flight > self.max_in_flight:
                # Refused before the body is read: a flood costs no buffering.
                raise ProxyError(429, "The proxy is at its limit of requests in flight; retry shortly.",
                                 code="rate_limit_exceeded", type="rate_limit_error", headers=_RETRY_SOON)
            principal = self.auth.authenticate(authorization)
            record.tenant = principal.tenant
            if principal.key_budget is not None:  # its spend counts against its key's budget too
                record.key_subject = principal.key_budget.subject
            watch.deadline_at(asyncio.get_running_loop().time() + self.read_timeout_s)
            try:
                body = await read_body(receive, declared_length, self.max_body_bytes)
            except asyncio.CancelledError:
                if not watch.timed_out:
                    raise
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
                raise ProxyError(408, f"The request body did not arrive within {self.read_timeout_s:g} s.",
                                 code="request_timeout") from None
            watch.deadline_at(None)
            content_type = multipart_type(scope["headers"]) if kind == "other" else None
            if content_type is not None:  # relayed untouched, with its own Content-Type
                payload, upstream_body, withhold_usage = parse_form(body, content_type, record), body, False
            else:
                payload, upstream_body, withhold_usage = parse_json(body, kind, record)
            max_tokens = max_output_tokens(payload, kind)
            if principal.limits:  # over a rate limit: 429 before the budget or a GPU sees it
                await self.limiter.admit(principal, record, max_tokens)
            # Over budget: refused before any GPU sees it (and after validation: a bad request
            # never costs a store round trip).
            left = await self.accounting.reserve_budget(
                principal.tenant, record.key, record.prompt_estimate, max_tokens, principal.key_budget)
            if left is not None:
                record.budget_left_j, record.budget_left_g = left.get("joules"), left.get("gco2e")
            if self.telemetry is not None:  # the span's ids, sent upstream as its traceparent
                self.telemetry.start(record, scope, payload)
            await self._forward(scope, watch, send, payload, upstream_body, withhold_usage, record, content_type)
        except ProxyError as exc:
            record.status = exc.status
            if self.telemetry is not None and record.backend is None:  # refused before a backend: no booking
                self.telemetry.refused(record, scope, exc.code or exc.type)
            await send_error(send, exc, record.request_id)
        except ClientGone:
            record.status = 499
        finally:
            watch.stop()
            self.in_flight -= 1
            self.accounting.release_budget(record)  # a hold not handed to the ledger: refused
            if record.rate is not None:  # its tokens per minute: from the estimate to the billed
                self.limiter.settle(record)

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
            max_output_tokens=requested_max_tokens(payload),
            stream=record.stream,
        )
        name = self.policy.choose(info, views, time.time())
        if name is None and any(b.draining for b in candidates if b.name not in tried):
            # A draining backend is awake: it takes what no other has room for.
            views = [b.view(draining_ok=True) for b in candidates if b.name not in tried]
            name = self.policy.choose(info, views, time.time())
        if name is None:
            if tried:
                error = failure or ProxyError(502, "No backend for this model could be reached.",
                                              code="upstream_unreachable")
            elif any(v.healthy for v in views):
                raise ProxyError(429, "Every backend for this model is at its concurrency limit.",
                                 code="rate_limit_exceeded", type="rate_limit_error", headers=_RETRY_SOON)
            else:
                error = ProxyError(503, f"No healthy backend serves `{record.model}` right now.",
                                   code="no_healthy_backend", headers=_RETRY_SOON)
            if self.waker is not None and any(b.parked for b in candidates):
                raise _AllParked(error)
            raise error
        return self.pool.by_name[name]

    async def _forward(
        self, scope: Scope, watch: ClientWatch, send: Send, payload: dict[str, Any], body: bytes,
        withhold_usage: bool, record: RequestRecord, content_type: str | None = None,
    ) -> None:
        """Pick a backend, send the request, relay the answer; book it once the backend had it.

        Every attempt takes a `_Hold` on its backend; each path out of here releases it once
        (`_release`) and, where the backend had the request, books it once (`_book`).
        """
        suffix = scope["path"][3:]  # "/v1/chat/completions" -> "/chat/completions"
        if scope.get("query_string"):
            suffix += "?" + scope["query_string"].decode("latin-1")
        tried: set[str] = set()
        failure: ProxyError | None = None
        # Not streamed to the client: streamed upstream and gathered where its backend does that.
        gather = content_type is None and not record.stream and gatherable(payload, record.kind)
        streamed: bytes | None = None  # the streamed body, made once if any backend needs it
        hold: _Hold | None = None
        resp: aiohttp.ClientResponse | None = None
        loop = asyncio.get_running_loop()
        watch.follow()
        try:
            while True:
                try:
                    backend = self._choose(record, payload, tried, failure)
                except _AllParked as parked:
                    # Only a parked backend is left: wait for its wake-up (at most its
                    # park.wake_timeout_s), then choose again among the awake ones.
                    assert self.waker is not None
                    if not await self.waker(record.model):
                        raise parked.error from None
                    continue
                tried.add(backend.name)
                record.gathered = gather and backend.stream_upstream
                sent = body
                if record.gathered:
                    sent = streamed = streamed or streamed_body(payload, record.kind)
                hold = self._hold(backend, record)
                # One timer bounds the head and a non-streamed body (not a stream: the watchdog's).
                watch.deadline_at(loop.time() + self.request_timeout_s)
                try:
                    resp = await self._post(backend, suffix, sent, record.request_id, content_type, record.trace)
                except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError, aiohttp.ConnectionTimeoutError) as exc:
                    # Refused, unreachable, or closed before answering even on a fresh connection:
                    # nothing reached the client yet, so another backend may answer.
                    _forget_frames(exc)
                    self._release(hold, record, reached=False)
                    backend.mark_down(f"{type(exc).__name__}: {exc}")
                    backend.record_failure(type(exc).__name__)
                    continue
                except aiohttp.ClientResponseError:
                    # It did not speak HTTP (garbage status line or headers): no byte reached the
                    # client, so another backend may answer. The upstream's bytes are never echoed.
                    self._release(hold, record, reached=False)
                    backend.record_failure("invalid HTTP response")
                    failure = ProxyError(502, "The backend did not answer in HTTP.", code="upstream_error")
                    continue
                except TimeoutError:
                    # The backend had the request all along: it is booked. A request that ran past
                    # its own limit says nothing about the backend: the circuit does not count it.
                    raise self._book_failed(hold, record, payload, _timed_out()) from None
                except aiohttp.ClientError as exc:
                    self._release(hold, record, reached=False)
                    backend.record_failure(type(exc).__name__)
                    raise ProxyError(502, f"The backend failed: {type(exc).__name__}.",
                                     code="upstream_error") from None
                break
            assert resp is not None
            record.backend = backend.name
            if resp.status >= 500:
                backend.record_failure(f"HTTP {resp.status}")
            else:
                backend.record_success()
            if record.stream and resp.status == 200 and resp.content_type == "text/event-stream":
                watch.deadline_at(None)
                await self._relay_stream(send, resp, payload, withhold_usage, record, hold, watch)
                return
            status, content_type_out = resp.status, resp.headers.get("Content-Type", "application/json")
            try:
                if record.gathered and status == 200 and resp.content_type == "text/event-stream":
                    status, data = await self._gather(resp, record, hold)
                    content_type_out = "application/json"
                else:
                    data = await resp.read()
            except TimeoutError:
                resp.close()
                raise self._book_failed(hold, record, payload, _timed_out()) from None
            except aiohttp.ClientError as exc:
                _forget_frames(exc)
                resp.close()
                raise self._book_failed(hold, record, payload, ProxyError(
                    502, f"The backend broke off its answer: {type(exc).__name__}.", code="upstream_error")) from None
            watch.stop()  # the upstream is done: what is left is sending, however slowly
            await self._relay_whole(send, status, content_type_out.encode("latin-1"), data, record, hold)
        except asyncio.CancelledError:
            if not (watch.cancelled or watch.timed_out):
                raise
            # The client left, or the request ran past its limit, while the backend had it:
            # close the upstream now, so the engine stops generating, and book what it did. A
            # request past its own limit says nothing about the backend: no circuit failure.
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            if resp is not None:
                resp.close()
            if watch.timed_out:
                if hold is not None and hold.held:
                    raise self._book_failed(hold, record, payload, _timed_out()) from None
                raise _timed_out() from None
            if hold is not None and hold.held:
                self._book_failed(hold, record, payload, ProxyError(499, "The client disconnected."))
            raise ClientGone from None
        finally:
            watch.stop()
            if resp is not None:
                resp.release()  # closes the connection instead where the answer was not read to its end
            if hold is not None and hold.held:  # an error nobody foresaw: still one release, one booking
                if record.backend is None:
                    self._release(hold, record, reached=False)
                else:
                    self._book_failed(hold, record, payload, ProxyError(502, "The proxy failed.", code="upstream_error"))

    async def _post(self, backend: Backend, suffix: str, body: bytes, request_id: str,
                    content_type: str | None = None, trace: SpanStart | None = None) -> aiohttp.ClientResponse:
        """POST the request upstream on a pooled connection.

        A pooled connection the engine closed while it sat idle fails before any byte of answer
        (ServerDisconnectedError, or ClientOSError on a reset): that is retried once, on a fresh
        connection to the same backend, and is no sign of a broken backend.
        """
        session, fresh = self.pool.session, self.pool.fresh_session
        assert session is not None and fresh is not None
        url = backend.url + suffix
        headers = {**backend.upstream_headers, "X-Request-Id": request_id}
        if content_type is not None:  # multipart: its boundary must reach the engine as sent
            headers["Content-Type"] = content_type
        if trace is not None:  # tracing on: the backend's spans join the request's trace
            headers["traceparent"] = trace.traceparent
        try:
            return await session.post(url, data=body, headers=headers, timeout=self.timeout)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorError):
                raise  # no connection at all: nothing stale about it
            _forget_frames(exc)
            log.info("backend %s: pooled connection closed under request %s (%s); retrying on a fresh one",
                     backend.name, request_id, type(exc).__name__)
        return await fresh.post(url, data=body, headers=headers, timeout=self.timeout)

    # -- the backend slot and the booking: each exactly once ------------------------------------

    def _hold(self, backend: Backend, record: RequestRecord) -> _Hold:
        """Take a slot on `backend` for this request: in_flight, an efficiency ticket, a meter entry."""
        backend.in_flight += 1
        sent_s = time.time()
        timed = record.stream or record.gathered  # its tokens' times will be seen
        hold = _Hold(backend, backend.efficiency.sent(sent_s, timed))
        # A rough prompt size lets attribution settle before usage arrives.
        # Keyed by record.key: clients may send the same x-request-id twice, even at once.
        self.meter.open(backend.name, record.key, sent_s, timed, record.prompt_estimate,
                        record.kind == "embedding")
        return hold

    def _release(self, hold: _Hold, record: RequestRecord, reached: bool) -> None:
        """Give the slot back; a no-op the second time. `reached`: the backend had the request, so
        the efficiency model learns its tokens and the meter attributes its energy up to
        `record.end_s` (now, if unset); else it spent nothing there and the meter forgets it."""
        if not hold.held:
            return
        hold.held = False
        backend = hold.backend
        backend.in_flight -= 1
        model = backend.efficiency
        if not reached:
            now_s = time.time()
            model.finished(now_s, hold.ticket, None, 0)
            self.meter.abort(backend.name, record.key, now_s)
            return
        if record.end_s is None:
            record.end_s = time.time()
        if record.first_token_s is None:
            model.tokens(record.completion_tokens)  # no token seen on the way: all at the end
        model.finished(record.end_s, hold.ticket, record.first_token_s, record.completion_tokens)
        self._close_energy(record)

    def _book(self, hold: _Hold, record: RequestRecord, status: int, error: str | None = None) -> None:
        """The backend had this request: release its slot, attribute its energy and hand it to
        accounting; a no-op the second time. Its tokens must be final by now."""
        if hold.booked:
            return
        hold.booked = True
        record.backend = hold.backend.name
        record.status = status
        record.error = error
        self._release(hold, record, reached=True)
        self.accounting.finished(record)

    def _book_failed(self, hold: _Hold, record: RequestRecord, payload: dict[str, Any],
                     exc: ProxyError) -> ProxyError:
        """Book a request that ended in `exc` after the backend had it, before any usage (so
        the prompt is estimated; completion tokens as counted); `exc`, naming the backend that billed it."""
        if not record.usage_reported:
            record.prompt_tokens = record.prompt_estimate
        self._book(hold, record, exc.status, exc.message)
        exc.headers.append((b"x-energy-backend", hold.backend.name.encode()))
        return exc

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
            self.accounting.carbon.fill(record, result.host_joules)

    async def _relay_whole(self, send: Send, upstream_status: int, content_type: bytes, data: bytes,
                           record: RequestRecord, hold: _Hold) -> None:
        """A non-streamed answer (or an upstream error), read in full: book it, which frees the
        backend slot before a slow client takes its time, add energy headers, send."""
        record.end_s = time.time()
        status = booked_status = upstream_status
        if status == 200 and record.kind != "other":
            if not _take_usage(data, record):
                # A success the client could not parse: say what went wrong instead.
                hold.backend.record_failure("invalid JSON body")
                status = booked_status = 502
                data = ProxyError(502, "The backend answered with a body that is not valid JSON.",
                                  code="upstream_error").body()
                content_type = _JSON
        elif status == 200 and content_type.startswith(b"application/json"):
            _take_usage(data, record)  # pass-through: the engine's usage where it gives one
        elif status >= 500 and not _looks_like_error(data):
            status, data = 502, ProxyError(502, f"The backend answered HTTP {upstream_status}.",
                                           code="upstream_error").body()
            content_type = _JSON
        if status == 200 and not record.usage_reported:
            # No usage: the prompt's estimate, so the request still weighs in the energy split.
            record.prompt_tokens = record.prompt_estimate
        self._book(hold, record, booked_status)
        energy = record.energy()
        headers = [(b"content-type", content_type), (b"x-request-id", record.request_id.encode())]
        if record.budget_left_j is not None:
            left_j = record.budget_left_j - (record.joules or 0.0)
            headers.append((b"x-energy-budget-remaining-joules", repr(max(left_j, 0.0)).encode()))
        if record.budget_left_g is not None:  # both, under a joule budget and a gram one
            left_g = record.budget_left_g - (record.gco2e or 0.0)
            headers.append((b"x-energy-budget-remaining-gco2e", repr(max(left_g, 0.0)).encode()))
        if record.rate_headers is not None:
            headers += record.rate_headers
        if record.backend:
            headers.append((b"x-energy-backend", record.backend.encode()))
        if energy is not None and status == 200:
            headers += [
                (b"x-energy-joules", repr(energy["joules"]).encode()),
                (b"x-energy-tokens-per-joule", repr(energy["tokens_per_joule"]).encode()),
                (b"x-energy-method", energy["method"].encode()),
            ]
            if record.joules_all_in is not None:  # (GPU + host) x PUE, and its grams CO2e
                headers.append((b"x-energy-joules-all-in", repr(record.joules_all_in).encode()))
            if record.gco2e is not None:
                headers.append((b"x-energy-gco2e", repr(record.gco2e).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    async def _relay_stream(
        self, send: Send, resp: aiohttp.ClientResponse, payload: dict[str, Any], withhold_usage: bool,
        record: RequestRecord, hold: _Hold, watch: ClientWatch,
    ) -> None:
        """Relay SSE bytes as they come; hold back usage and [DONE] to add the energy event.

        The stream ends early when the backend breaks off (502), the watchdog cuts it (the client
        stopped reading: 499; no chunk for stream_idle_timeout_s or past stream_max_s: 504) or
        the client leaves (499); the upstream is closed at once and what was generated is booked.
        """
        # Traced: a tap that also reads the answer's id, model and finish reasons for the span.
        tap = (StreamTap if record.trace is None else record.trace.tap)(
            record.kind == "response", self.config.server.max_sse_line_bytes)
        headers = _SSE_HEADERS + [
            (b"x-request-id", record.request_id.encode()),
            (b"x-energy-backend", (record.backend or "").encode()),
        ]
        if record.budget_left_j is not None:
            headers.append((b"x-energy-budget-remaining-joules", repr(record.budget_left_j).encode()))
        if record.budget_left_g is not None:
            headers.append((b"x-energy-budget-remaining-gco2e", repr(record.budget_left_g).encode()))
        if record.rate_headers is not None:
            headers += record.rate_headers
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        guard = self.watchdog.guard()
        error: str | None = None
        status = 200
        counted = 0
        try:
            async for chunk in resp.content.iter_any():
                guard.chunks += 1
                out = tap.feed(chunk)
                if tap.delta_chunks != counted:
                    self._tokens_seen(record, hold, tap.delta_chunks - counted)
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
            if not (guard.expired or watch.cancelled or watch.timed_out):
                raise
            task = asyncio.current_task()
            assert task is not None
            for _ in range(guard.expired + watch.cancelled + watch.timed_out):  # one uncancel per cancel we caused
                task.uncancel()
        finally:
            self.watchdog.release(guard)
            watch.stop()  # from here on only this task sends; the final send must not look like a leave
        if watch.gone:
            status, error = 499, "client disconnected"
        elif guard.expired:
            status, error = self._cut_reason(guard.reason, record)
        elif watch.timed_out:  # the head's deadline fired just as the stream began
            status, error = 504, "the backend did not answer in time"
        elif tap.overflow:
            status = 502
            error = f"an event longer than {self.config.server.max_sse_line_bytes} bytes without a boundary"
        elif error is not None:
            status = 502
        elif not tap.done:
            status, error = 502, "upstream closed the stream early"
        if status != 200:
            resp.close()  # the engine stops here: book what it generated up to now
        record.end_s = time.time()
        usage = tap.usage
        if usage is not None:
            record.prompt_tokens, record.completion_tokens, record.reasoning_tokens = usage
            record.usage_reported = True
        else:
            # The engine gave no usage (it ignores stream_options, or the stream broke): bill
            # every generated delta relayed, and the prompt's estimate.
            record.completion_tokens = tap.delta_chunks
            record.prompt_tokens = record.prompt_estimate
        self._book(hold, record, status, error)
        energy = record.energy()
        if status == 499:
            return
        if error is not None:
            code = "upstream_timeout" if status == 504 else "upstream_error"
            event = orjson.dumps({"error": {"message": f"The backend stream failed: {error}.",
                                            "type": "upstream_error", "param": None, "code": code}})
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"data: " + event + b"\n\n", "more_body": False})
            return
        closing = tap.finish(energy, client_wants_usage=not withhold_usage)
        await send({"type": "http.response.body", "body": closing, "more_body": False})

    async def _gather(self, resp: aiohttp.ClientResponse, record: RequestRecord, hold: _Hold) -> tuple[int, bytes]:
        """Read the stream asked for on a non-streamed request's behalf, timing its tokens as a
        stream's; the status and body of its whole answer. A stream broken off raises as a
        broken body does; the tokens counted by then are the request's."""
        responses = record.kind == "response"
        tap = StreamTap(responses, self.config.server.max_sse_line_bytes)
        gathered = Gatherer(record.kind == "chat")
        counted = 0
        try:
            async for chunk in resp.content.iter_any():
                out = tap.feed(chunk)
                if tap.delta_chunks != counted:
                    self._tokens_seen(record, hold, tap.delta_chunks - counted)
                    counted = tap.delta_chunks
                if out and not responses:
                    gathered.feed(out)
        finally:
            record.completion_tokens = tap.delta_chunks  # what a stream broken off books
        if not tap.done and gathered.error is None:
            raise aiohttp.ClientPayloadError("the stream ended before its last event")
        if tap.final is not None:  # a Responses stream: its last event holds the whole answer
            return final_response(tap.final)
        if tap.usage_event is not None:
            gathered.add(tap.usage_event)
        elif tap.usage is None and gathered.error is None and hold.backend.stream_upstream:
            # The engine ignores stream_options: its whole answers carry usage, its streams do
            # not. Its engine counts are worth more than token times: stop streaming upstream.
            hold.backend.stream_upstream = False
            log.warning("backend %s: streams carry no usage; non-streamed answers are no longer "
                        "streamed upstream", hold.backend.name)
        return gathered.answer()

    def _tokens_seen(self, record: RequestRecord, hold: _Hold, count: int) -> None:
        """`count` more generated tokens read from the upstream stream, now."""
        now_s = time.time()
        model = hold.backend.efficiency
        if record.first_token_s is None:
            record.first_token_s = now_s
            model.first_token(now_s, hold.ticket)
        self.meter.tokens(hold.backend.name, record.key, now_s, count)
        model.tokens(count)

    def _cut_reason(self, reason: str, record: RequestRecord) -> tuple[int, str]:
        """The status and error the watchdog's cut books, logged once."""
        dog = self.watchdog
        if reason == "client":
            log.warning("request %s: client took no byte for %.0f s; stream cut", record.request_id,
                        dog.write_timeout_s)
            return 499, "client stopped reading"
        if reason == "idle":
            log.warning("request %s: backend %s sent nothing for %.0f s; stream cut", record.request_id,
                        record.backend, dog.idle_timeout_s)
            return 504, f"no data for {dog.idle_timeout_s:g} s"
        log.warning("request %s: stream ran past %.0f s; cut", record.request_id, dog.max_s)
        return 504, f"the stream ran past {dog.max_s:g} s"


# -- helpers ------------------------------------------------------------------------------------


def _timed_out() -> ProxyError:
    return ProxyError(504, "The backend did not answer in time.", code="upstream_timeout")


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
    if record.trace is not None:  # traced: the span names the engine's answer
        record.trace.take_answer(obj)
    usage = answer_usage(obj)
    if usage is not None:
        record.prompt_tokens, record.completion_tokens, record.reasoning_tokens = usage
        record.usage_reported = True
    return True


def _looks_like_error(data: bytes) -> bool:
    return data.startswith(b"{") and b'"error"' in data
