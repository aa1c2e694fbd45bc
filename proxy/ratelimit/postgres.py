"""Rate-limit counters in the ledger's PostgreSQL database: table `rate_windows`, one row per
scope and window. An admission is one transaction that locks the scopes' rows (in sorted
order, so two replicas never wait on each other in a cycle), checks and counts."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from proxy.ratelimit.stores import Counts, RateStore
from proxy.ratelimit.window import RateScope, refusal
from proxy.stores import StoreURL, postgres_pool, postgres_schema

SCHEMA = """
CREATE TABLE IF NOT EXISTS rate_windows (
    scope TEXT NOT NULL, window_m BIGINT NOT NULL, requests BIGINT NOT NULL, tokens BIGINT NOT NULL,
    PRIMARY KEY (scope, window_m)
);
"""
#: Serialises the schema's set-up across processes (the ledger's is 0x4A47_0001).
SCHEMA_LOCK = 0x4A47_0003
#: How often a replica deletes windows that ended (s).
_PRUNE_EVERY_S = 60.0


class PostgresRateStore(RateStore):
    def __init__(self, store: StoreURL) -> None:
        self._pool: Any = postgres_pool(store, "joulegate-ratelimit", max_size=4)
        self._schema_ready = False
        self._pruned_s = 0.0

    async def start(self) -> None:
        await self._pool.open(wait=False)
        await self._ready()  # now, not in the first limited request's 50 ms

    async def close(self) -> None:
        await self._pool.close()

    async def _ready(self) -> None:
        if not self._schema_ready:
            await postgres_schema(self._pool, SCHEMA_LOCK, SCHEMA)
            self._schema_ready = True

    async def admit(self, scopes: Sequence[RateScope], window: int, tokens: int) -> tuple[bool, Counts]:
        await self._ready()
        order = sorted(range(len(scopes)), key=lambda i: scopes[i].id)
        ids = [scopes[i].id for i in order]
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO rate_windows (scope, window_m, requests, tokens)"
                " SELECT s, %s, 0, 0 FROM unnest(%s::text[]) AS s ON CONFLICT DO NOTHING", (window, ids))
            cur = await conn.execute(
                "SELECT scope, requests, tokens FROM rate_windows WHERE window_m = %s"
                " AND scope = ANY(%s::text[]) ORDER BY scope FOR UPDATE", (window, ids))
            found = {str(row[0]): (int(row[1]), int(row[2])) for row in await cur.fetchall()}
            counts = [found.get(scope.id, (0, 0)) for scope in scopes]
            if refusal(scopes, counts, tokens) is not None:
                return False, counts
            await conn.execute(
                "UPDATE rate_windows SET requests = requests + 1, tokens = tokens + %s"
                " WHERE window_m = %s AND scope = ANY(%s::text[])", (tokens, window, ids))
        if time.monotonic() - self._pruned_s > _PRUNE_EVERY_S:
            self._pruned_s = time.monotonic()
            async with self._pool.connection() as conn:
                await conn.execute("DELETE FROM rate_windows WHERE window_m < %s", (window - 1,))
        return True, counts

    async def adjust(self, scopes: Sequence[RateScope], window: int, tokens: int) -> None:
        await self._ready()
        async with self._pool.connection() as conn:
            await conn.execute("UPDATE rate_windows SET tokens = tokens + %s WHERE window_m = %s"
                               " AND scope = ANY(%s::text[])", (tokens, window, sorted(s.id for s in scopes)))
