"""`sqlite:///path`: the embedded default ledger (the spill journal is journal.py).

WAL mode, so readers (`joulegate usage`, other workers) never block the writer. All access goes
through the ledger's single I/O thread, which owns the connection (one connection per thread),
so the event loop never waits on the disk.

Idempotency: `requests.request_id` is the primary key and holds the record's `uid` (the
client's request id, then UID_SEP and the proxy's unique key, so a client id that repeats is
still a new row; a range scan on the key finds every row of one client id). A chunk is one transaction that does
`INSERT OR IGNORE` per record and adds to the aggregates only the records whose insert changed
a row (`rowcount == 1`); a retried chunk therefore adds nothing twice, and a chunk that fails
half-way rolls back whole. Request rows are pruned `retention_s` after they were written (not
after the request ended), so the dedupe window is never shorter than the retention. Several processes may share one file: the primary key and SQLite's
write lock (`busy_timeout_s`) keep their writes exact.

`synchronous=NORMAL`: a committed flush survives the process being killed; a power cut may lose
the last flushes (use `synchronous="FULL"` to trade write speed for that).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from proxy.ledger.base import BufferedLedger
from proxy.ledger.journal import connect
from proxy.ledger.record import LedgerRecord, latest
from proxy.ledger.sql import (
    BUCKET_COLUMNS,
    BUDGET_COLUMN,
    SUBJECT_SPEND_TABLE,
    SUM_COLUMNS,
    add_to_cell,
    add_to_spend,
    record_from_row,
    request_query,
    spend_source,
    usage_rows,
    where,
)
from proxy.ledger.usage import Bucket, BudgetUnit, UsageRow, joules_to_uj

_T = TypeVar("_T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL, model TEXT NOT NULL, backend TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    joules REAL NOT NULL, joules_uj INTEGER NOT NULL, method TEXT NOT NULL,
    start_s REAL NOT NULL, end_s REAL NOT NULL, status INTEGER NOT NULL,
    written_s REAL NOT NULL,  -- wall clock of the flush; retention counts from here
    reasoning_tokens INTEGER NOT NULL DEFAULT 0,
    joules_all_in REAL NOT NULL DEFAULT 0, gco2e REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS requests_written_s ON requests (written_s);
CREATE TABLE IF NOT EXISTS aggregates (
    tenant TEXT NOT NULL, model TEXT NOT NULL, backend TEXT NOT NULL, hour_s INTEGER NOT NULL,
    requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, joules_uj INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL DEFAULT 0,
    joules_all_in_uj INTEGER NOT NULL DEFAULT 0, gco2e_ug INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, model, backend, hour_s)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS aggregates_tenant_hour ON aggregates (tenant, hour_s);
-- Budget holds of requests in flight (accounting.py); a flush deletes a request's hold in the
-- transaction that adds its joules, so the two never count twice or not at all. A hold's amount
-- is in the column of its budget's unit (joules_uj or gco2e_ug); the other is 0.
CREATE TABLE IF NOT EXISTS holds (
    key TEXT PRIMARY KEY, tenant TEXT NOT NULL, joules_uj INTEGER NOT NULL, expires_s REAL NOT NULL,
    gco2e_ug INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS holds_tenant ON holds (tenant, expires_s);
""" + SUBJECT_SPEND_TABLE  # a file made before key budgets gets it on open, as IF NOT EXISTS

