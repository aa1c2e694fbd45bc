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
from typing import Any

import orjson

from proxy.auth import KeyBudget
from proxy.carbon import CarbonBook
from proxy.config import Config, EnergyBudget
from proxy.energy.attribution import Final
from proxy.errors import ProxyError
from proxy.ledger import Ledger, LedgerRecord
from proxy.ledger.record import subject_hold
from proxy.ledger.usage import UG_PER_G, UJ_PER_J, BudgetUnit, grams_to_ug, joules_to_uj
from proxy.metrics import Metrics
from proxy.records import RequestRecord
from proxy.telemetry import Telemetry

log = logging.getLogger("joulegate.accounting")
access_log = logging.getLogger("joulegate.access")

_RECENT_LIMIT = 10_000
#: How long an estimated request waits for its measured value before it is booked as is.
FINAL_TIMEOUT_S = 120.0
#: Weight of the newest request in the means a hold is sized from (joules per weighted token,
#: completion tokens per request).
_MEAN_WEIGHT = 0.2
#: Most a hold scales up a request larger than the tenant's recent ones (by the ratio of their
#: weighted tokens): joules per token learned from much smaller requests under-state a large
#: one's. On the simulated H100 a 1-token request cost 0.3-1.0 J, a 128-token one 0.65-2.5 J
#: per token (the less it shared the GPU, the more).
_EXTRAPOLATION_MAX = 8.0
#: Kinds of request whose cost the hold rates are learned from.
_GENERATING = frozenset(("chat", "completion", "response"))
#: Completion tokens a hold assumes for a request without max_tokens before any was booked.
_DEFAULT_COMPLETION_TOKENS = 256
#: Before any request was booked in this process, a hold is this share of the budget. A tenth
#: refused the 11th of a burst of cold first requests however cheap they were (a restarted
#: proxy under c=16 load answered 429 on an unused budget); a hundredth admits 100 at once and
#: bounds a cold burst's overshoot to 1% of the budget per replica.
_COLD_SHARE = 0.01
#: The response header that says what is left of a budget, by the budget's unit.
REMAINING_HEADER = {"joules": b"x-energy-budget-remaining-joules", "gco2e": b"x-energy-budget-remaining-gco2e"}


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


def access_line(record: RequestRecord) -> str:
    """One finished request as the access log's JSON line (times in ms; joules as known when
    it answered, `estimated` until measured). Only ids and counts: no headers, no key material."""
    end_s = record.end_s or record.start_s
    ttft_ms = None if record.first_token_s is None else round((record.first_token_s - record.start_s) * 1e3, 1)
    return orjson.dumps({
        "time": datetime.fromtimestamp(end_s, tz=UTC).isoformat(timespec="milliseconds"),
        "request_id": record.request_id, "tenant": record.tenant, "model": record.model,
        "backend": record.backend, "status": record.status, "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens, "joules": record.joules,
        "energy_method": record.energy_method, "ttft_ms": ttft_ms,
        "total_ms": round((end_s - record.start_s) * 1e3, 1),
    }).decode()


def _fold(means: dict[str | None, float], who: str | None, value: float) -> None:
    """One step of an exponentially weighted mean; the first value starts it."""
    mean = means.get(who)
    means[who] = value if mean is None else mean + _MEAN_WEIGHT * (value - mean)


