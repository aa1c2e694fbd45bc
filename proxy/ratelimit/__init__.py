"""Per-key and per-tenant rate limits: requests and tokens per minute (window.py: the rule and
the headers; stores.py, postgres.py: the counters; limiter.py: what the relay calls)."""

from __future__ import annotations

from proxy.ratelimit.stores import MemoryRateStore, RateStore
from proxy.ratelimit.window import RateScope
from proxy.stores import StoreURL

__all__ = ["RateScope", "RateStore", "open_rate_store"]


def open_rate_store(store: StoreURL) -> RateStore:
    """The counters' store beside the ledger's: Redis and PostgreSQL share them across replicas;
    memory and SQLite ledgers count in this process."""
    if store.kind == "redis":
        from proxy.ratelimit.stores import RedisRateStore

        return RedisRateStore(store)
    if store.kind == "postgresql":
        from proxy.ratelimit.postgres import PostgresRateStore

        return PostgresRateStore(store)
    return MemoryRateStore()
