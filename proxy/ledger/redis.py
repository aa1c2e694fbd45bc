"""`redis://host:port/db` (or `rediss://`): one ledger shared by many proxy replicas.

Keys, under `key_prefix` (default `joulegate:`):
- `req:<uid>`: the record (JSON array), expiring `retention_s` after it was written. The uid is
  the client's request id, then UID_SEP and the proxy's unique key (`LedgerRecord.uid`).
- `ids:<request id>`: a sorted set of the uids under one client-visible id (score = the write's
  wall clock, ms), trimmed to `retention_s` on each write: lookups by id without a scan.
- `agg:<hour_s>`: a hash per UTC hour; field `<m>:<json [tenant, model, backend]>` with m one of
  r (requests), p (prompt tokens), c (completion tokens), j (micro-joules), x (reasoning
  tokens, absent in hours written before they were recorded), a (all-in micro-joules) and
  g (micrograms CO2e), absent (read as 0) in hours written before carbon was recorded.
- `hours`: a sorted set of the hours that have cells (score = hour_s), for range queries.
- `tj:<tenant>`: a hash hour_s -> micro-joules; a budget check reads only its period's hours.
  `tg:<tenant>`: the same in micrograms CO2e, for budgets in grams (hours written before it was
  kept have none: a gram budget counts from the first write of a version that keeps it).
  A managed key with a budget of its own has both under its budget subject too
  (`tj:<subject>`, `tg:<subject>`; `record.key_subject`), summed from its requests alone.
- `hold:<tenant>` / `holdx:<tenant>`: budget holds of requests in flight (key -> micro-joules)
  and their expiry (sorted set, score = ms); `holdg:<tenant>`: holds in micrograms CO2e, under
  the same expiry set. RESERVE_SCRIPT checks and holds in one step; the write script drops a
  request's hold in the step that adds its joules to `tj:` (and grams to `tg:`).

Idempotency: each chunk is one Lua script. For every record it does `SET req:<uid> ... NX PX`
and adds the record to the aggregates only if that SET created the key; it then applies the
summed increments with HINCRBY. The script runs atomically, so a chunk whose reply was lost (or
that a crash interrupted before the reply) can be sent again and adds nothing twice. The request
key doubles as the dedupe marker, so a replay is recognised for `retention_s` after the first
copy was written. The script builds key names itself, which standalone Redis (and Sentinel)
allow and Redis Cluster does not.

While Redis is down, records stay buffered and spill past `max_buffer` to a local SQLite journal
(`journal_path`; default: a file in the temp dir named after the URL and prefix).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import urlsplit

import orjson
from redis.asyncio import Redis

from proxy.ledger.base import BufferedLedger
from proxy.ledger.record import LedgerRecord, latest
from proxy.ledger.usage import Bucket, BudgetUnit, grams_to_ug, hour_floor_s, joules_to_uj
from proxy.stores import redis_from_url

HOUR_S = 3600

WRITE_SCRIPT = """
local p = ARGV[1]
local now = tonumber(ARGV[2])
local new = 0
local cells = {}   -- hour -> field -> delta
local spend = {}   -- tenant -> hour -> micro-joules
local spend_g = {} -- tenant -> hour -> micrograms CO2e
local i = 3
while i <= #ARGV do
  if redis.call('SET', p .. 'req:' .. ARGV[i], ARGV[i + 2], 'NX', 'PX', ARGV[i + 1]) then
    new = new + 1
    if ARGV[i + 9] ~= ARGV[i] then
      local ids = p .. 'ids:' .. ARGV[i + 9]
      local ttl = tonumber(ARGV[i + 1])
      redis.call('ZADD', ids, now, ARGV[i])
      redis.call('ZREMRANGEBYSCORE', ids, '-inf', now - ttl)
      redis.call('PEXPIRE', ids, ttl)
    end
    local hour, group, tenant = ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
    local uj = tonumber(ARGV[i + 8])
    local h = cells[hour]
    if not h then h = {}; cells[hour] = h end
    h['r:' .. group] = (h['r:' .. group] or 0) + 1
    h['p:' .. group] = (h['p:' .. group] or 0) + tonumber(ARGV[i + 6])
    h['c:' .. group] = (h['c:' .. group] or 0) + tonumber(ARGV[i + 7])
    h['j:' .. group] = (h['j:' .. group] or 0) + uj
    local x = tonumber(ARGV[i + 10])
    if x > 0 then h['x:' .. group] = (h['x:' .. group] or 0) + x end
    local a, g = tonumber(ARGV[i + 11]), tonumber(ARGV[i + 12])
    if a > 0 then h['a:' .. group] = (h['a:' .. group] or 0) + a end
    if g > 0 then h['g:' .. group] = (h['g:' .. group] or 0) + g end
    local subjects = {tenant}
    if ARGV[i + 13] ~= '' then subjects[2] = ARGV[i + 13] end  -- its key's budget subject
    for _, who in ipairs(subjects) do
      local t = spend[who]
      if not t then t = {}; spend[who] = t end
      t[hour] = (t[hour] or 0) + uj
      if g > 0 then
        local tg = spend_g[who]
        if not tg then tg = {}; spend_g[who] = tg end
        tg[hour] = (tg[hour] or 0) + g
      end
    end
  end
  i = i + 14
