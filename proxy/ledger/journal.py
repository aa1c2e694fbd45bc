"""The local journal a ledger spills to while its store is down, replayed once it is back.

Records wait there in a SQLite file, in arrival order, so memory stays bounded during an
outage and nothing recorded is lost; later flushes replay them into the store chunk by chunk.
The store's idempotency (by `LedgerRecord.uid`) absorbs a chunk replayed twice. Every file
access runs on the ledger's single I/O thread (`run_io`), so the event loop never waits on disk.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson

from proxy.ledger.record import LedgerRecord, latest
from proxy.ledger.usage import joules_to_uj

log = logging.getLogger("joulegate.ledger")

#: Runs a blocking function on the ledger's I/O thread: `await run_io(fn, *args)`.
RunIo = Callable[..., Awaitable[Any]]


def connect(path: str, *, busy_timeout_s: float = 5.0, synchronous: str = "NORMAL") -> sqlite3.Connection:
    """A WAL-mode connection in autocommit mode (transactions are explicit)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout_s)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn


class Journal:
    """Records waiting for the store, in a local SQLite file, in arrival order.

    Plain appends (no dedupe): a record spilled twice is replayed twice, and the store's
    idempotency counts it once. Opened lazily, on the ledger's I/O thread only. The file is
    kept when empty, because several worker processes may share it.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = connect(self.path)
            conn.executescript(
                "CREATE TABLE IF NOT EXISTS journal (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
                " request_id TEXT NOT NULL, tenant TEXT NOT NULL, hour_s INTEGER NOT NULL,"
                " joules_uj INTEGER NOT NULL, rec BLOB NOT NULL);"
                "CREATE INDEX IF NOT EXISTS journal_request_id ON journal (request_id);")
            self._conn = conn
        return self._conn

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def append(self, records: Sequence[LedgerRecord]) -> None:
        conn = self._db()
        with conn:  # one transaction
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO journal (request_id, tenant, hour_s, joules_uj, rec) VALUES (?, ?, ?, ?, ?)",
                [(r.request_id, r.tenant, r.hour_s, joules_to_uj(r.joules), orjson.dumps(r.to_row()))
                 for r in records])

    def read(self, limit: int) -> tuple[int, list[LedgerRecord]]:
        """The oldest `limit` records and the seq of the last one."""
        rows = self._db().execute("SELECT seq, rec FROM journal ORDER BY seq LIMIT ?",
                                  (limit,)).fetchall()
        if not rows:
            return 0, []
        return rows[-1][0], [LedgerRecord.from_row(orjson.loads(rec)) for _, rec in rows]

    def delete_through(self, seq: int) -> None:
        self._db().execute("DELETE FROM journal WHERE seq <= ?", (seq,))

    def pending(self) -> tuple[int, dict[tuple[str, int], int]]:
        """How many records wait, and their micro-joules per (tenant, hour_s)."""
        conn = self._db()
        count = conn.execute("SELECT COUNT(*) FROM journal").fetchone()[0]
        per = {(t, h): uj for t, h, uj in conn.execute(
            "SELECT tenant, hour_s, SUM(joules_uj) FROM journal GROUP BY tenant, hour_s")}
        return count, per

    def get(self, request_id: str, tenant: str | None = None) -> LedgerRecord | None:
        """The latest journaled record with this client-visible id (of `tenant`, if given)."""
        rows = self._db().execute("SELECT rec FROM journal WHERE request_id = ?", (request_id,))
        found = (LedgerRecord.from_row(orjson.loads(rec)) for rec, in rows)
        return latest(r for r in found if tenant is None or r.tenant == tenant)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class SpillJournal:
    """A ledger's journal and what it holds now: `count` records, `pending` µJ per
    (tenant, hour_s) (budgets count them), waiting since `since` (monotonic s) or None."""

    def __init__(self, path: str, run_io: RunIo) -> None:
        self.path = path
        self._run_io = run_io
        self._file: Journal | None = None  # opened when a spill needs it or one was left behind
        self.count = 0
        self.pending: dict[tuple[str, int], int] = {}
        self.since: float | None = None

    async def open_existing(self) -> None:
        """Pick up a journal an earlier run left; the next successful flush replays it."""
        journal = Journal(self.path)
        if await self._run_io(journal.exists):
            self._file = journal
            await self.refresh()
            if self.count:
                log.warning("ledger journal %s holds %d records; replaying them", self.path, self.count)

    async def append(self, records: Sequence[LedgerRecord], since: float | None) -> None:
        """Spill `records`, buffered since `since` (monotonic s); raises if the file cannot be
        written. On return `count` and `pending` include them already: the caller stops
        counting them as its own before its next await, so budgets never see them twice or
        not at all. `refresh()` later re-reads the file's own figures."""
        if self._file is None:
            self._file = Journal(self.path)
        await self._run_io(self._file.append, records)
        pending = self.pending = dict(self.pending)  # a copy: a reader may be iterating it
        for rec in records:
            key = (rec.tenant, rec.hour_s)
            pending[key] = pending.get(key, 0) + joules_to_uj(rec.joules)
        self.count += len(records)
        if self.since is None:
            self.since = since if since is not None else time.monotonic()

    async def replay(self, chunk_size: int,
                     write_chunk: Callable[[Sequence[LedgerRecord]], Awaitable[int]],
                     on_written: Callable[[Sequence[LedgerRecord]], None]) -> int:
        """Write the journal into the store, chunk by chunk; returns how many were new.
        Deleting a chunk after it is written means a crash in between replays it again, which
        idempotency absorbs."""
        assert self._file is not None
        written = 0
        try:
            while True:
                seq, records = await self._run_io(self._file.read, chunk_size)
                if not records:
                    break
                written += await write_chunk(records)
                on_written(records)
                await self._run_io(self._file.delete_through, seq)
        finally:
            await self.refresh()
        if not self.count:
            self.since = None
            log.info("ledger journal %s replayed", self.path)
        return written

    async def get(self, request_id: str, tenant: str | None) -> LedgerRecord | None:
        """The latest journaled record with this client-visible id (of `tenant`, if given)."""
        if not self.count or self._file is None:
            return None
        found: LedgerRecord | None = await self._run_io(self._file.get, request_id, tenant)
        return found

    async def close(self) -> None:
        if self._file is not None:
            await self._run_io(self._file.close)

    async def refresh(self) -> None:
        """Re-read the count and µJ per (tenant, hour_s) from the file."""
        assert self._file is not None
        self.count, self.pending = await self._run_io(self._file.pending)
        if self.count and self.since is None:
            self.since = time.monotonic()
