"""The energy ledger: every finished request billed once, by tenant x model x backend x hour.

    ledger = open_ledger("sqlite:///var/lib/joulegate/ledger.db")
    await ledger.start()
    ledger.record(LedgerRecord(...))          # hot path: in memory, O(1)
    rows = await ledger.usage(tenant="acme", since_s=..., until_s=None, group_by=("model",))
    await ledger.close()                      # final flush

Stores: `memory://`, `sqlite:///abs/path.db` (`sqlite://rel/path.db` is relative to the
`base_dir` option, else the working directory), `redis://host:port/db`, `rediss://...` and
`postgresql://user:pass@host:5432/db` (or `postgres://`).
Options (all stores): flush_interval_s=1.0, max_buffer=100_000, retention_s=30 days,
chunk_size=200, prune_interval_s=60.0, store_cache_s=0.5, journal_path; SQLite adds
busy_timeout_s and synchronous; Redis adds key_prefix and socket_timeout_s;
PostgreSQL adds connect_timeout_s, pool_size and sslmode. The config's
`ledger:` URL sets the operators' ones in its query (`ledger_options` lists them), e.g.
`sqlite:///var/lib/joulegate/ledger.db?retention_days=90` or
`redis://redis:6379/0?key_prefix=jg:&flush_interval_s=0.5`.
"""

from __future__ import annotations

import os
from typing import Any

from proxy.config import ledger_options
from proxy.ledger.base import Ledger
from proxy.ledger.record import LedgerRecord, LedgerStats
from proxy.ledger.usage import GROUP_KEYS, UsageRow, hour_floor_s, hour_iso
from proxy.redact import redact_url

__all__ = [
    "GROUP_KEYS", "Ledger", "LedgerRecord", "LedgerStats", "UsageRow", "hour_floor_s", "hour_iso",
    "ledger_options", "open_ledger", "redacted_url",
]

def redacted_url(url: str) -> str:
    """`url` fit to print: no userinfo (redis://:PASSWORD@host), no query values."""
    return redact_url(url)


def open_ledger(url: str, *, base_dir: str | None = None, **opts: Any) -> Ledger:
    """A ledger for `url` (not started yet: await `start()`); options in the URL's query win
    over `opts`. ValueError for an unknown scheme or option."""
    url, url_opts = ledger_options(url)
    opts = {**opts, **url_opts}
    if url == "memory://" or url.startswith("memory:"):
        from proxy.ledger.memory import MemoryLedger

        return MemoryLedger(**opts)
    if url.startswith("sqlite://"):
        from proxy.ledger.sqlite import SqliteLedger

        path = url[len("sqlite://"):]
        if not path:
            raise ValueError("sqlite ledger URL needs a path: sqlite:///path/to/ledger.db")
        if not os.path.isabs(path) and base_dir is not None:
            path = os.path.join(base_dir, path)
        return SqliteLedger(path, **opts)
    if url.startswith(("redis://", "rediss://")):
        from proxy.ledger.redis import RedisLedger

        return RedisLedger(url, **opts)
    if url.startswith(("postgresql://", "postgres://")):
        from proxy.ledger.postgres import PostgresLedger

        return PostgresLedger(url, **opts)
    raise ValueError(f"unsupported ledger URL {url.split(':', 1)[0]!r}: expected memory://, "
                     "sqlite:///PATH, redis://HOST:PORT/DB or postgresql://HOST/DB")
