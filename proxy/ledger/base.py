"""The ledger's interface and the in-memory batching every store shares (records: record.py).

Units: joules on the way in and out (float); micro-joules, tokens and request counts in storage
(integers, so sums are exact and independent of order); times are wall-clock seconds since the
epoch. A record is billed to the UTC hour in which it *ended* (`end_s`).

How a record travels: `record()` puts it in an in-memory buffer (O(1), no I/O). A background task
calls `flush()` every `flush_interval_s`; a flush writes the buffer to the store in chunks of
`chunk_size`, each chunk idempotent by record (`LedgerRecord.uid`), so a chunk that failed after it was applied
(a lost reply, a crash) can be written again without counting twice. A failed flush puts the
unwritten records back; past `max_buffer` records they are spilled to a local SQLite journal,
which later flushes replay into the store.

A little past ~500 lines: the buffering, the flush and its retries, and the budget holds every
store shares read best in one place; records and the journal have their own modules.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

from proxy.ledger.journal import SpillJournal
from proxy.ledger.record import LedgerRecord, LedgerStats, latest, subject_hold
from proxy.ledger.usage import (
    UJ_PER_J,
    Bucket,
    BudgetUnit,
    UsageRow,
    group_buckets,
    hour_floor_s,
    joules_to_uj,
    validate_group_by,
)
from proxy.redact import redact_text

_T = TypeVar("_T")

#: The first budget read of a tenant and period waits at most this long for the store (s).
_FIRST_READ_TIMEOUT_S = 0.25

log = logging.getLogger("joulegate.ledger")

DAY_S = 86_400


class Ledger(ABC):
    """Where finished requests are billed. See the module docstring for units."""

    @abstractmethod
    async def start(self) -> None:
        """Open the store and start the background flusher."""

    @abstractmethod
    async def close(self) -> None:
        """Stop the flusher and flush; what cannot reach the store goes to the journal."""

    @abstractmethod
    def record(self, rec: LedgerRecord) -> None:
        """Bill a finished request. O(1), in memory; never blocks, never raises.
        Call it on the event loop's thread (it may wake the flusher)."""

    @abstractmethod
    async def flush(self) -> int:
        """Push buffered (and journaled) records; returns how many were newly made durable."""

    @abstractmethod
    async def usage(self, *, tenant: str | None = None, since_s: float | None = None,
                    until_s: float | None = None, group_by: Sequence[str] = (),
                    site_of: Mapping[str, str] | None = None) -> list[UsageRow]:
        """Sums per group; `tenant` None means all tenants. Grouping by `site` maps each
        cell's backend through `site_of` (the config's `site:` per backend).

        Answered from the hourly aggregates, so the range is whole hours: an hour counts when it
        overlaps [since_s, until_s) -- since_s is rounded down and until_s up to the hour.
        """

    @abstractmethod
    async def get_request(self, request_id: str, tenant: str | None = None) -> LedgerRecord | None:
        """The latest request (by end) with this client-visible id, of `tenant` if given, from
        memory or the store (while within retention)."""

    @abstractmethod
    async def tenant_joules(self, tenant: str, since_s: float) -> float:
        """Joules billed to `tenant` in the hours from the one containing `since_s` on,
        including records not yet flushed (for budgets)."""

    @property
    @abstractmethod
    def stats(self) -> LedgerStats:
        """Buffer size, flush lag and failures."""

    @abstractmethod
    async def reserve(self, tenant: str, key: str, uj: int, since_s: float, budget_uj: int,
                      ttl_s: float, unit: BudgetUnit = "joules") -> tuple[bool, int]:
        """Atomically in the store: if `tenant`'s stored µJ since the hour of `since_s` plus its
        live reservations are under `budget_uj`, hold `uj` more under `key` for `ttl_s`.
        Returns (reserved, µJ used before this one). The hold ends when the record with this
        `key` is written (its actual joules replace it), on `release`, or when it expires.
        With `unit` "gco2e" every amount is micrograms CO2e instead: the records' grams are
        summed, and only the tenant's holds in grams count.

        `tenant` may be a budget subject instead (`record.key_subject`): its spend is that of
        the records naming it, and its hold on a request is keyed `subject_hold(key)`."""

    @abstractmethod
    async def release(self, tenant: str, key: str) -> None:
        """Drop the hold `key` (the request never reached a GPU); idempotent."""

    @abstractmethod
    async def extend(self, holds: Sequence[tuple[str, str]], ttl_s: float) -> None:
        """Push the expiry of these (tenant, key) holds to `ttl_s` from now, in one store round
        trip (requests still running); a hold already settled, released or expired stays gone."""


