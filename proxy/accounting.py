"""From finished requests to ledger rows: each answered request billed once, budgets enforced.

A request whose energy was only `estimated` when it answered waits here (bounded, in memory)
for its `measured` final; if none comes in time (a silent power source) or the proxy stops, it
is booked with the estimate. Either way the ledger sees it exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from datetime import UTC, datetime

from proxy.config import Config, EnergyBudget
from proxy.energy.attribution import Final
from proxy.errors import ProxyError
from proxy.ledger import Ledger, LedgerRecord
from proxy.metrics import Metrics
from proxy.records import RequestRecord

log = logging.getLogger("joulegate.accounting")

_RECENT_LIMIT = 10_000
#: How long an estimated request waits for its measured value before it is booked as is.
FINAL_TIMEOUT_S = 120.0


def period_start_s(per: str, now_s: float) -> float:
    """Start of the current budget period (UTC): hour, day or month."""
    now = datetime.fromtimestamp(now_s, tz=UTC)
    if per == "hour":
        start = now.replace(minute=0, second=0, microsecond=0)
    elif per == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    else:
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start.timestamp()


class Accounting:
    """The recent-request cache, the wait for measured values, the ledger and budgets."""

    def __init__(self, config: Config, ledger: Ledger, metrics: Metrics,
                 final_timeout_s: float = FINAL_TIMEOUT_S) -> None:
        self.ledger = ledger
        self.metrics = metrics
        self.final_timeout_s = final_timeout_s
        self.budgets: dict[str, EnergyBudget] = {
            t.name: t.energy_budget for t in config.tenants if t.energy_budget is not None
        }
        # Recently finished requests by their unique key (bounded), and the keys under each
        # client-visible id, oldest first; older ones are read from the ledger. Everything here
        # is keyed by `RequestRecord.key`: a client's x-request-id may repeat, across tenants too.
        self.recent: OrderedDict[str, RequestRecord] = OrderedDict()
        self._recent_keys: dict[str, list[str]] = {}  # client id -> keys, oldest first
        # Answered, estimated, not yet booked (by key): the measured value is still to come.
        self._awaiting: OrderedDict[str, RequestRecord] = OrderedDict()
        self._awaiting_j_by_tenant: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.ledger.start()
        self._task = asyncio.create_task(self._sweep_loop(), name="joulegate-accounting")

    async def close(self) -> None:
        """Book everything still waiting (with its estimate), then flush the ledger."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._awaiting:
            _, record = self._awaiting.popitem(last=False)
            self._book(record)
        self._awaiting_j_by_tenant.clear()
        await self.ledger.close()

    # -- hot path ---------------------------------------------------------------------------------

    def finished(self, record: RequestRecord) -> None:
        """One request is answered: cache it, and book it now or once it is measured."""
        if record.key in self.recent:  # the relay books once by construction; never bill twice
            log.error("request %s finished twice; booked once", record.request_id)
            return
        self.metrics.observe(record)
        self._remember(record)
        if record.backend is None:
            return  # never reached a GPU: nothing to bill
        if record.energy_method == "estimated" and record.joules is not None:
            self._awaiting[record.key] = record
            self._awaiting_j_by_tenant[record.tenant] = (
                self._awaiting_j_by_tenant.get(record.tenant, 0.0) + record.joules)
        else:
            self._book(record)

    def measured(self, backend: str, final: Final) -> None:
        """A request's final attribution arrived: book it with its joules and method.
        The meter knows requests by `RequestRecord.key`, so `final.request_id` is that key."""
        record = self._awaiting.get(final.request_id)
        if record is None or record.backend != backend:
            return  # an abandoned attempt on another backend, or already booked
        del self._awaiting[final.request_id]
        self._release(record)
        record.joules = final.joules
        record.energy_method = final.method
        self._book(record)

    async def remaining_budget_j(self, tenant: str) -> float | None:
        """Joules left in the tenant's current budget period; 429 when none are left."""
        budget = self.budgets.get(tenant)
        if budget is None:
            return None
        spent_j = await self.ledger.tenant_joules(tenant, period_start_s(budget.per, time.time()))
        spent_j += self._awaiting_j_by_tenant.get(tenant, 0.0)
        remaining_j = budget.joules - spent_j
        if remaining_j <= 0:
            raise ProxyError(
                429, f"Tenant '{tenant}' has used its energy budget of {budget.joules:g} J per {budget.per}.",
                code="insufficient_quota", type="insufficient_quota",
                headers=[(b"x-energy-budget-remaining-joules", b"0.0")],
            )
        return remaining_j

    async def lookup(self, request_id: str, tenant: str | None = None) -> RequestRecord | LedgerRecord | None:
        """The latest request with this client-visible id (of `tenant`, if given; None: any
        tenant's): from memory while recent, else from the ledger.

        Another tenant's request under the same id is skipped, never returned: an id that only
        another tenant used takes the same path as an unknown one, ledger read included.
        """
        for key in reversed(self._recent_keys.get(request_id, ())):
            record = self.recent[key]
            if tenant is None or record.tenant == tenant:
                return record
        return await self.ledger.get_request(request_id, tenant=tenant)

    # -- internals --------------------------------------------------------------------------------

    def _remember(self, record: RequestRecord) -> None:
        self.recent[record.key] = record
        self._recent_keys.setdefault(record.request_id, []).append(record.key)
        if len(self.recent) > _RECENT_LIMIT:
            _, old = self.recent.popitem(last=False)
            keys = self._recent_keys[old.request_id]
            del keys[0]  # the oldest of its id, as `recent` evicts oldest first (ids repeat rarely)
            if not keys:
                del self._recent_keys[old.request_id]

    def _release(self, record: RequestRecord) -> None:
        left = self._awaiting_j_by_tenant.get(record.tenant, 0.0) - (record.joules or 0.0)
        self._awaiting_j_by_tenant[record.tenant] = max(left, 0.0)

    def _book(self, record: RequestRecord) -> None:
        self.ledger.record(LedgerRecord(
            request_id=record.request_id, key=record.key, tenant=record.tenant, model=record.model,
            backend=record.backend or "", prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens, joules=record.joules or 0.0,
            method=record.energy_method or "none", start_s=record.start_s,
            end_s=record.end_s or record.start_s, status=record.status,
        ))
        self.metrics.observe_energy(record)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            cutoff_s = time.time() - self.final_timeout_s
            while self._awaiting:
                key, record = next(iter(self._awaiting.items()))
                if (record.end_s or 0.0) > cutoff_s:
                    break
                del self._awaiting[key]
                self._release(record)
                log.warning("request %s: no measured energy after %.0f s; booked as estimated",
                            record.request_id, self.final_timeout_s)
                self._book(record)
            stats = self.ledger.stats
            self.metrics.ledger_buffered.set(stats.buffered + stats.journaled)
            self.metrics.ledger_flush_lag_s.set(stats.flush_lag_s or 0.0)
            self.metrics.awaiting_final.set(len(self._awaiting))
