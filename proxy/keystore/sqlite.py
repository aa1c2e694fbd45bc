"""Managed keys in the ledger's SQLite file (tables `api_keys` and `api_keys_version`), on a
connection and thread of their own, so a key lookup never waits behind a ledger flush."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from proxy.keystore.base import KeyStore, ManagedKey
from proxy.ledger.journal import connect

_T = TypeVar("_T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys_version (one INTEGER PRIMARY KEY CHECK (one = 1), version INTEGER NOT NULL);
"""
BUMP = ("INSERT INTO api_keys_version (one, version) VALUES (1, 1)"
        " ON CONFLICT (one) DO UPDATE SET version = version + 1")


class SqliteKeyStore(KeyStore):
    def __init__(self, path: str, busy_timeout_s: float = 5.0) -> None:
        self.path = path
        self._busy_timeout_s = busy_timeout_s
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="joulegate-keys")
        self._conn: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._io, lambda: fn(self._db()))

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = connect(self.path, busy_timeout_s=self._busy_timeout_s)
            conn.executescript(SCHEMA)
            self._conn = conn
        return self._conn

    async def start(self) -> None:
        await self._run(lambda conn: None)

    async def close(self) -> None:
        def close(conn: sqlite3.Connection) -> None:
            conn.close()
            self._conn = None

        if self._conn is not None:
            await self._run(close)
        self._io.shutdown(wait=True)

    async def put(self, key: ManagedKey) -> None:
        def put(conn: sqlite3.Connection) -> None:
            with conn:  # one transaction: the key and the version move together
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("INSERT OR REPLACE INTO api_keys (id, body) VALUES (?, ?)",
                             (key.id, key.to_json().decode()))
                conn.execute(BUMP)

        await self._run(put)

    async def get(self, key_id: str) -> ManagedKey | None:
        row = await self._run(lambda conn: conn.execute(
            "SELECT body FROM api_keys WHERE id = ?", (key_id,)).fetchone())
        return None if row is None else ManagedKey.from_json(row[0])

    async def all(self) -> list[ManagedKey]:
        rows = await self._run(lambda conn: conn.execute("SELECT body FROM api_keys").fetchall())
        return [ManagedKey.from_json(row[0]) for row in rows]

    async def version(self) -> int:
        row = await self._run(lambda conn: conn.execute(
            "SELECT version FROM api_keys_version WHERE one = 1").fetchone())
        return 0 if row is None else int(row[0])
