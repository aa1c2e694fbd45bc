"""The ledger's store, opened again for the state that lives beside the ledger: managed API keys
(proxy/keystore/) and rate-limit counters (proxy/ratelimit/).

Each of them opens its own client from the ledger's URL (a Redis client, a small PostgreSQL pool,
a SQLite connection), so neither waits behind the ledger's flushes; they share its options
(`key_prefix`, `connect_timeout_s`, `sslmode`...) and so its place in the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from proxy.config import ledger_options

StoreKind = Literal["memory", "sqlite", "redis", "postgresql"]


@dataclass(frozen=True, slots=True)
class StoreURL:
    """A ledger URL taken apart: which store, where (URL without its query, or a SQLite path),
    and the options its query set."""

    kind: StoreKind
    url: str
    options: dict[str, Any]

    @property
    def shared(self) -> bool:
        """Whether other processes (replicas, workers) see the same state through it."""
        return self.kind in ("redis", "postgresql")


def parse_store(ledger_url: str) -> StoreURL:
    """The store of `ledger_url` (as the config accepts it); ValueError for an unknown one."""
    url, options = ledger_options(ledger_url)
    if url.startswith("memory:"):
        return StoreURL("memory", url, options)
    if url.startswith("sqlite://"):
        return StoreURL("sqlite", url[len("sqlite://"):], options)
    if url.startswith(("redis://", "rediss://")):
        return StoreURL("redis", url, options)
    if url.startswith(("postgresql://", "postgres://")):
        return StoreURL("postgresql", url, options)
    raise ValueError(f"unsupported store URL {url.split(':', 1)[0]!r}")


def redis_client(store: StoreURL) -> Any:
    """A redis.asyncio client for `store`, with the ledger's socket time-out (see redis_from_url)."""
    return redis_from_url(store.url, store.options.get("socket_timeout_s", 2.0))


def redis_from_url(url: str, timeout_s: float) -> Any:
    """A redis.asyncio client with `timeout_s` for connecting and each reply, and one quick
    retry: it covers a pooled connection that died with a Redis restart; longer outages are the
    caller's business (the ledger buffers and journals), not the client's backoff."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                          retry=Retry(NoBackoff(), 1))


def redis_prefix(store: StoreURL) -> str:
    """The ledger's key prefix in Redis: what lives beside the ledger lives under it too."""
    return str(store.options.get("key_prefix", "joulegate:"))


def postgres_pool(store: StoreURL, name: str, max_size: int = 2) -> Any:
    """An unopened psycopg_pool.AsyncConnectionPool for `store` (autocommit connections)."""
    from psycopg_pool import AsyncConnectionPool

    kwargs: dict[str, Any] = {"autocommit": True,
                              "connect_timeout": max(1, round(store.options.get("connect_timeout_s", 5.0)))}
    if store.options.get("sslmode") is not None:
        kwargs["sslmode"] = store.options["sslmode"]
    return AsyncConnectionPool(store.url, min_size=1, max_size=max_size, kwargs=kwargs,
                               timeout=store.options.get("connect_timeout_s", 5.0), open=False, name=name)


async def postgres_schema(pool: Any, lock_id: int, schema: str) -> None:
    """Run `schema` (CREATE ... IF NOT EXISTS statements) under a transaction-level advisory
    lock: processes starting together would otherwise race on the catalog."""
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s::bigint)", (lock_id,))
        await conn.execute(schema)
