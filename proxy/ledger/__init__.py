"""The energy ledger: every finished request billed once, by tenant x model x backend x hour.

    ledger = open_ledger("sqlite:///var/lib/joulegate/ledger.db")
    await ledger.start()
    ledger.record(LedgerRecord(...))          # hot path: in memory, O(1)
    rows = await ledger.usage(tenant="acme", since_s=..., until_s=None, group_by=("model",))
    await ledger.close()                      # final flush

Stores: `memory://`, `sqlite:///abs/path.db` (`sqlite://rel/path.db` is relative to the
`base_dir` option, else the working directory), `redis://host:port/db` and `rediss://...`.
Options (all stores): flush_interval_s=1.0, max_buffer=100_000, retention_s=30 days,
chunk_size=1000, prune_interval_s=60.0, store_cache_s=0.5, journal_path; SQLite adds
busy_timeout_s and synchronous; Redis adds key_prefix and socket_timeout_s. The config's
`ledger:` URL sets the operators' ones in its query (`ledger_options` lists them), e.g.
`sqlite:///var/lib/joulegate/ledger.db?retention_days=90` or
`redis://redis:6379/0?key_prefix=jg:&flush_interval_s=0.5`.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qsl

from proxy.ledger.base import Ledger, LedgerRecord, LedgerStats
from proxy.ledger.usage import GROUP_KEYS, UsageRow, hour_floor_s, hour_iso
from proxy.redact import redact_url

__all__ = [
    "GROUP_KEYS", "Ledger", "LedgerRecord", "LedgerStats", "UsageRow", "hour_floor_s", "hour_iso",
    "ledger_options", "open_ledger", "redacted_url",
]

#: Options a ledger URL's query may set: name -> (the store option it sets, its parser, stores).
_URL_OPTIONS: dict[str, tuple[str, Any, tuple[str, ...]]] = {
    "retention_days": ("retention_s", lambda v: _positive(v) * 86_400.0, ("memory", "sqlite", "redis")),
    "flush_interval_s": ("flush_interval_s", lambda v: _positive(v), ("memory", "sqlite", "redis")),
    "max_buffer": ("max_buffer", lambda v: int(_positive(v)), ("memory", "sqlite", "redis")),
    "journal_path": ("journal_path", str, ("sqlite", "redis")),
    "busy_timeout_s": ("busy_timeout_s", lambda v: _positive(v), ("sqlite",)),
    "synchronous": ("synchronous", str, ("sqlite",)),
    "key_prefix": ("key_prefix", str, ("redis",)),
    "socket_timeout_s": ("socket_timeout_s", lambda v: _positive(v), ("redis",)),
}


def _positive(value: str) -> float:
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise ValueError("must be a positive number")
    return number


def _store(url: str) -> str:
    return "memory" if url.startswith("memory:") else "sqlite" if url.startswith("sqlite:") else "redis"


def ledger_options(url: str) -> tuple[str, dict[str, Any]]:
    """The URL without its query, and the store options its query sets. ValueError naming the
    option for one unknown, misplaced (e.g. key_prefix on SQLite) or out of range."""
    base, sep, query = url.partition("?")
    if not sep:
        return url, {}
    store, opts = _store(url), {}
    for name, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if name not in _URL_OPTIONS:
            raise ValueError(f"unknown ledger option {name!r}; known: {', '.join(_URL_OPTIONS)}")
        option, parse, stores = _URL_OPTIONS[name]
        if store not in stores:
            raise ValueError(f"ledger option {name!r} does not apply to a {store} ledger")
        try:
            opts[option] = parse(value)
        except ValueError as exc:
            raise ValueError(f"ledger option {name}={value!r}: {exc}") from None
    if str(opts.get("synchronous", "NORMAL")).upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ValueError("ledger option synchronous must be OFF, NORMAL, FULL or EXTRA")
    return base, opts


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
    raise ValueError(f"unsupported ledger URL {url.split(':', 1)[0]!r}: expected memory://, "
                     "sqlite:///PATH or redis://HOST:PORT/DB")
