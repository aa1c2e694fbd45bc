"""Managed API keys: made, listed and revoked through the admin API, kept (as SHA-256 only) in
the ledger's store, and mirrored into every replica's memory (table.py) so that authenticating
stays a dict lookup."""

from __future__ import annotations

from proxy.keystore.base import KeyStore, ManagedKey, MemoryKeyStore
from proxy.stores import StoreURL

__all__ = ["KeyStore", "ManagedKey", "open_keystore"]


def open_keystore(store: StoreURL) -> KeyStore:
    """The key store beside the ledger of `store` (not started yet)."""
    if store.kind == "sqlite":
        from proxy.keystore.sqlite import SqliteKeyStore

        return SqliteKeyStore(store.url, store.options.get("busy_timeout_s", 5.0))
    if store.kind == "redis":
        from proxy.keystore.redis import RedisKeyStore

        return RedisKeyStore(store)
    if store.kind == "postgresql":
        from proxy.keystore.postgres import PostgresKeyStore

        return PostgresKeyStore(store)
    return MemoryKeyStore()
