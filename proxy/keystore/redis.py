"""Managed keys in Redis, under the ledger's `key_prefix`: `apikeys` (a hash: id -> the key's
JSON) and `apikeys:version` (a counter); a put is one MULTI, so both move together."""

from __future__ import annotations

from typing import Any

from proxy.keystore.base import KeyStore, ManagedKey
from proxy.stores import StoreURL, redis_client, redis_prefix


class RedisKeyStore(KeyStore):
    def __init__(self, store: StoreURL) -> None:
        self._store = store
        prefix = redis_prefix(store).encode()
        self._hash, self._version = prefix + b"apikeys", prefix + b"apikeys:version"
        self._redis: Any = None

    def _client(self) -> Any:
        if self._redis is None:
            self._redis = redis_client(self._store)
        return self._redis

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    async def put(self, key: ManagedKey) -> None:
        pipe = self._client().pipeline(transaction=True)
        pipe.hset(self._hash, key.id, key.to_json())
        pipe.incr(self._version)
        await pipe.execute()

    async def get(self, key_id: str) -> ManagedKey | None:
        raw = await self._client().hget(self._hash, key_id)
        return None if raw is None else ManagedKey.from_json(raw)

    async def all(self) -> list[ManagedKey]:
        return [ManagedKey.from_json(raw) for raw in (await self._client().hvals(self._hash))]

    async def version(self) -> int:
        raw = await self._client().get(self._version)
        return 0 if raw is None else int(raw)