end
for hour, fields in pairs(cells) do
  redis.call('ZADD', p .. 'hours', 'NX', hour, hour)
  for field, delta in pairs(fields) do
    redis.call('HINCRBY', p .. 'agg:' .. hour, field, string.format('%.0f', delta))
  end
end
for tenant, hours in pairs(spend) do
  for hour, delta in pairs(hours) do
    redis.call('HINCRBY', p .. 'tj:' .. tenant, hour, string.format('%.0f', delta))
  end
end
for tenant, hours in pairs(spend_g) do
  for hour, delta in pairs(hours) do
    redis.call('HINCRBY', p .. 'tg:' .. tenant, hour, string.format('%.0f', delta))
  end
end
for j = 1, #KEYS, 2 do  -- budget holds these records settle: they are in tj: and tg: now
  redis.call('HDEL', p .. 'hold:' .. KEYS[j], KEYS[j + 1])
  redis.call('HDEL', p .. 'holdg:' .. KEYS[j], KEYS[j + 1])
  redis.call('ZREM', p .. 'holdx:' .. KEYS[j], KEYS[j + 1])
end
return new
"""

#: A budget hold: ARGV prefix, tenant, key, µJ, first hour_s, budget µJ, now ms, ttl ms, unit
#: (j: µJ; g: µg CO2e, summed from tg: and holdg: instead). Drops the tenant's expired holds,
#: sums its spend (tj: over the period's hours only) and live holds, and holds the µJ if that
#: sum is under the budget. Returns {reserved 0/1, used µJ}.
RESERVE_SCRIPT = """
local p, tenant, key = ARGV[1], ARGV[2], ARGV[3]
local uj, since, budget = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local now, ttl = tonumber(ARGV[7]), tonumber(ARGV[8])
local held, spent = 'hold:', 'tj:'
if ARGV[9] == 'g' then held, spent = 'holdg:', 'tg:' end
local holds, expiry = p .. held .. tenant, p .. 'holdx:' .. tenant
local expired = redis.call('ZRANGEBYSCORE', expiry, '-inf', now)
for _, old in ipairs(expired) do
  redis.call('HDEL', p .. 'hold:' .. tenant, old)
  redis.call('HDEL', p .. 'holdg:' .. tenant, old)