class BufferedLedger(Ledger):
    """Batching, flushing, journaling and budget bookkeeping; stores implement the `_` hooks.

    Every hook that does blocking I/O runs on `self._io`, one dedicated thread, so each SQLite
    connection is used by exactly one thread and the event loop never waits on disk.
    """

    def __init__(self, *, flush_interval_s: float = 1.0, max_buffer: int = 100_000,
                 retention_s: float = 30 * DAY_S, chunk_size: int = 200,
                 prune_interval_s: float = 60.0, store_cache_s: float = 0.5,
                 journal_path: str | None = None) -> None:
        self.flush_interval_s = flush_interval_s
        self.max_buffer = max_buffer
        self.retention_s = retention_s
        # A chunk's command is built on the event loop in one go: 1000 records held requests
        # up ~16 ms (the p99 at c=1 on bench/overhead with Redis); 200 keep that under ~5 ms.
        self.chunk_size = max(1, chunk_size)
        self.prune_interval_s = prune_interval_s
        self.store_cache_s = store_cache_s  # how stale the store's part of tenant_joules may be
        self._journal_path = journal_path
        self._journal = SpillJournal(journal_path, self._run_io) if journal_path else None
        # Insertion-ordered by uid: O(1) dedupe of a replay while it is still in memory.
        self._buffer: dict[str, LedgerRecord] = {}
        self._buffer_since: float | None = None  # monotonic time the oldest buffered record came
        self._inflight: dict[str, LedgerRecord] = {}
        self._inflight_since: float | None = None
        # Micro-joules recorded but not yet in the store, per (tenant, hour_s): budgets see them.
        self._pending: dict[tuple[str, int], int] = {}
        # (tenant, since_hour) -> (monotonic read time, store generation the read began at, µJ).
        self._store_cache: dict[tuple[str, int], tuple[float, int, int]] = {}
        self._store_gen = 0  # bumped by every flush that wrote
        # µJ that left `_pending` for the store, by the generation that made them durable: a
        # cached store figure read before that generation does not include them yet.
        self._settled: dict[int, dict[tuple[str, int], int]] = {}
        self._refreshing: set[tuple[str, int]] = set()
        self._refresh_tasks: set[asyncio.Task[None]] = set()
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="joulegate-ledger")
        # Budget holds this process made: hold key -> tenant (or budget subject).
        self._held: dict[str, str] = {}
        self._flush_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._stopping = False
        self._failing = False
        self._last_prune = -math.inf
        self._last_flush_s: float | None = None
        self._last_flush_duration_s = 0.0
        self._flush_failures = 0
        self._records_written = 0
        self._duplicates = 0
        self._record_errors = 0
        self._last_error: str | None = None

    # ---- hooks a store implements -------------------------------------------------------------
    async def _open(self) -> None:
        """Connect to the store."""

    async def _close_store(self) -> None:
        """Release the store's connections."""

    @abstractmethod
    async def _write_chunk(self, records: Sequence[LedgerRecord]) -> int:
        """Write records idempotently by `uid`, aggregates only for new ones; returns
        how many were new. Raises if the store cannot be written."""

    @abstractmethod
    async def _buckets(self, tenant: str | None, since_hour_s: int | None,
                       until_s: float | None) -> list[Bucket]:
        """Aggregate cells with since_hour_s <= hour_s < until_s."""

    async def _grouped(self, tenant: str | None, since_hour_s: int | None, until_s: float | None,
                       group_by: tuple[str, ...]) -> list[UsageRow]:
        return group_buckets(await self._buckets(tenant, since_hour_s, until_s), group_by)

    @abstractmethod
    async def _stored_request(self, request_id: str, tenant: str | None) -> LedgerRecord | None:
        """The latest stored record with this client-visible id (of `tenant`, if given)."""

    @abstractmethod
    async def _stored_tenant_uj(self, tenant: str, since_hour_s: int) -> int: ...

    async def _prune(self, cutoff_s: float) -> int:
        """Delete per-request rows written before cutoff_s (wall clock); aggregates stay."""
        return 0

    @abstractmethod
    async def _reserve_store(self, tenant: str, key: str, uj: int, since_hour_s: int,
                             budget_uj: int, ttl_s: float, unit: BudgetUnit) -> tuple[bool, int]:
        """`reserve` in the store, as one atomic step (`unit`: µJ or µg CO2e)."""

    @abstractmethod
    async def _release_store(self, tenant: str, key: str) -> None: ...

    @abstractmethod
    async def _extend_store(self, holds: Sequence[tuple[str, str]], ttl_s: float) -> None:
        """`extend` in the store: only holds that exist get a new expiry."""

    def _holds(self, records: Sequence[LedgerRecord]) -> list[tuple[str, str]]:
        """(tenant or subject, hold key) of the budget holds these records settle: a store's
        write drops them in the same atomic step that adds the records' joules."""
        held = self._held
        out = []
        for rec in records:
            if rec.key in held:
                out.append((rec.tenant, rec.key))
            if rec.key_subject and (hold := subject_hold(rec.key)) in held:
                out.append((rec.key_subject, hold))
        return out

    def _forget_holds(self, rec: LedgerRecord) -> None:
        """The store has settled `rec`'s holds (tenant and key budget) with its write."""
        self._held.pop(rec.key, None)
        if rec.key_subject:
            self._held.pop(subject_hold(rec.key), None)

    async def _run_io(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        await self._open()
        if self._journal is not None:
            await self._journal.open_existing()
        self._task = asyncio.create_task(self._flush_loop(), name="joulegate-ledger-flush")

    async def close(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._task is not None:
            self._wake.set()
            await self._task  # the loop finishes its flush rather than being cancelled mid-write
        await self.flush()
        if self._buffer and self._journal is not None:
            await self._spill()
        if self._buffer:
            log.error("ledger closing with %d records not durable", len(self._buffer))
        await self._close_store()
        if self._journal is not None:
            await self._journal.close()
        self._io.shutdown(wait=True)

    async def _flush_loop(self) -> None:
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            if self._stopping:
                break
            try:
                await self.flush()
            except Exception:  # flush() handles store errors; this is a bug guard
                log.exception("ledger flush loop error")

    # ---- hot path -----------------------------------------------------------------------------
    def record(self, rec: LedgerRecord) -> None:
        try:
            rid = rec.uid
            if rid in self._buffer or rid in self._inflight:
                self._duplicates += 1
                return
            if not (isinstance(rec.joules, float | int) and math.isfinite(rec.joules)
                    and rec.joules >= 0):
                log.warning("ledger: request %s has joules=%r; billed as 0", rid, rec.joules)
                rec = replace(rec, joules=0.0)
            key = (rec.tenant, hour_floor_s(rec.end_s))
            uj = joules_to_uj(rec.joules)
            if not self._buffer:
                self._buffer_since = time.monotonic()
            self._buffer[rid] = rec
            self._pending[key] = self._pending.get(key, 0) + uj
            if len(self._buffer) >= self.max_buffer and not self._failing:
                self._wake.set()  # flush (or spill) now rather than at the next tick
        except Exception:
            self._record_errors += 1
            log.exception("ledger: could not record a request")

    def _settle(self, records: Iterable[LedgerRecord], *, stored: bool = True) -> None:
        """These records are in the store (or the journal) now: stop counting them as pending."""
        pending = self._pending
        for rec in records:
            key = (rec.tenant, hour_floor_s(rec.end_s))
            uj = joules_to_uj(rec.joules)
            if stored:
                self._note_stored(key, uj)
            left = pending.get(key, 0) - uj
            if left:
                pending[key] = left
            else:
                pending.pop(key, None)

    def _note_stored(self, key: tuple[str, int], uj: int) -> None:
        """Remember µJ made durable by the flush now running, until cached figures include it."""
        settled = self._settled.setdefault(self._store_gen + 1, {})
        settled[key] = settled.get(key, 0) + uj

    # ---- flushing -----------------------------------------------------------------------------
    async def flush(self) -> int:
        async with self._flush_lock:
            return await self._flush_locked()

    async def _flush_locked(self) -> int:
        started = time.monotonic()
        written = 0
        if self._buffer:
            self._inflight, self._buffer = self._buffer, {}
            self._inflight_since, self._buffer_since = self._buffer_since, None
            records = list(self._inflight.values())
            try:
                for i in range(0, len(records), self.chunk_size):
                    chunk = records[i:i + self.chunk_size]
                    new = await self._write_chunk(chunk)
                    written += new
                    self._duplicates += len(chunk) - new
                    self._settle(chunk)
                    for rec in chunk:
                        del self._inflight[rec.uid]
                        self._forget_holds(rec)
            except BaseException as exc:
                self._restore_inflight()
                if not isinstance(exc, Exception):
                    raise  # cancelled: the records are back in the buffer
                self._note_failure(exc)
                if len(self._buffer) >= self.max_buffer and self._journal is not None:
                    await self._spill()
                self._account(written)
                return written
            self._inflight_since = None
        if self._journaled:
            try:
                written += await self._journal_replay()
            except Exception as exc:
                self._note_failure(exc)
                self._account(written)
                return written
        if time.monotonic() - self._last_prune >= self.prune_interval_s:
            self._last_prune = time.monotonic()
            try:
                await self._prune(time.time() - self.retention_s)
            except Exception:
                log.exception("ledger: pruning old request rows failed")
        if self._failing:
            log.info("ledger store reachable again")
        self._failing = False
        self._last_flush_s = time.time()
        self._last_flush_duration_s = time.monotonic() - started
        self._account(written)
        return written

    def _account(self, written: int) -> None:
        if written:
            self._records_written += written
            self._store_gen += 1

    def _restore_inflight(self) -> None:
        """Put the records of a failed flush back in front of those recorded since."""
        restored = self._inflight
        restored.update(self._buffer)
        self._buffer, self._inflight = restored, {}
        if self._inflight_since is not None:
            self._buffer_since = self._inflight_since
        self._inflight_since = None

    def _note_failure(self, exc: Exception) -> None:
        self._flush_failures += 1
        self._last_error = redact_text(f"{type(exc).__name__}: {exc}")
        if not self._failing:
            log.warning("ledger flush failed (%s); %d records kept for retry",
                        self._last_error, len(self._buffer))
        self._failing = True

    @property
    def _journaled(self) -> int:
        return self._journal.count if self._journal is not None else 0

    async def _spill(self) -> None:
        """Move the buffer to the journal so memory stays bounded while the store is down."""
        records = list(self._buffer.values())
        if not records or self._journal is None:
            return
        self._buffer, since = {}, self._buffer_since
        self._buffer_since = None
        try:
            await self._journal.append(records, since)
        except Exception:
            log.exception("ledger: cannot spill to journal %s; keeping records in memory",
                          self._journal_path)
            self._buffer = {**{r.uid: r for r in records}, **self._buffer}
            self._buffer_since = since
            return
        self._settle(records, stored=False)  # their pending share now comes from the journal
        await self._journal.refresh()
        log.warning("ledger: spilled %d records to %s (%d journaled)", len(records),
                    self._journal_path, self._journaled)

    async def _journal_replay(self) -> int:
        assert self._journal is not None

        def stored(records: Sequence[LedgerRecord]) -> None:
            for rec in records:  # from the journal's share to the store's
                self._forget_holds(rec)
                self._note_stored((rec.tenant, hour_floor_s(rec.end_s)), joules_to_uj(rec.joules))

        return await self._journal.replay(self.chunk_size, self._write_chunk, stored)

    # ---- budget holds -------------------------------------------------------------------------
    async def reserve(self, tenant: str, key: str, uj: int, since_s: float, budget_uj: int,
                      ttl_s: float, unit: BudgetUnit = "joules") -> tuple[bool, int]:
        self._held[key] = tenant  # before the await: a write racing this one must drop it too
        try:
            reserved, used = await self._reserve_store(tenant, key, uj, hour_floor_s(since_s),
                                                       budget_uj, ttl_s, unit)
        except BaseException:
            self._held.pop(key, None)
            raise
        if not reserved:
            self._held.pop(key, None)
        return reserved, used

    async def release(self, tenant: str, key: str) -> None:
        self._held.pop(key, None)
        await self._release_store(tenant, key)

    async def extend(self, holds: Sequence[tuple[str, str]], ttl_s: float) -> None:
        if holds:
            await self._extend_store(holds, ttl_s)

    # ---- reads --------------------------------------------------------------------------------
    async def usage(self, *, tenant: str | None = None, since_s: float | None = None,
                    until_s: float | None = None, group_by: Sequence[str] = (),
                    site_of: Mapping[str, str] | None = None) -> list[UsageRow]:
        keys = validate_group_by(group_by)
        # Flushing first makes usage include everything this process has recorded; the flush
        # is idempotent and cheap, and a store that cannot be written cannot be read either.
        await self.flush()
        since_hour = None if since_s is None else hour_floor_s(since_s)
        if "site" in keys:  # not a stored key: cells are grouped here, by their backend's site
            return group_buckets(await self._buckets(tenant, since_hour, until_s), keys, site_of)
        return await self._grouped(tenant, since_hour, until_s, keys)

    async def get_request(self, request_id: str, tenant: str | None = None) -> LedgerRecord | None:
        # A scan, not an index: the buffer holds about one flush interval of records, and
        # lookups come from the energy API, not the hot path.
        rec = latest(r for r in (*self._buffer.values(), *self._inflight.values())
                     if r.request_id == request_id and (tenant is None or r.tenant == tenant))
        if rec is not None:
            return rec
        if self._journal is not None:  # local, so it answers in an outage
            found = await self._journal.get(request_id, tenant)
            if found is not None:
                return found
        return await self._stored_request(request_id, tenant)

    async def tenant_joules(self, tenant: str, since_s: float) -> float:
        since_hour = hour_floor_s(since_s)
        # Pending first: a flush finishing during the store read can then only make us count a
        # batch twice (refusing a request early), never miss it (letting a tenant overspend).
        pending = sum(uj for (t, h), uj in self._pending.items() if t == tenant and h >= since_hour)
        pending += sum(uj for (t, h), uj in (self._journal.pending if self._journal else {}).items()
                       if t == tenant and h >= since_hour)
        key = (tenant, since_hour)
        cached = self._store_cache.get(key)
        if cached is None:
            # First ask for this tenant and period: wait for the store, but only briefly.
            await self._refresh_store_figure(key, timeout_s=_FIRST_READ_TIMEOUT_S)
            cached = self._store_cache.get(key)
        elif time.monotonic() - cached[0] >= self.store_cache_s and key not in self._refreshing:
            # Stale: answer from the cache now and refresh it off the request path, so a slow
            # or hung store never delays a request.
            task = asyncio.get_running_loop().create_task(self._refresh_store_figure(key, None))
            self._refresh_tasks.add(task)
            task.add_done_callback(self._refresh_tasks.discard)
        if cached is None:
            return pending / UJ_PER_J
        read_at_s, gen, stored = cached
        # What flushes made durable after that read began is in neither `pending` nor `stored`.
        for settled_gen, settled in self._settled.items():
            if settled_gen > gen:
                stored += sum(uj for (t, h), uj in settled.items() if t == tenant and h >= since_hour)
        return (stored + pending) / UJ_PER_J

    async def _refresh_store_figure(self, key: tuple[str, int], timeout_s: float | None) -> None:
        """Read a tenant's stored µJ since an hour into the cache; one read per key at a time."""
        if key in self._refreshing:
            return
        self._refreshing.add(key)
        gen = self._store_gen
        previous = self._store_cache.get(key)
        try:
            read = self._stored_tenant_uj(*key)
            stored = await (asyncio.wait_for(read, timeout_s) if timeout_s else read)
        except Exception as exc:
            # The store is down or slow: keep the last figure, and probe again only after
            # store_cache_s (re-stamped), not on every request.
            log.debug("ledger: tenant_joules from store failed: %s", exc)
            if previous is not None:
                self._store_cache[key] = (time.monotonic(), previous[1], previous[2])
            return
        finally:
            self._refreshing.discard(key)
        if len(self._store_cache) > 10_000:
            self._store_cache.clear()
        self._store_cache[key] = (time.monotonic(), gen, stored)
        self._prune_settled()

    def _prune_settled(self) -> None:
        """Forget settled amounts that every cached figure already includes."""
        oldest = min((g for _, g, _ in self._store_cache.values()), default=self._store_gen)
        for settled_gen in [g for g in self._settled if g <= oldest]:
            del self._settled[settled_gen]

    @property
    def stats(self) -> LedgerStats:
        now = time.monotonic()
        journal_since = self._journal.since if self._journal is not None else None
        since = [t for t in (self._buffer_since, self._inflight_since, journal_since)
                 if t is not None]
        return LedgerStats(
            buffered=len(self._buffer) + len(self._inflight), journaled=self._journaled,
            flush_lag_s=(now - min(since)) if since else 0.0, last_flush_s=self._last_flush_s,
            last_flush_duration_s=self._last_flush_duration_s,
            flush_failures=self._flush_failures, records_written=self._records_written,
            duplicates=self._duplicates, record_errors=self._record_errors,
            last_error=self._last_error,
        )
