"""`postgresql://user:pass@host:5432/db`: one ledger shared by many replicas and workers.

Driver: psycopg 3 with psycopg_pool (async on the event loop, no I/O thread; fully typed, so
`mypy --strict` checks the calls). The schema (tables `requests`, `aggregates`, `holds`,
`subject_spend`) is created on start, and again where a table is missing; columns added since
the first version are added with ADD COLUMN IF NOT EXISTS, so an older database is migrated in
place; both are safe to run from many processes.

Idempotency: a chunk is one transaction. It inserts its records with `ON CONFLICT (request_id)
DO NOTHING RETURNING request_id` and adds to the aggregates only the rows that statement
returned (the ones actually inserted), so a chunk retried after a lost commit reply adds
nothing twice, and one that fails half-way rolls back whole. `request_id` holds the record's uid
in the "C" collation, so one client id's rows are a range scan on the primary key.

Budget holds: a reservation takes a per-tenant transaction-level advisory lock, then sums the
tenant's aggregates and live holds in one statement and inserts its hold; a chunk deletes the
holds its records settle in the transaction that adds their joules. Rows and keys are written
in sorted order so two replicas' transactions never wait on each other in a cycle.

A step whose pooled connection the server had closed (a restart, a failover) is tried once more
on a fresh one, after the pool drops its other stale connections; every step is idempotent.

Expiry and retention use the proxy's wall clock (as SQLite and Redis do): keep replicas' clocks
in sync (NTP). While PostgreSQL is down, records stay buffered and spill past `max_buffer` to a
local SQLite journal (`journal_path`; default: a temp-dir file named after host, port and db).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from proxy.ledger.base import BufferedLedger
from proxy.ledger.record import LedgerRecord, latest
from proxy.ledger.redis import default_journal_path
from proxy.ledger.sql import (
    BUCKET_COLUMNS,
    BUDGET_COLUMN,
    SUBJECT_SPEND_TABLE,
    SUM_COLUMNS,
    Cell,
    add_to_cell,
    add_to_spend,
    record_from_row,
    request_query,
    spend_source,
    usage_rows,
    where,
)
from proxy.ledger.usage import Bucket, BudgetUnit, UsageRow, joules_to_uj
from proxy.redact import redact_text

log = logging.getLogger("joulegate.ledger")
_T = TypeVar("_T")
Conn = AsyncConnection[tuple[Any, ...]]
# The pool logs every failed connection attempt; the ledger reports an outage itself (flush
# failures, joulegate_ledger_* metrics), once, so the pool's own lines are kept to errors.
logging.getLogger("psycopg.pool").setLevel(logging.ERROR)

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT COLLATE "C" PRIMARY KEY,
    tenant TEXT NOT NULL, model TEXT NOT NULL, backend TEXT NOT NULL,
    prompt_tokens BIGINT NOT NULL, completion_tokens BIGINT NOT NULL,
    joules DOUBLE PRECISION NOT NULL, joules_uj BIGINT NOT NULL, method TEXT NOT NULL,
    start_s DOUBLE PRECISION NOT NULL, end_s DOUBLE PRECISION NOT NULL, status INTEGER NOT NULL,
    written_s DOUBLE PRECISION NOT NULL  -- wall clock of the flush; retention counts from here
);
CREATE INDEX IF NOT EXISTS requests_written_s ON requests (written_s);
CREATE TABLE IF NOT EXISTS aggregates (
    tenant TEXT NOT NULL, model TEXT NOT NULL, backend TEXT NOT NULL, hour_s BIGINT NOT NULL,
    requests BIGINT NOT NULL, prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL, joules_uj BIGINT NOT NULL,
    PRIMARY KEY (tenant, model, backend, hour_s)
);
CREATE INDEX IF NOT EXISTS aggregates_tenant_hour ON aggregates (tenant, hour_s);
CREATE INDEX IF NOT EXISTS aggregates_hour ON aggregates (hour_s);
CREATE TABLE IF NOT EXISTS holds (
    key TEXT PRIMARY KEY, tenant TEXT NOT NULL, joules_uj BIGINT NOT NULL,
    expires_s DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS holds_tenant ON holds (tenant, expires_s);
""" + SUBJECT_SPEND_TABLE
#: Every table SCHEMA makes: a database lacking one (older than it) gets SCHEMA run again.
TABLES = ("requests", "aggregates", "holds", "subject_spend")
#: Columns added since the first schema, with their definitions. Added only when missing: an
#: ALTER TABLE, even a no-op one, waits for an exclusive lock behind every running query.
MIGRATIONS = (
    ("requests", "reasoning_tokens", "BIGINT NOT NULL DEFAULT 0"),
    ("requests", "joules_all_in", "DOUBLE PRECISION NOT NULL DEFAULT 0"),
    ("requests", "gco2e", "DOUBLE PRECISION NOT NULL DEFAULT 0"),
    ("aggregates", "reasoning_tokens", "BIGINT NOT NULL DEFAULT 0"),
    ("aggregates", "joules_all_in_uj", "BIGINT NOT NULL DEFAULT 0"),
    ("aggregates", "gco2e_ug", "BIGINT NOT NULL DEFAULT 0"),
    ("holds", "gco2e_ug", "BIGINT NOT NULL DEFAULT 0"),  # a hold in grams (joules_uj 0)
)
#: Serialises schema set-up across processes (CREATE ... IF NOT EXISTS races on the catalog).
SCHEMA_LOCK = 0x4A47_0001
#: The advisory-lock class of budget holds; the object id is a hash of the tenant.
HOLDS_LOCK_CLASS = 0x4A47