end
redis.call('ZREMRANGEBYSCORE', expiry, '-inf', now)
local used = 0
for _, v in ipairs(redis.call('HVALS', holds)) do used = used + tonumber(v) end
local hours = {}
for h = since, math.floor(now / 3600000) * 3600 + 3600, 3600 do hours[#hours + 1] = h end
for _, v in ipairs(redis.call('HMGET', p .. spent .. tenant, unpack(hours))) do
  if v then used = used + tonumber(v) end
end
if used >= budget then return {0, used} end
redis.call('HSET', holds, key, uj)
redis.call('ZADD', expiry, now + ttl, key)
redis.call('PEXPIRE', holds, ttl)
redis.call('PEXPIRE', expiry, ttl)
return {1, used}
"""
# Lua numbers are doubles: exact up to 2**53 micro-joules (~9 GJ) per chunk, far above any chunk.


def default_journal_path(url: str, key_prefix: str) -> str:
    """A per-(Redis, prefix) journal file in the temp dir; the password never reaches the name."""
    parts = urlsplit(url)
    where = f"{parts.scheme}://{parts.hostname}:{parts.port}{parts.path}|{key_prefix}"
    digest = hashlib.sha256(where.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"joulegate-ledger-journal-{digest}.sqlite")


class RedisLedger(BufferedLedger):
    """The ledger in Redis; see the module docstring for keys and idempotency."""

    def __init__(self, url: str, *, key_prefix: str = "joulegate:", socket_timeout_s: float = 2.0,
                 journal_path: str | None = None, **opts: Any) -> None:
        super().__init__(journal_path=journal_path or default_journal_path(url, key_prefix), **opts)
        self.url = url
        self.key_prefix = key_prefix
        self._prefix_b = key_prefix.encode()
        self._socket_timeout_s = socket_timeout_s
        self._redis: Redis | None = None
        self._script: Any = None
        self._reserve_script: Any = None

    async def _open(self) -> None:
        self._redis = redis_from_url(self.url, self._socket_timeout_s)
        self._script = self._redis.register_script(WRITE_SCRIPT)
        self._reserve_script = self._redis.register_script(RESERVE_SCRIPT)

    async def _close_store(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    def _client(self) -> Redis:
        if self._redis is None:
            raise RuntimeError("ledger not started")
        return self._redis

    async def _write_chunk(self, records: Sequence[LedgerRecord]) -> int:
        # Retention counts from the write, not from end_s, so a late replay of an old record
        # still finds its dedupe marker.
        ttl_ms = max(1, round(self.retention_s * 1000))
        args: list[Any] = [self.key_prefix, round(time.time() * 1000)]
        for rec in records:
            group = orjson.dumps([rec.tenant, rec.model, rec.backend])
            args += (rec.uid, ttl_ms, orjson.dumps(rec.to_row()), rec.hour_s, group,
                     rec.tenant, rec.prompt_tokens, rec.completion_tokens, joules_to_uj(rec.joules),
                     rec.request_id, rec.reasoning_tokens, joules_to_uj(rec.joules_all_in),
                     grams_to_ug(rec.gco2e), rec.key_subject)
        self._client()  # raises if not started
        holds = [part for hold in self._holds(records) for part in hold]
        return int(await self._script(keys=holds, args=args))

    async def _buckets(self, tenant: str | None, since_hour_s: int | None,
                       until_s: float | None) -> list[Bucket]:
        r = self._client()
        lo = "-inf" if since_hour_s is None else since_hour_s
        hi = "+inf" if until_s is None else f"({until_s!r}"
        # redis-py types the reply as any RESP value; ZRANGEBYSCORE answers a list of members.
        members = cast("list[bytes]", await r.zrangebyscore(self._prefix_b + b"hours", lo, hi))
        hours = [int(h) for h in members]
        if not hours:
            return []
        pipe = r.pipeline(transaction=False)
        for hour in hours:
            pipe.hgetall(self._prefix_b + b"agg:" + str(hour).encode())
        cells: dict[tuple[str, str, str, int], list[int]] = {}
        index = {b"r": 0, b"p": 1, b"c": 2, b"j": 3, b"x": 4, b"a": 5, b"g": 6}
        for hour, fields in zip(hours, await pipe.execute(), strict=True):
            for field, value in fields.items():
                metric, _, group = field.partition(b":")
                t, m, b = orjson.loads(group)
                if tenant is not None and t != tenant:
                    continue
                cell = cells.setdefault((t, m, b, hour), [0] * 7)
                slot = index.get(metric)
                if slot is not None:  # a field a newer version added: not ours to sum
                    cell[slot] += int(value)
        return [Bucket(*key, *sums) for key, sums in cells.items()]

    async def _stored_request(self, request_id: str, tenant: str | None) -> LedgerRecord | None:
        r = self._client()
        rid = request_id.encode()
        uids = await r.zrange(self._prefix_b + b"ids:" + rid, 0, -1)
        # The id itself too: records without a key are stored under it.
        raws = await r.mget([self._prefix_b + b"req:" + uid for uid in (rid, *uids)])
        found = (LedgerRecord.from_row(orjson.loads(raw)) for raw in raws if raw is not None)
        return latest(rec for rec in found if tenant is None or rec.tenant == tenant)

    async def _stored_tenant_uj(self, tenant: str, since_hour_s: int) -> int:
        # Only the hours asked for (to the next one, for clock skew): the cost of a budget read
        # does not grow with the tenant's history.
        hours = range(since_hour_s, hour_floor_s(time.time()) + 2 * HOUR_S, HOUR_S)
        spend = await self._client().hmget(self._prefix_b + b"tj:" + tenant.encode(), list(hours))
        return sum(int(uj) for uj in spend if uj is not None)

    async def _reserve_store(self, tenant: str, key: str, uj: int, since_hour_s: int,
                             budget_uj: int, ttl_s: float, unit: BudgetUnit) -> tuple[bool, int]:
        self._client()
        reserved, used = await self._reserve_script(keys=[], args=[
            self.key_prefix, tenant, key, uj, since_hour_s, budget_uj, round(time.time() * 1000),
            max(1, round(ttl_s * 1000)), "j" if unit == "joules" else "g"])
        return bool(reserved), int(used)

    async def _release_store(self, tenant: str, key: str) -> None:
        pipe = self._client().pipeline(transaction=True)
        pipe.hdel(self._prefix_b + b"hold:" + tenant.encode(), key)
        pipe.hdel(self._prefix_b + b"holdg:" + tenant.encode(), key)
        pipe.zrem(self._prefix_b + b"holdx:" + tenant.encode(), key)
        await pipe.execute()

    async def _extend_store(self, holds: Sequence[tuple[str, str]], ttl_s: float) -> None:
        # ZADD XX only moves an expiry that is still there: a settled or released hold (both
        # remove it from holdx:) is never brought back. An expired one still listed is dropped by
        # the next reservation's sweep before it could be moved, or is moved with its µJ: either
        # way the request it belongs to is still running. The keys' own TTL is every hold's TTL.
        now_ms, ttl_ms = round(time.time() * 1000), max(1, round(ttl_s * 1000))
        pipe = self._client().pipeline(transaction=False)
        for tenant in {t for t, _ in holds}:
            pipe.pexpire(self._prefix_b + b"hold:" + tenant.encode(), ttl_ms)
            pipe.pexpire(self._prefix_b + b"holdg:" + tenant.encode(), ttl_ms)
            pipe.pexpire(self._prefix_b + b"holdx:" + tenant.encode(), ttl_ms)
        for tenant, key in holds:
            pipe.zadd(self._prefix_b + b"holdx:" + tenant.encode(), {key: now_ms + ttl_ms}, xx=True)
        await pipe.execute()

    # Per-request keys expire by TTL, so there is nothing to prune.
