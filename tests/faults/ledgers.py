"""The ledger as the fault scenarios read it: through the API, or straight from its store.

Both readers give every booked request by its client-visible id, so a scenario compares ids,
not just counts: one booked that was never answered, or one answered and never booked, shows up.
Rows are stored per record (`LedgerRecord.uid`); a client id found on two rows (booked twice)
fails the read outright, since the scenarios never reuse an id.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis

from proxy.ledger import LedgerRecord
from proxy.ledger.base import split_uid
from tests.conftest import ADMIN_KEY, ProxyProc


def flush_ledger(proxy: ProxyProc) -> dict[str, Any]:
    """Ask the ledger for all tenants' usage (admin key); reading usage flushes it first."""
    resp = httpx.get(proxy.url + "/v1/energy/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()["total"]


@dataclass(frozen=True)
class Booked:
    """One ledger row: where the request ran, its tokens, its joules and how they were known,
    and the status it ended with (499: the client left; 502/504: the backend failed or was late)."""

    backend: str
    completion_tokens: int
    joules: float
    method: str
    status: int = 200
    prompt_tokens: int = 0


def sqlite_ledger(path: Path) -> dict[str, Booked]:
    """Every request row of a SQLite ledger by request id, read-only (WAL: the writer may run)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = [(split_uid(uid)[0], Booked(b, c, j, m, s, p)) for uid, b, c, j, m, s, p in conn.execute(
            "SELECT request_id, backend, completion_tokens, joules, method, status, prompt_tokens FROM requests")]
    finally:
        conn.close()
    return _unique(rows)


def redis_ledger(url: str) -> dict[str, Booked]:
    """Every per-request record of a Redis ledger (default `joulegate:` prefix) by request id."""
    client = redis.Redis.from_url(url)
    try:
        rows = [LedgerRecord.from_row(orjson.loads(client.get(key)))
                for key in client.scan_iter(match="joulegate:req:*", count=1000)]
    finally:
        client.close()
    return _unique([(r.request_id, Booked(r.backend, r.completion_tokens, r.joules, r.method, r.status,
                                          r.prompt_tokens)) for r in rows])


def _unique(rows: list[tuple[str, Booked]]) -> dict[str, Booked]:
    """The rows by request id; an id on two rows was booked twice."""
    booked = dict(rows)
    assert len(booked) == len(rows), f"{len(rows) - len(booked)} requests booked twice"
    return booked