INSERT_REQUEST = (
    "INSERT OR IGNORE INTO requests (request_id, tenant, model, backend, prompt_tokens,"
    " completion_tokens, joules, joules_uj, method, start_s, end_s, status, written_s, reasoning_tokens,"
    " joules_all_in, gco2e) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
UPSERT_CELL = (
    "INSERT INTO aggregates (tenant, model, backend, hour_s, requests, prompt_tokens,"
    " completion_tokens, joules_uj, reasoning_tokens, joules_all_in_uj, gco2e_ug)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (tenant, model, backend, hour_s) DO UPDATE SET"
    " requests = requests + excluded.requests,"
    " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
    " completion_tokens = completion_tokens + excluded.completion_tokens,"
    " joules_uj = joules_uj + excluded.joules_uj,"
    " reasoning_tokens = reasoning_tokens + excluded.reasoning_tokens,"
    " joules_all_in_uj = joules_all_in_uj + excluded.joules_all_in_uj,"
    " gco2e_ug = gco2e_ug + excluded.gco2e_ug"
)
UPSERT_SPEND = (
    "INSERT INTO subject_spend (subject, hour_s, joules_uj, gco2e_ug) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (subject, hour_s) DO UPDATE SET joules_uj = joules_uj + excluded.joules_uj,"
    " gco2e_ug = gco2e_ug + excluded.gco2e_ug"
)
#: Columns added since the first schema, with their definitions (ALTER TABLE on open).
MIGRATIONS = (
    ("requests", "reasoning_tokens", "INTEGER NOT NULL DEFAULT 0"),
    ("aggregates", "reasoning_tokens", "INTEGER NOT NULL DEFAULT 0"),
    ("requests", "joules_all_in", "REAL NOT NULL DEFAULT 0"),
    ("requests", "gco2e", "REAL NOT NULL DEFAULT 0"),
    ("aggregates", "joules_all_in_uj", "INTEGER NOT NULL DEFAULT 0"),
    ("aggregates", "gco2e_ug", "INTEGER NOT NULL DEFAULT 0"),
    ("holds", "gco2e_ug", "INTEGER NOT NULL DEFAULT 0"),
)
PRUNE_BATCH = 5000  # rows per delete transaction, so a prune never holds the write lock long


class SqliteLedger(BufferedLedger):
    """The ledger in one SQLite file. Its journal (only created if the file cannot be written
    for long enough to fill `max_buffer`) defaults to `<path>.journal`."""

    def __init__(self, path: str, *, busy_timeout_s: float = 5.0, synchronous: str = "NORMAL",
                 journal_path: str | None = None, **opts: Any) -> None:
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, not {synchronous!r}")
        super().__init__(journal_path=journal_path or f"{path}.journal", **opts)
        self.path = path
        self._busy_timeout_s = busy_timeout_s
        self._synchronous = synchronous.upper()
        self._conn: sqlite3.Connection | None = None
        # Budget holds on a thread and connection of their own, so a reservation never waits
        # behind a flush's disk I/O queued on `_io` (only behind its short write lock).
        self._holds_io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="joulegate-holds")
        self._holds_conn: sqlite3.Connection | None = None

    # Everything named `_..._sync` runs on the I/O thread.
    def _open_sync(self) -> None:
        conn = connect(self.path, busy_timeout_s=self._busy_timeout_s, synchronous=self._synchronous)
        conn.executescript(SCHEMA)
        migrate(conn)
        self._conn = conn

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self._open_sync()  # a first open that failed (disk, permissions) is retried here
        assert self._conn is not None
        return self._conn

    async def _open(self) -> None:
        await self._run_io(self._open_sync)
        await self._run_holds(self._holds_db)

    async def _run_holds(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._holds_io, fn, *args)

    def _holds_db(self) -> sqlite3.Connection:
        if self._holds_conn is None:
            self._holds_conn = connect(self.path, busy_timeout_s=self._busy_timeout_s,
                                       synchronous=self._synchronous)
        return self._holds_conn

    def _reserve_sync(self, tenant: str, key: str, uj: int, since_hour_s: int, budget_uj: int,
                      ttl_s: float, unit: BudgetUnit) -> tuple[bool, int]:
        conn = self._holds_db()
        now = time.time()
        col = BUDGET_COLUMN[unit]  # fixed names, never input
        table, who = spend_source(tenant)
        conn.execute("BEGIN IMMEDIATE")  # the write lock first: the read and the insert are one step
        try:
            conn.execute("DELETE FROM holds WHERE tenant = ? AND expires_s <= ?", (tenant, now))
            used = int(conn.execute(
                f"SELECT (SELECT COALESCE(SUM({col}), 0) FROM {table} WHERE {who} = ? AND hour_s >= ?)"
                f" + (SELECT COALESCE(SUM({col}), 0) FROM holds WHERE tenant = ?)",
                (tenant, since_hour_s, tenant)).fetchone()[0])
            reserved = used < budget_uj
            if reserved:
                held_uj, held_ug = (uj, 0) if unit == "joules" else (0, uj)
                conn.execute("INSERT OR REPLACE INTO holds (key, tenant, joules_uj, gco2e_ug, expires_s)"
                             " VALUES (?, ?, ?, ?, ?)", (key, tenant, held_uj, held_ug, now + ttl_s))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return reserved, used

    async def _reserve_store(self, tenant: str, key: str, uj: int, since_hour_s: int,
                             budget_uj: int, ttl_s: float, unit: BudgetUnit) -> tuple[bool, int]:
        return await self._run_holds(self._reserve_sync, tenant, key, uj, since_hour_s, budget_uj, ttl_s, unit)

    async def _release_store(self, tenant: str, key: str) -> None:
        await self._run_holds(lambda: self._holds_db().execute("DELETE FROM holds WHERE key = ?", (key,)))

    def _extend_sync(self, keys: list[str], ttl_s: float) -> None:
        conn = self._holds_db()
        now = time.time()
        with conn:  # one transaction: one write lock for the whole batch
            conn.executemany("UPDATE holds SET expires_s = ? WHERE key = ? AND expires_s > ?",
                             [(now + ttl_s, key, now) for key in keys])

    async def _extend_store(self, holds: Sequence[tuple[str, str]], ttl_s: float) -> None:
        await self._run_holds(self._extend_sync, [key for _, key in holds], ttl_s)

    async def _close_store(self) -> None:
        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        def close_holds() -> None:
            if self._holds_conn is not None:
                self._holds_conn.close()
                self._holds_conn = None

        await self._run_io(close)
        await self._run_holds(close_holds)
        self._holds_io.shutdown(wait=True)

    def _write_sync(self, records: Sequence[LedgerRecord], holds: Sequence[tuple[str, str]] = ()) -> int:
        conn = self._db()
        cells: dict[tuple[str, str, str, int], list[int]] = {}
        spend: dict[tuple[str, int], list[int]] = {}
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for rec in records:
                uj = joules_to_uj(rec.joules)
                cur = conn.execute(INSERT_REQUEST, (
                    rec.uid, rec.tenant, rec.model, rec.backend, rec.prompt_tokens,
                    rec.completion_tokens, rec.joules, uj, rec.method, rec.start_s, rec.end_s,
                    rec.status, now, rec.reasoning_tokens, rec.joules_all_in, rec.gco2e))
                if cur.rowcount != 1:
                    continue  # seen before: the aggregates already hold it
                add_to_cell(cells, rec)
                add_to_spend(spend, rec)
            conn.executemany(UPSERT_CELL, [(*key, *sums) for key, sums in cells.items()])
            conn.executemany(UPSERT_SPEND, [(*key, *sums) for key, sums in spend.items()])
            conn.executemany("DELETE FROM holds WHERE key = ?", [(key,) for _, key in holds])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return sum(cell[0] for cell in cells.values())

    async def _write_chunk(self, records: Sequence[LedgerRecord]) -> int:
        return await self._run_io(self._write_sync, records, self._holds(records))

    def _grouped_sync(self, tenant: str | None, since_hour_s: int | None, until_s: float | None,
                      group_by: tuple[str, ...]) -> list[UsageRow]:
        cols = [("hour_s" if key == "hour" else key) for key in group_by]
        where_sql, args = where(tenant, since_hour_s, until_s)
        sql = f"SELECT {', '.join([*cols, ''])}{SUM_COLUMNS} FROM aggregates{where_sql}"
        if cols:
            sql += f" GROUP BY {', '.join(cols)} ORDER BY {', '.join(cols)}"
        return usage_rows(self._db().execute(sql, args), group_by)

    async def _grouped(self, tenant: str | None, since_hour_s: int | None, until_s: float | None,
                       group_by: tuple[str, ...]) -> list[UsageRow]:
        # GROUP BY in SQL: a month of cells can be large, and the sums stay integers.
        return await self._run_io(self._grouped_sync, tenant, since_hour_s, until_s, group_by)

    def _buckets_sync(self, tenant: str | None, since_hour_s: int | None,
                      until_s: float | None) -> list[Bucket]:
        where_sql, args = where(tenant, since_hour_s, until_s)
        return [Bucket(*row) for row in self._db().execute(
            f"SELECT {BUCKET_COLUMNS} FROM aggregates{where_sql}", args)]

    async def _buckets(self, tenant: str | None, since_hour_s: int | None,
                       until_s: float | None) -> list[Bucket]:
        return await self._run_io(self._buckets_sync, tenant, since_hour_s, until_s)

    def _request_sync(self, request_id: str, tenant: str | None) -> LedgerRecord | None:
        rows = self._db().execute(*request_query(request_id, tenant)).fetchall()
        return latest(record_from_row(row) for row in rows)

    async def _stored_request(self, request_id: str, tenant: str | None) -> LedgerRecord | None:
        return await self._run_io(self._request_sync, request_id, tenant)

    def _tenant_uj_sync(self, tenant: str, since_hour_s: int) -> int:
        row = self._db().execute(
            "SELECT COALESCE(SUM(joules_uj), 0) FROM aggregates WHERE tenant = ? AND hour_s >= ?",
            (tenant, since_hour_s)).fetchone()
        return int(row[0])

    async def _stored_tenant_uj(self, tenant: str, since_hour_s: int) -> int:
        return await self._run_io(self._tenant_uj_sync, tenant, since_hour_s)

    def _prune_sync(self, cutoff_s: float) -> int:
        conn = self._db()
        deleted = 0
        while True:
            cur = conn.execute(
                "DELETE FROM requests WHERE rowid IN"
                " (SELECT rowid FROM requests WHERE written_s < ? LIMIT ?)", (cutoff_s, PRUNE_BATCH))
            deleted += cur.rowcount
            if cur.rowcount < PRUNE_BATCH:
                return deleted

    async def _prune(self, cutoff_s: float) -> int:
        return await self._run_io(self._prune_sync, cutoff_s)


def migrate(conn: sqlite3.Connection) -> None:
    """Add the columns a ledger file made by an older version lacks (their default: 0)."""
    for table, column, definition in MIGRATIONS:
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column in have:
            continue
        try:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):  # another process migrated it just now
                raise

