"""`memory://`: the ledger kept in process, with the same batching and semantics as the durable
stores (used by tests, the bench, and `joulegate demo`). Nothing survives the process."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from proxy.ledger.base import BufferedLedger
from proxy.ledger.record import LedgerRecord, latest
from proxy.ledger.usage import Bucket, BudgetUnit, grams_to_ug, joules_to_uj


class MemoryLedger(BufferedLedger):
    """Per-request records by uid (idempotency: a known uid is skipped) and integer aggregates."""

    def __init__(self, **opts: Any) -> None:
        super().__init__(**opts)
        # uid -> (record, wall-clock second it was written): retention counts from the write
        self._requests: dict[str, tuple[LedgerRecord, float]] = {}
        self._uids: dict[str, list[str]] = {}  # client-visible request id -> uids, oldest first
        # (tenant, model, backend, hour_s) -> [requests, prompt_tokens, completion_tokens, uj,
        # reasoning_tokens, all-in µJ, µg CO2e]
        self._cells: dict[tuple[str, str, str, int], list[int]] = {}
        # What budgets sum, by unit: (tenant or key subject, hour_s) -> µJ, or µg CO2e.
        self._tenant_hour: dict[BudgetUnit, dict[tuple[str, int], int]] = {"joules": {}, "gco2e": {}}
        self._tenant_hour_uj = self._tenant_hour["joules"]
        # Budget holds: tenant -> key -> (µJ or µg, monotonic expiry, unit); no await between
        # read and write.
        self._holds_uj: dict[str, dict[str, tuple[int, float, BudgetUnit]]] = {}

    async def _write_chunk(self, records: Sequence[LedgerRecord]) -> int:
        new = 0
        now = time.time()
        for tenant, key in self._holds(records):
            self._holds_uj.get(tenant, {}).pop(key, None)
        for rec in records:
            if rec.uid in self._requests:
                continue
            self._requests[rec.uid] = (rec, now)
            self._uids.setdefault(rec.request_id, []).append(rec.uid)
            new += 1
            hour = rec.hour_s
            uj = joules_to_uj(rec.joules)
            cell = self._cells.setdefault((rec.tenant, rec.model, rec.backend, hour), [0] * 7)
            cell[0] += 1
            cell[1] += rec.prompt_tokens
            cell[2] += rec.completion_tokens
            cell[3] += uj
            cell[4] += rec.reasoning_tokens
            cell[5] += joules_to_uj(rec.joules_all_in)
            cell[6] += grams_to_ug(rec.gco2e)
            ug = grams_to_ug(rec.gco2e)
            spent_uj, spent_ug = self._tenant_hour_uj, self._tenant_hour["gco2e"]
            for subject in (rec.tenant, rec.key_subject) if rec.key_subject else (rec.tenant,):
                spent_uj[subject, hour] = spent_uj.get((subject, hour), 0) + uj
                spent_ug[subject, hour] = spent_ug.get((subject, hour), 0) + ug
        return new

    async def _buckets(self, tenant: str | None, since_hour_s: int | None,
                       until_s: float | None) -> list[Bucket]:
        return [
            Bucket(t, m, b, h, *cell) for (t, m, b, h), cell in self._cells.items()
            if (tenant is None or t == tenant) and (since_hour_s is None or h >= since_hour_s)
            and (until_s is None or h < until_s)
        ]

    async def _stored_request(self, request_id: str, tenant: str | None) -> LedgerRecord | None:
        found = (self._requests[uid][0] for uid in self._uids.get(request_id, ()))
        return latest(r for r in found if tenant is None or r.tenant == tenant)

    async def _stored_tenant_uj(self, tenant: str, since_hour_s: int) -> int:
        return sum(uj for (t, h), uj in self._tenant_hour_uj.items()
                   if t == tenant and h >= since_hour_s)

    async def _reserve_store(self, tenant: str, key: str, uj: int, since_hour_s: int,
                             budget_uj: int, ttl_s: float, unit: BudgetUnit) -> tuple[bool, int]:
        now = time.monotonic()
        holds = self._holds_uj.setdefault(tenant, {})
        for old in [k for k, (_, expires, _) in holds.items() if expires <= now]:
            del holds[old]
        used = sum(held for held, _, held_unit in holds.values() if held_unit == unit) + sum(
            spent for (t, h), spent in self._tenant_hour[unit].items() if t == tenant and h >= since_hour_s)
        if used >= budget_uj:
            return False, used
        holds[key] = (uj, now + ttl_s, unit)
        return True, used

    async def _release_store(self, tenant: str, key: str) -> None:
        self._holds_uj.get(tenant, {}).pop(key, None)

    async def _extend_store(self, holds: Sequence[tuple[str, str]], ttl_s: float) -> None:
        now = time.monotonic()
        for tenant, key in holds:
            held = self._holds_uj.get(tenant, {}).get(key)
            if held is not None and held[1] > now:
                self._holds_uj[tenant][key] = (held[0], now + ttl_s, held[2])

    async def _prune(self, cutoff_s: float) -> int:
        old = [rid for rid, (_, written_s) in self._requests.items() if written_s < cutoff_s]
        for uid in old:
            rec, _ = self._requests.pop(uid)
            uids = self._uids[rec.request_id]
            uids.remove(uid)
            if not uids:
                del self._uids[rec.request_id]
        return len(old)
