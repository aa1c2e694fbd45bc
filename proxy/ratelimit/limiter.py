"""The rate limiter the relay calls: admit a request against its key's and tenant's limits
(429 with OpenAI's `x-ratelimit-*` headers when over), and correct its token count to what it
was billed once it ends.

Only requests whose principal carries limits reach it: a request without limits costs the relay
one truth test of an empty tuple, and no store call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from proxy.auth import Principal
from proxy.config import Config
from proxy.errors import ProxyError
from proxy.metrics import Metrics
from proxy.ratelimit.stores import RateStore
from proxy.ratelimit.window import (
    RateScope,
    Refusal,
    limit_headers,
    refusal,
    reset_s,
    token_estimate,
    window_of,
)
from proxy.records import RequestRecord

log = logging.getLogger("joulegate.ratelimit")


@dataclass(frozen=True, slots=True)
class RateTicket:
    """An admitted request's count of tokens, to be corrected when it ends."""

    scopes: tuple[RateScope, ...]  # the scopes with a token limit
    window: int
    tokens: int


class RateLimiter:
    def __init__(self, config: Config, store: RateStore, metrics: Metrics) -> None:
        self.store = store
        self.metrics = metrics
        self.timeout_s = config.rate_limit_timeout_ms / 1e3
        self.failure = config.rate_limit_failure
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_warning_s = 0.0

    async def start(self) -> None:
        try:
            await self.store.start()
        except Exception as exc:  # down at start: each check tries again (and fails open or closed)
            log.warning("rate-limit store not reachable at start: %s", type(exc).__name__)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.close()

    async def admit(self, principal: Principal, record: RequestRecord, max_tokens: int | None) -> None:
        """Count this request against `principal.limits`, or raise 429 `rate_limit_exceeded`
        (503 `rate_limit_unavailable` when the store fails and rate_limit_failure is closed).
        Sets `record.rate` where a token count is to be corrected when the request ends."""
        scopes = principal.limits
        tokens = token_estimate(record.prompt_estimate, max_tokens)
        now_s = time.time()
        window = window_of(now_s)
        try:
            async with asyncio.timeout(self.timeout_s):
                admitted, counts = await self.store.admit(scopes, window, tokens)
        except Exception as exc:  # slow or down (redis-py's errors are not OSErrors)
            self._store_failed(exc)
            return
        if admitted:
            # As OpenAI does: every answer tells a limited client where it stands.
            after = [(r + 1, t + tokens) for r, t in counts]  # the store returns the counts before
            record.rate_headers = limit_headers(scopes, after, reset_s(window, now_s), retry_after=False)
            limited = tuple(s for s in scopes if s.tpm is not None)
            if limited:
                record.rate = RateTicket(limited, window, tokens)
            return
        # The store applied `refusal` (Redis: the same rule in Lua) to these counts.
        refused = refusal(scopes, counts, tokens) or Refusal(0, "requests", False)
        scope = scopes[refused.index]
        self.metrics.rate_limited.labels(scope.tenant, refused.kind, scope.level).inc()
        raise ProxyError(429, _message(scope, refused, tokens), code="rate_limit_exceeded",
                         headers=limit_headers(scopes, counts, reset_s(window, now_s)))

    def settle(self, record: RequestRecord) -> None:
        """The request ended: replace its estimated tokens by those it was billed (none if no
        backend had it), in the window it was admitted in; a window already over is left be."""
        ticket, record.rate = record.rate, None
        if ticket is None:
            return
        billed = record.prompt_tokens + record.completion_tokens if record.backend is not None else 0
        delta = billed - ticket.tokens
        if delta and window_of(time.time()) == ticket.window:
            self._spawn(self.store.adjust(ticket.scopes, ticket.window, delta))

    def _store_failed(self, exc: Exception) -> None:
        self.metrics.rate_limit_store_failures.labels(self.failure).inc()
        now_s = time.monotonic()
        if now_s - self._last_warning_s > 10.0:
            self._last_warning_s = now_s
            log.warning("rate-limit store failed (%s); limited requests are %s", type(exc).__name__,
                        "let through" if self.failure == "open" else "refused")
        if self.failure == "closed":
            raise ProxyError(503, "Rate limits cannot be checked right now (store unavailable); retry "
                             "shortly.", code="rate_limit_unavailable", headers=[(b"retry-after", b"1")])

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(_quietly(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _quietly(work: Coroutine[Any, Any, None]) -> None:
    try:
        await work
    except Exception as exc:  # a lost correction only skews one window's token count
        log.debug("rate-limit token correction failed: %s", type(exc).__name__)


def _message(scope: RateScope, refused: Refusal, tokens: int) -> str:
    who = f"API key {scope.id.partition(':')[2]}" if scope.level == "key" else f"tenant '{scope.tenant}'"
    if refused.too_large:
        return (f"Request too large for {who}: it counts {tokens} tokens (prompt + max_tokens) and the "
                f"limit is {scope.tpm} tokens per minute; lower max_tokens.")
    if refused.kind == "requests":
        return f"Rate limit reached for {who}: {scope.rpm} requests per minute."
    return f"Rate limit reached for {who}: {scope.tpm} tokens per minute."