INSERT_REQUESTS = (
    "INSERT INTO requests (request_id, tenant, model, backend, prompt_tokens, completion_tokens,"
    " joules, joules_uj, method, start_s, end_s, status, written_s, reasoning_tokens,"
    " joules_all_in, gco2e)"
    " SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::bigint[],"
    " %s::bigint[], %s::float8[], %s::bigint[], %s::text[], %s::float8[], %s::float8[],"
    " %s::int[], %s::float8[], %s::bigint[], %s::float8[], %s::float8[])"
    " ON CONFLICT (request_id) DO NOTHING RETURNING request_id"
)
UPSERT_CELLS = (
    "INSERT INTO aggregates AS a (tenant, model, backend, hour_s, requests, prompt_tokens,"
    " completion_tokens, joules_uj, reasoning_tokens, joules_all_in_uj, gco2e_ug)"
    " SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[], %s::bigint[],"
    " %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[])"
    " ON CONFLICT (tenant, model, backend, hour_s) DO UPDATE SET"
    " requests = a.requests + excluded.requests,"
    " prompt_tokens = a.prompt_tokens + excluded.prompt_tokens,"
    " completion_tokens = a.completion_tokens + excluded.completion_tokens,"
    " joules_uj = a.joules_uj + excluded.joules_uj,"
    " reasoning_tokens = a.reasoning_tokens + excluded.reasoning_tokens,"
    " joules_all_in_uj = a.joules_all_in_uj + excluded.joules_all_in_uj,"
    " gco2e_ug = a.gco2e_ug + excluded.gco2e_ug"
)
UPSERT_SPEND = (
    "INSERT INTO subject_spend AS s (subject, hour_s, joules_uj, gco2e_ug)"
    " SELECT * FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::bigint[])"
    " ON CONFLICT (subject, hour_s) DO UPDATE SET joules_uj = s.joules_uj + excluded.joules_uj,"
    " gco2e_ug = s.gco2e_ug + excluded.gco2e_ug"
)
PRUNE_BATCH = 5000  # rows per delete, so a prune never holds many row locks for long


def holds_lock_id(tenant: str) -> int:
    """The advisory-lock object id (signed 32-bit) that serialises `tenant`'s reservations."""
    return int.from_bytes(hashlib.blake2b(tenant.encode(), digest_size=4).digest(), "big", signed=True)


