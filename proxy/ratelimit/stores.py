"""Where rate-limit counters live: in this process (memory and SQLite ledgers), or in Redis,
shared by every replica (PostgreSQL: postgres.py). Each store checks and counts in one atomic
step, so replicas admitting at once cannot all pass the same check."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from proxy.ratelimit.window import WINDOW_S, RateScope, refusal
from proxy.stores import StoreURL, redis_client, redis_prefix

Counts = list[tuple[int, int]]


class RateStore(ABC):
    """Per scope and window: requests and tokens counted so far."""

    async def start(self) -> None:  # noqa: B027 - an optional hook: memory stores have nothing to open
        """Connect, and create the schema where the store has one."""

    async def close(self) -> None:  # noqa: B027 - an optional hook, as start
        """Release the store's connections."""

    @abstractmethod
    async def admit(self, scopes: Sequence[RateScope], window: int, tokens: int) -> tuple[bool, Counts]:
        """In one atomic step: each scope's (requests, tokens) in `window` before this request;
        unless `refusal` finds a limit broken, count one request and `tokens` in each. Returns
        (admitted, the counts before)."""

    @abstractmethod
    async def adjust(self, scopes: Sequence[RateScope], window: int, tokens: int) -> None:
        """Add `tokens` (negative: give back) to each scope's count in `window`."""


class MemoryRateStore(RateStore):
    """Counters in this process: only the current window of each scope is kept."""

    def __init__(self) -> None:
        self._counts: dict[str, list[int]] = {}  # scope id -> [window, requests, tokens]

    def _of(self, scope: RateScope, window: int) -> list[int]:
        count = self._counts.get(scope.id)
        if count is None or count[0] != window:
            count = self._counts[scope.id] = [window, 0, 0]
        return count

    async def admit(self, scopes: Sequence[RateScope], window: int, tokens: int) -> tuple[bool, Counts]:
        # No await in here: atomic on the event loop.
        counts = [self._of(scope, window) for scope in scopes]
        before = [(c[1], c[2]) for c in counts]
        if refusal(scopes, before, tokens) is not None:
            return False, before
        for c in counts:
            c[1] += 1
            c[2] += tokens
        return True, before

    async def adjust(self, scopes: Sequence[RateScope], window: int, tokens: int) -> None:
        for scope in scopes:
            count = self._counts.get(scope.id)
            if count is not None and count[0] == window:
                count[2] += tokens


#: KEYS: one hash per scope (`r` requests, `t` tokens); ARGV: tokens, ttl ms, then rpm and tpm
#: per scope (0: no limit). The same rule as `refusal`; returns {admitted 0/1, r1, t1, r2, t2...}
#: with the counts before this request.
ADMIT_SCRIPT = """
local tokens = tonumber(ARGV[1])
local out = {1}
for i = 1, #KEYS do
  local v = redis.call('HMGET', KEYS[i], 'r', 't')
  local r, t = tonumber(v[1] or 0), tonumber(v[2] or 0)
  out[#out + 1] = r
  out[#out + 1] = t
  local rpm, tpm = tonumber(ARGV[2 * i + 1]), tonumber(ARGV[2 * i + 2])
  if (rpm > 0 and r + 1 > rpm) or (tpm > 0 and t + tokens > tpm) then out[1] = 0 end
end
if out[1] == 1 then
  for i = 1, #KEYS do
    redis.call('HINCRBY', KEYS[i], 'r', 1)
    redis.call('HINCRBY', KEYS[i], 't', tokens)
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
  end
end
return out
"""
#: A window's counters outlive it a little (corrections to a request that just ended).
_TTL_MS = 2 * WINDOW_S * 1000


class RedisRateStore(RateStore):
    """Counters in Redis under the ledger's key prefix: `rl:<scope id>:<window>`, one hash each,
    expiring a window after their own; one script call per admitted request."""

    def __init__(self, store: StoreURL) -> None:
        self._store = store
        self._prefix = redis_prefix(store)
        self._redis: Any = None
        self._script: Any = None

    def _keys(self, scopes: Sequence[RateScope], window: int) -> list[str]:
        return [f"{self._prefix}rl:{scope.id}:{window}" for scope in scopes]

    def _client(self) -> Any:
        if self._redis is None:
            self._redis = redis_client(self._store)
            self._script = self._redis.register_script(ADMIT_SCRIPT)
        return self._redis

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    async def admit(self, scopes: Sequence[RateScope], window: int, tokens: int) -> tuple[bool, Counts]:
        self._client()
        args: list[int] = [tokens, _TTL_MS]
        for scope in scopes:
            args += (scope.rpm or 0, scope.tpm or 0)
        out = [int(v) for v in await self._script(keys=self._keys(scopes, window), args=args)]
        return out[0] == 1, [(out[i], out[i + 1]) for i in range(1, len(out), 2)]

    async def adjust(self, scopes: Sequence[RateScope], window: int, tokens: int) -> None:
        pipe = self._client().pipeline(transaction=False)
        for key in self._keys(scopes, window):
            pipe.hincrby(key, "t", tokens)
            pipe.pexpire(key, _TTL_MS)
        await pipe.execute()