class Accounting:
    """The recent-request cache, the wait for measured values, the ledger and budgets."""

    def __init__(self, config: Config, ledger: Ledger, metrics: Metrics,
                 final_timeout_s: float = FINAL_TIMEOUT_S, telemetry: Telemetry | None = None) -> None:
        self.ledger = ledger
        self.telemetry = telemetry  # a span per booked request; None: tracing off
        self.metrics = metrics
        self.access_log = config.server.access_log  # off: one attribute check per request
        self.final_timeout_s = final_timeout_s
        self.carbon = CarbonBook.from_config(config)  # all-in joules and grams per request
        self.budgets: dict[str, EnergyBudget] = {
            t.name: t.energy_budget for t in config.tenants if t.energy_budget is not None
        }
        # A hold the store has not answered in this long counts as a store failure.
        self.budget_timeout_s = config.energy_budget_timeout_ms / 1e3
        self.budget_failure: dict[str, str] = {
            t.name: t.energy_budget_failure or config.energy_budget_failure for t in config.tenants
        }
        # A hold outlives its request (request_timeout_s), the wait for its measured value and
        # a flush; a replica that crashed holding budget gives it back after that. A request
        # that runs longer (streams have no overall cap by default) has its hold extended by the
        # sweep (`_extend_holds`), so it never expires under a running request.
        self.hold_ttl_s = config.server.request_timeout_s + final_timeout_s + 60.0
        # Hold key -> (tenant or key subject, monotonic s its store expiry was last set): held,
        # not yet handed to the ledger. A request's tenant hold is keyed by its key, the hold on
        # its managed key's own budget by `subject_hold(key)`.
        self._holds: dict[str, tuple[str, float]] = {}
        self._holds_extended_s = 0.0  # monotonic s of the sweep's last look at them
        self.prefill_weight = config.energy.prefill_weight
        # Budgeted tenant -> recent mean joules per weighted token (the larger of prefill_weight x
        # prompt and completion tokens), and recent mean completion tokens per request; None keys: every tenant.
        self._j_per_token: dict[str | None, float] = {}
        self._completion_tokens: dict[str | None, float] = {}
        self._weighted_tokens: dict[str | None, float] = {}  # recent mean weighted tokens per request
        # Recent mean (GPU + host) / GPU joules: a gram hold counts the host's share too.
        self._host_factor: dict[str | None, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_store_warning_s = 0.0
        # Recently finished requests by their unique key (bounded), and the keys under each
        # client-visible id, oldest first; older ones are read from the ledger. Everything here
        # is keyed by `RequestRecord.key`: a client's x-request-id may repeat, across tenants too.
        self.recent: OrderedDict[str, RequestRecord] = OrderedDict()
        self._recent_keys: dict[str, list[str]] = {}  # client id -> keys, oldest first
        # Answered, estimated, not yet booked (by key): the measured value is still to come.
        self._awaiting: OrderedDict[str, RequestRecord] = OrderedDict()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.ledger.start()
        await self.carbon.start()
        self._task = asyncio.create_task(self._sweep_loop(), name="joulegate-accounting")

    async def close(self) -> None:
        """Book everything still waiting (with its estimate), then flush the ledger."""
        await self.carbon.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._awaiting:
            _, record = self._awaiting.popitem(last=False)
            self._book(record)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.ledger.close()

    # -- hot path ---------------------------------------------------------------------------------

    def finished(self, record: RequestRecord) -> None:
        """One request is answered: cache it, and book it now or once it is measured."""
        if record.key in self.recent:  # the relay books once by construction; never bill twice
            log.error("request %s finished twice; booked once", record.request_id)
            return
        self.metrics.observe(record)
        self._remember(record)
        if self.access_log:
            access_log.info(access_line(record))
        if record.backend is None:
            self.release_budget(record)
            return  # never reached a GPU: nothing to bill
        if record.energy_method == "estimated" and record.joules is not None:
            self._awaiting[record.key] = record
        else:
            self._book(record)

    def measured(self, backend: str, final: Final) -> None:
        """A request's final attribution arrived: book it with its joules and method.
        The meter knows requests by `RequestRecord.key`, so `final.request_id` is that key."""
        record = self._awaiting.get(final.request_id)
        if record is None or record.backend != backend:
            return  # an abandoned attempt on another backend, or already booked
        del self._awaiting[final.request_id]
        record.joules = final.joules
        record.energy_method = final.method
        self.carbon.fill(record, final.host_joules, final=True)
        self._book(record)

    async def reserve_budget(self, tenant: str, key: str, prompt_tokens: int = 0,
                             max_tokens: int | None = None,
                             key_budget: KeyBudget | None = None) -> dict[BudgetUnit, float] | None:
        """Hold this request's estimate (`estimate_j`, or `estimate_g` for a budget in grams
        CO2e: from its prompt tokens and its max_tokens) against its managed key's own budget
        (`key_budget`) and its tenant's, atomically in the ledger store, so concurrent requests
        cannot all pass the same check. Returns what was left before it per unit (J, gCO2e):
        the least of the budgets in that unit; None when no budget applies (or the store failed
        and the mode is open). 429 when either budget is spent (the other's hold is given back);
        503 when the store failed and the mode is closed."""
        budget = self.budgets.get(tenant)
        if budget is None and key_budget is None:
            return None  # no budget: no store round trip
        left: dict[BudgetUnit, float] = {}
        if key_budget is not None:  # the key's first: usually the tighter, refused without the tenant's
            await self._reserve_one(tenant, key_budget.subject, subject_hold(key), key_budget.budget,
                                    f"API key {key_budget.label}", prompt_tokens, max_tokens, left)
        if budget is not None:
            try:
                await self._reserve_one(tenant, tenant, key, budget, f"Tenant '{tenant}'", prompt_tokens,
                                        max_tokens, left)
            except ProxyError:
                if key_budget is not None:  # refused on the tenant's: the key's hold goes back
                    self._release(subject_hold(key))
                raise
        return left or None

    async def _reserve_one(self, tenant: str, subject: str, hold: str, budget: EnergyBudget, who: str,
                           prompt_tokens: int, max_tokens: int | None, left: dict[BudgetUnit, float]) -> None:
        """One budget's hold (`subject`: the tenant, or a key's subject; `hold`: its hold key);
        what was left goes into `left` (the least per unit)."""
        now_s = time.time()
        # The store counts integer µJ, or µg CO2e for a budget in grams.
        if budget.unit == "joules":
            per_unit, unit_name = UJ_PER_J, "J"
            estimate_stored = joules_to_uj(self.estimate_j(tenant, budget.amount, prompt_tokens, max_tokens))
            budget_stored = joules_to_uj(budget.amount)
        else:
            per_unit, unit_name = UG_PER_G, "gCO2e"
            estimate_stored = grams_to_ug(self.estimate_g(tenant, budget.amount, prompt_tokens, max_tokens))
            budget_stored = grams_to_ug(budget.amount)
        try:
            async with asyncio.timeout(self.budget_timeout_s):
                reserved, used = await self.ledger.reserve(
                    subject, hold, estimate_stored, period_start_s(budget.per, now_s), budget_stored,
                    self.hold_ttl_s, unit=budget.unit)
        except Exception as exc:  # slow or down (redis-py's errors are not OSErrors)
            self._store_failed(tenant, subject, hold, who, exc)
            return
        if not reserved:
            raise ProxyError(
                429, f"{who} has used its {'energy' if unit_name == 'J' else 'carbon'} budget of"
                f" {budget.amount:g} {unit_name} per {budget.per}.",
                code="insufficient_quota", type="insufficient_quota",
                headers=[(REMAINING_HEADER[budget.unit], b"0.0")],
            )
        self._holds[hold] = (subject, time.monotonic())
        remaining = max(budget_stored - used, 0) / per_unit
        left[budget.unit] = min(remaining, left.get(budget.unit, remaining))

    def release_budget(self, record: RequestRecord) -> None:
        """The request ends without being billed (refused, failed before a GPU): give its
        holds back. A no-op for requests without one, so the relay calls it for every request,
        and for billed ones awaiting their measured value (the ledger write settles those)."""
        if record.key in self._awaiting:
            return
        self._release(record.key)
        if record.key_subject:
            self._release(subject_hold(record.key))

    def _release(self, hold: str) -> None:
        held = self._holds.pop(hold, None)
        if held is not None:
            self._spawn(self.ledger.release(held[0], hold))

    def estimate_j(self, tenant: str, budget_j: float, prompt_tokens: int = 0,
                   max_tokens: int | None = None) -> float:
        """What a hold reserves, in joules: the tenant's recent mean joules per weighted token
        (see `_learn_cost`; else every tenant's) times this request's weighted tokens, prefill_weight x
        `prompt_tokens` plus `max_tokens` (None: the tenant's recent mean completion tokens,
        else every tenant's, else 256). Sized from the request, so a burst of large requests
        cannot hold what small ones cost. Never more than the budget; before anything was
        booked, a hundredth of it. A request larger than the tenant's recent ones holds up to 8x
        more (`_EXTRAPOLATION_MAX`)."""
        estimate_j = self._estimate_j(tenant, prompt_tokens, max_tokens)
        return budget_j * _COLD_SHARE if estimate_j is None else min(estimate_j, budget_j)

    def estimate_g(self, tenant: str, budget_g: float, prompt_tokens: int = 0,
                   max_tokens: int | None = None) -> float:
        """What a hold on a budget in grams CO2e reserves: `estimate_j`'s joules, plus the
        tenant's recent share of host joules, at the worst site now (highest PUE x gCO2e/kWh):
        the backend is not chosen yet, and the booked grams replace the hold. Never more than
        the budget; a hundredth of it before anything was booked or any site's intensity known."""
        estimate_j = self._estimate_j(tenant, prompt_tokens, max_tokens)
        g_per_j = self.carbon.worst_g_per_j()
        if estimate_j is None or g_per_j is None:
            return budget_g * _COLD_SHARE
        host_factor = self._host_factor.get(tenant, self._host_factor.get(None, 1.0))
        return min(estimate_j * host_factor * g_per_j, budget_g)

    def _estimate_j(self, tenant: str, prompt_tokens: int, max_tokens: int | None) -> float | None:
        """`estimate_j` without the cap; None before any request was booked."""
        rate_j = self._j_per_token.get(tenant, self._j_per_token.get(None))
        if rate_j is None:
            return None
        if max_tokens is None:
            mean = self._completion_tokens.get(tenant, self._completion_tokens.get(None))
            max_tokens = round(mean) if mean is not None else _DEFAULT_COMPLETION_TOKENS
        weighted = max(self.prefill_weight * prompt_tokens, float(max_tokens))
        usual = self._weighted_tokens.get(tenant, self._weighted_tokens.get(None)) or 1.0
        margin = min(max(weighted / usual, 1.0), _EXTRAPOLATION_MAX)
        return rate_j * (self.prefill_weight * prompt_tokens + max_tokens) * margin

    def _store_failed(self, tenant: str, subject: str, hold: str, who: str, exc: Exception) -> None:
        """The store did not answer a hold: the tenant's mode (a key's budget too) says."""
        mode = self.budget_failure.get(tenant, "open")
        self.metrics.budget_store_failures.labels(mode).inc()
        # A hold that lands after the timeout would block budget until it expires: drop it.
        self._spawn(self.ledger.release(subject, hold))
        now_s = time.monotonic()
        if now_s - self._last_store_warning_s > 10.0:
            self._last_store_warning_s = now_s
            log.warning("budget hold for tenant %s failed (%s); requests are %s",
                        tenant if subject == tenant else f"{tenant}, {who}",
                        type(exc).__name__ if str(exc) == "" else f"{type(exc).__name__}: {exc}",
                        "let through" if mode == "open" else "refused")
        if mode == "closed":
            raise ProxyError(503, "The energy budget cannot be checked right now (ledger store "
                             "unavailable); retry shortly.", code="energy_budget_unavailable",
                             headers=[(b"retry-after", b"1")])

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(self._quietly(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _quietly(work: Any) -> None:
        try:
            await work
        except Exception as exc:  # the hold expires anyway
            log.debug("budget hold release failed: %s", exc)

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

    def _book(self, record: RequestRecord) -> None:
        # Its budget hold, if any, now settles in the ledger: the write that adds its joules
        # drops the hold in the same atomic step. Until here (the wait for a measured value
        # included) the sweep keeps extending it.
        self._holds.pop(record.key, None)
        if record.key_subject:
            self._holds.pop(subject_hold(record.key), None)
        if record.status == 200 and record.joules:
            self._learn_cost(record)
        self.ledger.record(LedgerRecord(
            request_id=record.request_id, key=record.key, tenant=record.tenant, model=record.model,
            backend=record.backend or "", prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens, reasoning_tokens=record.reasoning_tokens,
            joules=record.joules or 0.0,
            joules_all_in=record.joules_all_in or 0.0, gco2e=record.gco2e or 0.0,
            method=record.energy_method or "none", start_s=record.start_s,
            end_s=record.end_s or record.start_s, status=record.status, key_subject=record.key_subject,
        ))
        self.metrics.observe_energy(record)
        if self.telemetry is not None:  # its energy is final now: the span can carry it
            self.telemetry.book(record)

    def _learn_cost(self, record: RequestRecord) -> None:
        """Fold a billed request into the means `estimate_j` reads (every tenant's, and its
        tenant's if budgeted)."""
        # The larger part, not the sum: a request's fixed costs (prefill time, the first token)
        # are not all in its weights, so the sum made a tiny request look cheap per token and a
        # hold for a large one after it too small (half the cost, on the simulated H100). The
        # rate errs high instead, by at most 2x where prompt and completion weigh alike.
        weighted = max(self.prefill_weight * record.prompt_tokens, float(record.completion_tokens))
        if weighted <= 0 or record.joules is None or record.kind not in _GENERATING:
            # No tokens, or not text in and tokens out (pass-through bytes / 4, embeddings):
            # says little about joules per token.
            return
        rate_j = record.joules / weighted
        budgeted = record.tenant in self.budgets or record.key_subject
        for who in (None, record.tenant) if budgeted else (None,):
            _fold(self._j_per_token, who, rate_j)
            _fold(self._completion_tokens, who, float(record.completion_tokens))
            _fold(self._weighted_tokens, who, weighted)
            if record.host_joules is not None and record.joules > 0:
                _fold(self._host_factor, who, (record.joules + record.host_joules) / record.joules)

    async def _extend_holds(self) -> None:
        """Every quarter TTL, push out the expiry of holds past half their TTL (requests still
        running: streams, slow answers), all in one store round trip. Only budgeted tenants'
        requests in flight have holds, so this is a scan of those alone."""
        now_s = time.monotonic()
        if now_s - self._holds_extended_s < self.hold_ttl_s / 4:
            return
        self._holds_extended_s = now_s
        due = [(tenant, key) for key, (tenant, set_s) in self._holds.items() if now_s - set_s >= self.hold_ttl_s / 2]
        if not due:
            return
        try:
            async with asyncio.timeout(max(self.budget_timeout_s, 5.0)):
                await self.ledger.extend(due, self.hold_ttl_s)
        except Exception as exc:  # tried again next round, well before the hold expires
            log.warning("extending %d budget holds failed: %s", len(due), type(exc).__name__)
            return
        for tenant, key in due:
            if key in self._holds:  # not settled while the store answered
                self._holds[key] = (tenant, now_s)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.hold_ttl_s / 4))
            await self._extend_holds()
            cutoff_s = time.time() - self.final_timeout_s
            while self._awaiting:
                key, record = next(iter(self._awaiting.items()))
                if (record.end_s or 0.0) > cutoff_s:
                    break
                del self._awaiting[key]
                log.warning("request %s: no measured energy after %.0f s; booked as estimated",
                            record.request_id, self.final_timeout_s)
                self._book(record)
            stats = self.ledger.stats
            self.metrics.ledger_buffered.set(stats.buffered + stats.journaled)
            self.metrics.ledger_flush_lag_s.set(stats.flush_lag_s or 0.0)
            self.metrics.awaiting_final.set(len(self._awaiting))