class PostgresLedger(BufferedLedger):
    """The ledger in PostgreSQL; see the module docstring for tables, idempotency and holds."""

    def __init__(self, url: str, *, connect_timeout_s: float = 5.0, pool_size: int = 4,
                 sslmode: str | None = None, journal_path: str | None = None,
                 **opts: Any) -> None:
        super().__init__(journal_path=journal_path or default_journal_path(url, ""), **opts)
        self.url = url
        self._connect_timeout_s = connect_timeout_s
        self._pool_size = max(2, pool_size)  # holds must not queue behind a long flush
        self._conn_kwargs: dict[str, Any] = {"autocommit": True}
        if sslmode is not None:
            self._conn_kwargs["sslmode"] = sslmode
        self._pool: AsyncConnectionPool[Conn] | None = None
        self._schema_ready = False
        self._schema_lock = asyncio.Lock()

    async def _open(self) -> None:
        self._pool = AsyncConnectionPool(
            self.url, min_size=1, max_size=self._pool_size, kwargs=self._conn_kwargs,
            timeout=self._connect_timeout_s, open=False, name="joulegate-ledger")
        await self._pool.open(wait=False)
        try:
            await self._ensure_schema()
        except Exception as exc:  # down at start: buffer now, create the schema on first use
            log.info("ledger: PostgreSQL not ready at start: %s", redact_text(str(exc)))

    async def _close_store(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    def _pool_or_raise(self) -> AsyncConnectionPool[Conn]:
        if self._pool is None:
            raise RuntimeError("ledger not started")
        return self._pool

    async def _ensure_schema(self) -> None:
        if self._schema_ready:
            return
        async with self._schema_lock:
            if self._schema_ready:
                return
            async with self._pool_or_raise().connection() as conn, conn.transaction():
                # A schema change that cannot get its locks fails (and is retried on first use)
                # rather than holding up the start.
                await conn.execute(f"SET LOCAL lock_timeout = {round(self._connect_timeout_s * 1000)}")
                await conn.execute("SELECT pg_advisory_xact_lock(%s::bigint)", (SCHEMA_LOCK,))
                cur = await conn.execute(
                    "SELECT table_name, column_name FROM information_schema.columns"
                    " WHERE table_schema = current_schema()"
                    " AND table_name = ANY(%s::text[])", (list(TABLES),))
                have = {(str(table), str(column)) for table, column in await cur.fetchall()}
                if {table for table, _ in have} != set(TABLES):
                    # Not when all are there: CREATE INDEX IF NOT EXISTS still locks out writers.
                    await conn.execute(SCHEMA)
                for table, column, definition in MIGRATIONS:
                    if (table, column) not in have:
                        await conn.execute(
                            f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {definition}")
            self._schema_ready = True

    async def _transact(self, step: Callable[[Conn], Awaitable[_T]], *, tx: bool = True) -> _T:
        """`step` on a pooled connection, in one transaction unless `tx` is False (one
        statement: autocommit saves the BEGIN and COMMIT round trips). Tried once more on a fresh
        connection when the server had closed the pooled one (a restart or failover since it was
        last used): every step here is idempotent, so a retry after a lost commit is harmless."""
        await self._ensure_schema()
        pool = self._pool_or_raise()
        for attempt in (1, 2):
            used: Conn | None = None
            try:
                async with pool.connection() as conn:
                    used = conn
                    if not tx:
                        return await step(conn)
                    async with conn.transaction():
                        return await step(conn)
            except psycopg.OperationalError:
                if attempt == 2 or used is None or not used.broken:
                    raise
                await pool.check()  # its idle siblings are as stale: drop them before the retry
        raise AssertionError("unreachable")

    async def _fetch(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        async def step(conn: Conn) -> list[tuple[Any, ...]]:
            return await (await conn.execute(sql, args)).fetchall()

        return await self._transact(step, tx=False)

    async def _write_chunk(self, records: Sequence[LedgerRecord]) -> int:
        recs = sorted(records, key=lambda r: r.uid)  # one lock order across replicas
        now = time.time()
        cols: list[list[Any]] = [[] for _ in range(16)]
        for rec in recs:
            for col, value in zip(cols, (
                    rec.uid, rec.tenant, rec.model, rec.backend, rec.prompt_tokens,
                    rec.completion_tokens, rec.joules, joules_to_uj(rec.joules), rec.method,
                    rec.start_s, rec.end_s, rec.status, now, rec.reasoning_tokens,
                    rec.joules_all_in, rec.gco2e), strict=True):
                col.append(value)
        holds = sorted(key for _, key in self._holds(records))

        async def step(conn: Conn) -> int:
            cur = await conn.execute(INSERT_REQUESTS, cols)
            inserted = {row[0] for row in await cur.fetchall()}
            cells: dict[Cell, list[int]] = {}
            spend: dict[tuple[str, int], list[int]] = {}
            for rec in recs:
                if rec.uid in inserted:  # else seen before: the aggregates already hold it
                    add_to_cell(cells, rec)
                    add_to_spend(spend, rec)
            if cells:
                rows = [(*key, *sums) for key, sums in sorted(cells.items())]
                await conn.execute(UPSERT_CELLS, [list(col) for col in zip(*rows, strict=True)])
            if spend:  # sorted, as the cells: one row-lock order across replicas
                rows = [(*key, *sums) for key, sums in sorted(spend.items())]
                await conn.execute(UPSERT_SPEND, [list(col) for col in zip(*rows, strict=True)])
            if holds:
                await conn.execute("DELETE FROM holds WHERE key = ANY(%s::text[])", (holds,))
            return len(inserted)

        return await self._transact(step)

    async def _grouped(self, tenant: str | None, since_hour_s: int | None, until_s: float | None,
                       group_by: tuple[str, ...]) -> list[UsageRow]:
        # GROUP BY in SQL: a month of cells can be large, and the sums stay integers.
        cols = [("hour_s" if key == "hour" else key) for key in group_by]
        where_sql, args = where(tenant, since_hour_s, until_s, "%s")
        sql = f"SELECT {', '.join([*cols, ''])}{SUM_COLUMNS} FROM aggregates{where_sql}"
        if cols:
            sql += f" GROUP BY {', '.join(cols)} ORDER BY {', '.join(cols)}"
        return usage_rows(await self._fetch(sql, args), group_by)

    async def _buckets(self, tenant: str | None, since_hour_s: int | None,
                       until_s: float | None) -> list[Bucket]:
        where_sql, args = where(tenant, since_hour_s, until_s, "%s")
        return [Bucket(*row) for row in await self._fetch(
            f"SELECT {BUCKET_COLUMNS} FROM aggregates{where_sql}", args)]

    async def _stored_request(self, request_id: str, tenant: str | None) -> LedgerRecord | None:
        rows = await self._fetch(*request_query(request_id, tenant, "%s"))
        return latest(record_from_row(row) for row in rows)

    async def _stored_tenant_uj(self, tenant: str, since_hour_s: int) -> int:
        rows = await self._fetch(
            "SELECT COALESCE(SUM(joules_uj), 0) FROM aggregates WHERE tenant = %s AND hour_s >= %s",
            (tenant, since_hour_s))
        return int(rows[0][0])

    async def _reserve_store(self, tenant: str, key: str, uj: int, since_hour_s: int,
                             budget_uj: int, ttl_s: float, unit: BudgetUnit) -> tuple[bool, int]:
        now = time.time()
        col = BUDGET_COLUMN[unit]  # fixed names, never input
        table, who = spend_source(tenant)
        held_uj, held_ug = (uj, 0) if unit == "joules" else (0, uj)

        async def step(conn: Conn) -> tuple[bool, int]:
            # Every reservation of this tenant, on any replica, waits here: the read below and
            # the insert are one step. The lock ends with the transaction.
            await conn.execute("SELECT pg_advisory_xact_lock(%s::int, %s::int)",
                               (HOLDS_LOCK_CLASS, holds_lock_id(tenant)))
            await conn.execute("DELETE FROM holds WHERE tenant = %s AND expires_s <= %s", (tenant, now))
            cur = await conn.execute(
                f"SELECT (SELECT COALESCE(SUM({col}), 0) FROM {table}"
                f" WHERE {who} = %s AND hour_s >= %s)"
                f" + (SELECT COALESCE(SUM({col}), 0) FROM holds WHERE tenant = %s)",
                (tenant, since_hour_s, tenant))
            row = await cur.fetchone()
            used = int(row[0]) if row is not None else 0
            reserved = used < budget_uj
            if reserved:
                await conn.execute(
                    "INSERT INTO holds (key, tenant, joules_uj, gco2e_ug, expires_s) VALUES (%s, %s, %s, %s, %s)"
                    " ON CONFLICT (key) DO UPDATE SET tenant = excluded.tenant, joules_uj = excluded.joules_uj,"
                    " gco2e_ug = excluded.gco2e_ug, expires_s = excluded.expires_s",
                    (key, tenant, held_uj, held_ug, now + ttl_s))
            return reserved, used

        return await self._transact(step)

    async def _release_store(self, tenant: str, key: str) -> None:
        await self._fetch_none("DELETE FROM holds WHERE key = %s", (key,))

    async def _extend_store(self, holds: Sequence[tuple[str, str]], ttl_s: float) -> None:
        now = time.time()
        await self._fetch_none(
            "UPDATE holds SET expires_s = %s WHERE key = ANY(%s::text[]) AND expires_s > %s",
            (now + ttl_s, sorted(key for _, key in holds), now))

    async def _fetch_none(self, sql: str, args: Sequence[Any]) -> int:
        async def step(conn: Conn) -> int:
            return (await conn.execute(sql, args)).rowcount

        return await self._transact(step, tx=False)

    async def _prune(self, cutoff_s: float) -> int:
        if not self._schema_ready:
            return 0  # never reached the server yet: nothing of ours to prune, no wait for it
        deleted = 0
        while True:
            try:
                count = await self._fetch_none(
                    "DELETE FROM requests WHERE request_id IN"
                    " (SELECT request_id FROM requests WHERE written_s < %s LIMIT %s)",
                    (cutoff_s, PRUNE_BATCH))
            except (psycopg.OperationalError, PoolTimeout) as exc:
                # The server is away: the next prune interval tries again. Not a traceback.
                log.info("ledger: pruning skipped, PostgreSQL unreachable: %s", redact_text(str(exc)))
                return deleted
            deleted += count
            if count < PRUNE_BATCH:
                return deleted

