"""Managed keys in the ledger's PostgreSQL database (tables `api_keys`, `api_keys_version`),
through a small pool of their own; a put is one transaction, so key and version move together."""

from __future__ import annotations

from typing import Any

from proxy.keystore.base import KeyStore, ManagedKey
from proxy.stores import StoreURL, postgres_pool, postgres_schema

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys_version (one INTEGER PRIMARY KEY CHECK (one = 1), version BIGINT NOT NULL);
"""
#: Serialises the schema's set-up across processes (the ledger's is 0x4A47_0001).
SCHEMA_LOCK = 0x4A47_0002


class PostgresKeyStore(KeyStore):
    def __init__(self, store: StoreURL) -> None:
        self._pool: Any = postgres_pool(store, "joulegate-keys")
        self._schema_ready = False

    async def start(self) -> None:
        await self._pool.open(wait=False)
        await self._schema()

    async def _schema(self) -> None:
        if not self._schema_ready:  # a store down at start: created on first use instead
            await postgres_schema(self._pool, SCHEMA_LOCK, SCHEMA)
            self._schema_ready = True

    async def close(self) -> None:
        await self._pool.close()

    async def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        await self._schema()
        async with self._pool.connection() as conn:
            return list(await (await conn.execute(sql, args)).fetchall())

    async def put(self, key: ManagedKey) -> None:
        await self._schema()
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute("INSERT INTO api_keys (id, body) VALUES (%s, %s)"
                               " ON CONFLICT (id) DO UPDATE SET body = excluded.body",
                               (key.id, key.to_json().decode()))
            await conn.execute("INSERT INTO api_keys_version (one, version) VALUES (1, 1) ON CONFLICT (one)"
                               " DO UPDATE SET version = api_keys_version.version + 1")

    async def get(self, key_id: str) -> ManagedKey | None:
        rows = await self._rows("SELECT body FROM api_keys WHERE id = %s", (key_id,))
        return ManagedKey.from_json(rows[0][0]) if rows else None

    async def all(self) -> list[ManagedKey]:
        return [ManagedKey.from_json(row[0]) for row in await self._rows("SELECT body FROM api_keys")]

    async def version(self) -> int:
        rows = await self._rows("SELECT version FROM api_keys_version WHERE one = 1")
        return int(rows[0][0]) if rows else 0
