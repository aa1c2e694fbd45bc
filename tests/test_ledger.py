"""The energy ledger against real stores: memory, a SQLite file, a real Redis and PostgreSQL.

Redis: $REDIS_URL, else 127.0.0.1:6379, else a redis-server started here; each test gets its own
key prefix and deletes its keys. PostgreSQL: $DATABASE_URL, else a private cluster started here;
each test gets its own database. Under CI=true a missing Redis or PostgreSQL fails instead of skipping.
"""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import logging
import os
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from proxy.ledger import GROUP_KEYS, Ledger, LedgerRecord, hour_floor_s, hour_iso, open_ledger
from proxy.ledger.record import key_subject, subject_hold
from proxy.ledger.usage import (
    format_table,
    grams_to_ug,
    joules_to_uj,
    parse_group_by,
    parse_time_s,
    rows_to_csv,
    usage_payload,
)
from tests.conftest import free_port
from tests.postgres_support import (
    PostgresCluster,
    fresh_database,
    missing_postgres,
    usable_postgres,
)
from tests.redis_support import RedisServer, need_redis_server, usable_redis

STORES = ["memory", "sqlite", "redis", "postgres"]


def run(coro_fn: Callable[[], Awaitable[Any]], timeout_s: float = 20.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(), timeout_s))  # type: ignore[arg-type]


async def until(predicate: Callable[[], Any], timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll `predicate` (sync or async) until true; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with usable_redis(tmp_path_factory) as url:
        yield url


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with usable_postgres() as url:
        yield url


def _delete_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i:i + 500])
    finally:
        client.close()


class Store:
    """Opens ledgers of one kind; every ledger it opens shares one file or key prefix."""

    def __init__(self, kind: str, tmp_path: Path, redis_url: str | None) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.db_path = tmp_path / "ledger.db"
        self.redis_url = redis_url
        self.prefix = f"jg-test-{uuid.uuid4().hex}:"
        self.database_url: str | None = None  # postgres: a database of this test's own

    def open(self, **opts: Any) -> Ledger:
        opts.setdefault("flush_interval_s", 3600.0)  # tests flush explicitly unless they say
        if self.kind == "memory":
            return open_ledger("memory://", **opts)
        if self.kind == "sqlite":
            return open_ledger(f"sqlite://{self.db_path}", **opts)
        if self.kind == "postgres":
            assert self.database_url is not None
            opts.setdefault("journal_path", str(self.tmp_path / "journal.sqlite"))
            return open_ledger(self.database_url, **opts)
        assert self.redis_url is not None
        opts.setdefault("journal_path", str(self.tmp_path / "journal.sqlite"))
        return open_ledger(self.redis_url, key_prefix=self.prefix, **opts)


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    made = Store(request.param, tmp_path, url)
    if request.param == "postgres":
        with fresh_database(request.getfixturevalue("postgres_url")) as made.database_url:
            yield made
        return
    yield made
    if url is not None:
        _delete_prefix(url, made.prefix)


T0 = datetime(2026, 3, 14, 9, 0, tzinfo=UTC).timestamp()  # an hour start; tests are date-free


def make_records(n: int, *, seed: int = 1, hours: int = 3, base_s: float = T0,
                 prefix: str = "req") -> list[LedgerRecord]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        end = base_s + rng.randrange(hours) * 3600 + rng.uniform(0, 3599)
        out.append(LedgerRecord(
            request_id=f"{prefix}-{i}", tenant=rng.choice(["acme", "globex", "initech"]),
            model=rng.choice(["llama-3.1-8b", "qwen-7b"]), backend=rng.choice(["h100-a", "l4-b"]),
            prompt_tokens=rng.randrange(1, 4000), completion_tokens=rng.randrange(0, 1000),
            joules=rng.uniform(0.0, 900.0), method=rng.choice(["measured", "estimated"]),
            start_s=end - rng.uniform(0.05, 30), end_s=end))
    # Some answers had reasoning tokens (a part of their completion tokens); the draw above is
    # left as it was so every seed gives the records it always gave.
    # Carbon: all-in joules and grams, derived without new draws for the same reason.
    return [replace(r, reasoning_tokens=r.completion_tokens // 3 if i % 2 else 0,
                    joules_all_in=1.4 * r.joules, gco2e=1.4 * r.joules / 3.6e6 * (100 + i % 400))
            for i, r in enumerate(out)]


SITE_OF = {"h100-a": "solar"}  # l4-b has no site: it groups under ""


def expected(records: list[LedgerRecord], group_by: tuple[str, ...],
             tenant: str | None = None) -> dict[tuple[Any, ...], tuple[int, ...]]:
    sums: dict[tuple[Any, ...], list[int]] = {}
    for r in records:
        if tenant is not None and r.tenant != tenant:
            continue
        values = {"tenant": r.tenant, "model": r.model, "backend": r.backend,
                  "hour": hour_iso(hour_floor_s(r.end_s)), "site": SITE_OF.get(r.backend, "")}
        acc = sums.setdefault(tuple(values[k] for k in group_by), [0] * 7)
        acc[0] += 1
        acc[1] += r.prompt_tokens
        acc[2] += r.completion_tokens
        acc[3] += joules_to_uj(r.joules)
        acc[4] += r.reasoning_tokens
        acc[5] += joules_to_uj(r.joules_all_in)
        acc[6] += grams_to_ug(r.gco2e)
    return {k: tuple(v) for k, v in sums.items()}


async def actual(ledger: Ledger, group_by: tuple[str, ...], **query: Any) -> dict[tuple[Any, ...], tuple[int, ...]]:
    rows = await ledger.usage(group_by=group_by, **{"tenant": None, "site_of": SITE_OF, **query})
    out = {}
    for row in rows:
        assert row.joules == row.joules_uj / 1e6
        out[tuple(getattr(row, k) for k in group_by)] = (
            row.requests, row.prompt_tokens, row.completion_tokens, row.joules_uj, row.reasoning_tokens,
            row.joules_all_in_uj, row.gco2e_ug)
    return out


ALL_GROUPINGS = [g for n in range(5) for g in itertools.combinations(GROUP_KEYS, n)]


def test_totals_exact_for_every_grouping(store: Store) -> None:
    records = make_records(1000)

    async def body() -> None:
        # A fast background flusher interleaves with the concurrent records.
        ledger = store.open(flush_interval_s=0.005, chunk_size=64)
        await ledger.start()

        async def bill(rec: LedgerRecord) -> None:
            await asyncio.sleep(random.random() / 100)
            ledger.record(rec)

        await asyncio.gather(*(bill(r) for r in records))
        try:
            for group_by in ALL_GROUPINGS:
                assert await actual(ledger, group_by) == expected(records, group_by), group_by
                # CSV parses back to the same integers (joules exact to the micro-joule).
                rows = await ledger.usage(tenant=None, since_s=None, until_s=None, group_by=group_by,
                                          site_of=SITE_OF)
                parsed = {tuple(line[k] for k in group_by): (
                    int(line["requests"]), int(line["prompt_tokens"]),
                    int(line["completion_tokens"]), int(Decimal(line["joules"]) * 1_000_000),
                    int(line["reasoning_tokens"]), int(Decimal(line["joules_all_in"]) * 1_000_000),
                    int(Decimal(line["gco2e"]) * 1_000_000))
                    for line in csv.DictReader(io.StringIO(rows_to_csv(rows, group_by)))}
                assert parsed == expected(records, group_by)
            payload = usage_payload(await ledger.usage(group_by=("model",)), ("model",))
            assert set(payload["data"][0]) == {"model", "requests", "prompt_tokens",
                                               "completion_tokens", "reasoning_tokens", "joules",
                                               "joules_all_in", "gco2e"}
            assert payload["total"]["requests"] == 1000
            assert payload["total"]["joules"] == sum(joules_to_uj(r.joules) for r in records) / 1e6
            # One tenant, and a range that overlaps only the middle hour.
            assert await actual(ledger, ("model",), tenant="acme") == expected(records, ("model",), "acme")
            middle = [r for r in records if hour_floor_s(r.end_s) == T0 + 3600]
            got = await actual(ledger, ("backend",), since_s=T0 + 3600 + 1800, until_s=T0 + 7200)
            assert got == expected(middle, ("backend",))
            assert ledger.stats.records_written == 1000
        finally:
            await ledger.close()

    run(body)


def test_same_request_twice_counts_once(store: Store) -> None:
    records = make_records(200, seed=2)

    async def body() -> None:
        ledger = store.open()
        await ledger.start()
        try:
            for r in records + records[:50]:  # a replay while the first copy is still buffered
                ledger.record(r)
            assert ledger.stats.duplicates == 50
            assert await ledger.flush() == 200
            for r in records:  # a replay after the first copy reached the store
                ledger.record(r)
            assert await ledger.flush() == 0
            assert await actual(ledger, ("tenant", "hour")) == expected(records, ("tenant", "hour"))
            assert ledger.stats.records_written == 200
        finally:
            await ledger.close()
        if store.kind != "memory":  # another process (a reopened ledger) replaying them
            again = store.open()
            await again.start()
            for r in records:
                again.record(r)
            assert await again.flush() == 0
            assert await actual(again, ()) == expected(records, ())
            await again.close()

    run(body)


def test_a_repeated_client_id_is_billed_every_time(store: Store) -> None:
    """Request ids are the clients' x-request-ids: the same id from two tenants, or twice from
    one, is a new record each time (another `key`), billed and budgeted to its own tenant, and
    looked up per tenant; a replay of one record is still billed once. Before keys, the second
    record was dropped as a duplicate: a tenant could go unbilled by reusing an id."""
    base = make_records(1, seed=9)[0]
    acme1 = replace(base, tenant="acme", key="k1", completion_tokens=5, end_s=T0 + 10)
    globex = replace(base, tenant="globex", key="k2", completion_tokens=7, end_s=T0 + 20)
    acme2 = replace(base, tenant="acme", key="k3", completion_tokens=11, end_s=T0 + 30)
    records, rid = [acme1, globex, acme2], base.request_id

    async def lookups(ledger: Ledger) -> None:
        assert await ledger.get_request(rid, tenant="acme") == acme2  # the latest of its tenant
        assert await ledger.get_request(rid, tenant="globex") == globex
        assert await ledger.get_request(rid) == acme2  # any tenant (admin)
        assert await ledger.get_request(rid, tenant="initech") is None

    async def body() -> None:
        ledger = store.open()
        await ledger.start()
        try:
            for r in [*records, acme1]:  # acme1 twice: a replay while buffered
                ledger.record(r)
            await lookups(ledger)  # from the buffer
            assert ledger.stats.duplicates == 1
            assert await ledger.flush() == 3
            ledger.record(globex)  # a replay after the store has it
            assert await ledger.flush() == 0
            await lookups(ledger)  # from the store
            assert await actual(ledger, ("tenant",)) == expected(records, ("tenant",))
            spent = await ledger.tenant_joules("acme", T0)
            assert joules_to_uj(spent) == joules_to_uj(acme1.joules) + joules_to_uj(acme2.joules)
        finally:
            await ledger.close()
        if store.kind != "memory":
            reopened = store.open()
            await reopened.start()
            try:
                await lookups(reopened)
            finally:
                await reopened.close()

    run(body)


def test_flush_retried_after_failing_half_way(store: Store) -> None:
    records = make_records(50, seed=3)

    async def body() -> None:
        ledger = store.open(chunk_size=10)
        await ledger.start()
        real_write = ledger._write_chunk  # type: ignore[attr-defined]
        calls = 0

        async def reply_lost(chunk: Any) -> int:
            # The third chunk reaches the store but its answer never comes back.
            nonlocal calls
            calls += 1
            new = await real_write(chunk)
            if calls == 3:
                raise ConnectionError("connection reset after write")
            return new

        ledger._write_chunk = reply_lost  # type: ignore[attr-defined]
        try:
            for r in records:
                ledger.record(r)
            assert await ledger.flush() == 20  # no exception; the first two chunks are durable
            stats = ledger.stats
            assert stats.flush_failures == 1 and stats.buffered == 30
            assert "connection reset" in (stats.last_error or "")
            assert await ledger.flush() == 20  # chunk three was already in: counted once
            assert ledger.stats.buffered == 0 and ledger.stats.duplicates == 10
            assert await actual(ledger, ("model", "backend")) == expected(records, ("model", "backend"))
        finally:
            await ledger.close()

    run(body)


@pytest.mark.parametrize("store", ["sqlite", "redis", "postgres"], indirect=True)
def test_close_flushes_and_reopen_reads_it(store: Store) -> None:
    records = make_records(300, seed=4)

    async def body() -> None:
        ledger = store.open()  # no interval flush: only close() can make these durable
        await ledger.start()
        for r in records:
            ledger.record(r)
        assert ledger.stats.buffered == 300
        await ledger.close()
        reopened = store.open()
        await reopened.start()
        try:
            for group_by in (("tenant", "model", "backend", "hour"), ()):
                assert await actual(reopened, group_by) == expected(records, group_by)
            got = await reopened.get_request(records[7].request_id)  # from the store, not memory
            assert got == records[7]
            assert await reopened.get_request("no-such-request") is None
        finally:
            await reopened.close()

    run(body)
    if store.kind == "sqlite":
        with sqlite3.connect(store.db_path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_interval_flush_in_background_and_writes_off_the_loop(store: Store) -> None:
    records = make_records(100, seed=5)

    async def body() -> None:
        ledger = store.open(flush_interval_s=0.02)
        await ledger.start()
        writers: set[str] = set()
        if store.kind == "sqlite":
            real_sync = ledger._write_sync  # type: ignore[attr-defined]

            def spy(*args: Any) -> int:
                writers.add(threading.current_thread().name)
                return real_sync(*args)

            ledger._write_sync = spy  # type: ignore[attr-defined]
        try:
            for r in records:
                ledger.record(r)
            assert ledger.stats.buffered == 100  # record() itself never writes
            await until(lambda: ledger.stats.records_written == 100, what="interval flush")
            assert ledger.stats.buffered == 0 and ledger.stats.flush_lag_s == 0.0
            assert ledger.stats.last_flush_s is not None
            if store.kind == "sqlite":
                assert writers and all(n.startswith("joulegate-ledger") for n in writers)
                assert threading.current_thread().name not in writers
        finally:
            await ledger.close()

    run(body)


def test_tenant_joules_by_period(store: Store) -> None:
    month = datetime(2026, 3, 1, tzinfo=UTC).timestamp()
    day = datetime(2026, 3, 14, tzinfo=UTC).timestamp()
    hour = datetime(2026, 3, 14, 9, tzinfo=UTC).timestamp()
    spans = {"last month": month - 100, "this month": month + 3 * 86400, "today": day + 3600,
             "this hour": hour + 10, "this hour, later": hour + 3000}
    records = [LedgerRecord(f"tj-{name}", "acme", "m", "b", 1, 1, 1.25 * (i + 1), "measured",
                            end - 1, end) for i, (name, end) in enumerate(spans.items())]
    other = LedgerRecord("tj-other", "globex", "m", "b", 1, 1, 1000.0, "measured", hour, hour + 5)

    async def body() -> None:
        ledger = store.open(store_cache_s=0.0, retention_s=10 * 365 * 86400)
        await ledger.start()
        try:
            for r in [*records, other]:
                ledger.record(r)

            async def check() -> None:
                assert await ledger.tenant_joules("acme", month) == 1.25 * (2 + 3 + 4 + 5)
                assert await ledger.tenant_joules("acme", day) == 1.25 * (3 + 4 + 5)
                assert await ledger.tenant_joules("acme", hour) == 1.25 * (4 + 5)
                # since_s inside an hour counts the whole hour (aggregates are hourly)
                assert await ledger.tenant_joules("acme", hour + 1800) == 1.25 * (4 + 5)
                assert await ledger.tenant_joules("acme", month - 86400) == 1.25 * 15
                assert await ledger.tenant_joules("nobody", month) == 0.0

            await check()  # all still buffered: budgets see them at once
            await ledger.flush()
            await check()  # all in the store
            ledger.record(LedgerRecord("tj-new", "acme", "m", "b", 1, 1, 2.5, "measured", hour, hour + 1))
            assert await ledger.tenant_joules("acme", hour) == 1.25 * 9 + 2.5  # store + buffer
        finally:
            await ledger.close()

    run(body)


def test_retention_prunes_request_rows_not_aggregates(store: Store) -> None:
    old = LedgerRecord("old-1", "acme", "m", "b", 5, 7, 3.0, "measured", T0, T0 + 1)
    fresh = LedgerRecord("fresh-1", "acme", "m", "b", 5, 7, 4.0, "measured", T0, T0 + 2)

    async def body() -> None:
        # Retention counts from the write; SQLite and memory prune on flush, Redis by key expiry.
        ledger = store.open(retention_s=1.0, prune_interval_s=0.0)
        await ledger.start()
        try:
            ledger.record(old)
            await ledger.flush()
            assert await ledger.get_request("old-1") == old

            async def pruned() -> bool:
                await ledger.flush()
                return await ledger.get_request("old-1") is None

            await until(pruned, timeout_s=5, what="old request row pruned")
            ledger.record(fresh)
            await ledger.flush()
            assert await ledger.get_request("fresh-1") == fresh
            assert await actual(ledger, ()) == {(): (2, 10, 14, 7_000_000, 0, 0, 0)}
        finally:
            await ledger.close()

    run(body)


def test_redis_outage_buffers_spills_and_replays(tmp_path: Path) -> None:
    need_redis_server("redis-server is not installed")
    server = RedisServer(tmp_path, persist=True)
    server.start()
    journal = tmp_path / "spill" / "journal.sqlite"
    before = make_records(30, seed=6, prefix="before")
    during = make_records(120, seed=7, prefix="during")
    later = make_records(10, seed=8, prefix="later")
    everything = before + during + later
    opts = {"key_prefix": "jg-outage:", "max_buffer": 50, "chunk_size": 20,
            "journal_path": str(journal), "flush_interval_s": 3600.0, "socket_timeout_s": 0.5}

    async def body() -> None:
        ledger = open_ledger(server.url, **opts)
        await ledger.start()
        for r in before:
            ledger.record(r)
        assert await ledger.flush() == 30
        spent_before = await ledger.tenant_joules("acme", T0)

        server.kill()
        for r in during + before[:10]:  # a replay of already-durable ones rides along
            ledger.record(r)
        assert await ledger.flush() == 0  # fails without raising ...
        stats = ledger.stats
        assert stats.flush_failures == 1 and stats.last_error
        assert stats.buffered == 0 and stats.journaled == 130  # ... and spilled past max_buffer
        for r in later:
            ledger.record(r)
        assert ledger.stats.buffered == 10
        # Budgets keep working, and still see what waits in memory and in the journal.
        acme_new = sum(joules_to_uj(r.joules) for r in during + later + before[:10]
                       if r.tenant == "acme")
        assert await ledger.tenant_joules("acme", T0) == (round(spent_before * 1e6) + acme_new) / 1e6
        assert await ledger.get_request(during[5].request_id) == during[5]  # from the journal

        await ledger.close()  # still down: the last 10 go to the journal too, nothing is lost
        ledger = open_ledger(server.url, **opts)
        await ledger.start()
        assert ledger.stats.journaled == 140

        server.start()  # same port, same append-only file
        await ledger.flush()
        assert ledger.stats.journaled == 0 and ledger.stats.buffered == 0
        for group_by in (("tenant", "model", "backend", "hour"), ("tenant",)):
            assert await actual(ledger, group_by) == expected(everything, group_by)
        await ledger.close()

    try:
        run(body, timeout_s=25)
        with sqlite3.connect(journal) as conn:
            assert conn.execute("SELECT COUNT(*) FROM journal").fetchone()[0] == 0
    finally:
        server.kill()


def test_postgres_down_at_start_buffers_then_catches_up(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A proxy starts while PostgreSQL is down: records wait in memory (flushes fail, the
    password never shows), and once the server is up the next flush creates the schema and
    writes them, once."""
    if os.environ.get("DATABASE_URL"):
        pytest.skip("needs a private cluster of its own")
    port = free_port()
    url = f"postgresql://postgres:s3cret-pw@127.0.0.1:{port}/postgres?connect_timeout_s=0.5"
    records = make_records(30, seed=21)
    cluster = PostgresCluster(port)

    async def body() -> None:
        ledger = open_ledger(url, flush_interval_s=3600.0, journal_path=str(tmp_path / "j.sqlite"))
        await ledger.start()
        try:
            for rec in records:
                ledger.record(rec)
            assert await ledger.flush() == 0
            assert ledger.stats.flush_failures >= 1 and ledger.stats.buffered == 30
            assert "s3cret-pw" not in (ledger.stats.last_error or "")
            await asyncio.to_thread(cluster.start)
            await until(lambda: ledger.flush(), what="the buffered records written")
            assert await actual(ledger, ("tenant",)) == expected(records, ("tenant",))
        finally:
            await ledger.close()

    try:
        with caplog.at_level(logging.DEBUG):
            run(body, timeout_s=60)
    except RuntimeError as exc:
        missing_postgres(f"no private cluster: {exc}")
    finally:
        cluster.stop()
    assert "s3cret-pw" not in caplog.text


def test_postgres_restart_costs_no_failed_hold_or_flush(tmp_path: Path) -> None:
    """After a server restart every pooled connection is dead; the next reservation and flush
    find that out, drop them and succeed on a fresh one (a budget failure, with
    energy_budget_failure: closed a 503, would otherwise follow every restart or failover)."""
    if os.environ.get("DATABASE_URL"):
        pytest.skip("needs a private cluster of its own")
    cluster = PostgresCluster()
    try:
        cluster.start()
    except RuntimeError as exc:
        missing_postgres(f"no private cluster: {exc}")

    async def body() -> None:
        ledger = open_ledger(cluster.url, flush_interval_s=3600.0, pool_size=3,
                             journal_path=str(tmp_path / "j.sqlite"))
        await ledger.start()
        try:
            now = time.time()
            # Several connections in the pool, all to go stale at once.
            await asyncio.gather(*(ledger.reserve("acme", f"k{i}", 1, now, 10**9, 60.0) for i in range(6)))
            await asyncio.to_thread(cluster.restart)
            assert await ledger.reserve("acme", "after", 1, now, 10**9, 60.0) == (True, 6)
            ledger.record(LedgerRecord("r-1", "acme", "m", "b", 1, 1, 2.0, "measured", now - 1, now))
            assert await ledger.flush() == 1
            assert ledger.stats.flush_failures == 0
        finally:
            await ledger.close()

    try:
        run(body, timeout_s=60)
    finally:
        cluster.stop()


@pytest.mark.parametrize("store", ["redis", "postgres"], indirect=True)
def test_replicas_see_each_others_spend(store: Store) -> None:
    async def body() -> None:
        a, b = store.open(store_cache_s=0.0), store.open(store_cache_s=0.0)
        await a.start()
        await b.start()
        try:
            a.record(LedgerRecord("rep-1", "acme", "m", "b", 1, 1, 10.0, "measured", T0, T0 + 1))
            b.record(LedgerRecord("rep-2", "acme", "m", "b", 1, 1, 5.0, "measured", T0, T0 + 2))
            await a.flush()
            assert await b.tenant_joules("acme", T0) == 15.0  # a's in the store, b's buffered
            b.record(LedgerRecord("rep-1", "acme", "m", "b", 1, 1, 10.0, "measured", T0, T0 + 1))
            await b.flush()
            assert await a.tenant_joules("acme", T0) == 15.0  # b's replay of rep-1 counted once
        finally:
            await a.close()
            await b.close()

    run(body)


def test_record_never_raises() -> None:
    async def body() -> None:
        ledger = open_ledger("memory://")
        await ledger.start()
        ledger.record(None)  # type: ignore[arg-type]
        ledger.record(LedgerRecord("nan", "acme", "m", "b", 1, 2, float("nan"), "none", T0, T0 + 1))
        assert ledger.stats.record_errors == 1
        await ledger.flush()
        assert await actual(ledger, ()) == {(): (1, 1, 2, 0, 0, 0, 0)}
        await ledger.close()

    run(body)


def test_urls_and_helpers(tmp_path: Path) -> None:
    ledger = open_ledger("sqlite://rel/ledger.db", base_dir=str(tmp_path))
    assert ledger.path == str(tmp_path / "rel" / "ledger.db")  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="unsupported ledger URL"):
        open_ledger("mysql://x")
    assert parse_group_by("hour, model,model") == ("model", "hour")
    with pytest.raises(ValueError, match="unknown group_by key 'region'"):
        parse_group_by("model,region")
    assert parse_time_s("2026-03-14T09:00:00Z") == T0 == parse_time_s(str(T0))
    assert parse_time_s("2026-03-14T10:00:00+01:00") == T0
    assert parse_time_s(None) is None
    with pytest.raises(ValueError):
        parse_time_s("yesterday")
    rows = run(lambda: _usage_of(make_records(20, seed=9)))
    table = format_table(rows, ("tenant",))
    assert table.splitlines()[0].split() == ["tenant", "requests", "prompt_tokens",
                                             "completion_tokens", "reasoning_tokens", "joules",
                                             "joules_all_in", "gco2e"]
    assert "TOTAL" in table and " 20 " in table.splitlines()[-1]


async def _usage_of(records: list[LedgerRecord]) -> Any:
    ledger = open_ledger("memory://")
    await ledger.start()
    for r in records:
        ledger.record(r)
    rows = await ledger.usage(group_by=("tenant",))
    await ledger.close()
    return rows


# -- budget holds (reserve / settle / release / expiry) ---------------------------------------


def test_concurrent_holds_stop_at_the_budget(store: Store) -> None:
    """40 holds at once against a budget worth 5: exactly 5 pass, on every store; a second
    ledger on the same store (another replica) sees them too."""
    async def body() -> None:
        ledger, other = store.open(), store.open()
        await ledger.start()
        await other.start()
        try:
            now = time.time()
            results = await asyncio.gather(*(
                (ledger if i % 2 or store.kind == "memory" else other).reserve(
                    "acme", f"k{i}", 1_000_000, now, 5_000_000, 60.0) for i in range(40)))
            assert sum(ok for ok, _ in results) == 5, results
            # Another tenant is untouched by acme's holds.
            assert (await ledger.reserve("globex", "g1", 1_000_000, now, 5_000_000, 60.0))[0]
        finally:
            await ledger.close()
            await other.close()

    run(body)


def test_written_record_settles_its_hold_and_release_frees_one(store: Store) -> None:
    async def body() -> None:
        ledger = store.open()
        await ledger.start()
        try:
            now = time.time()
            assert await ledger.reserve("acme", "a", 4_000_000, now, 5_000_000, 60.0) == (True, 0)
            assert await ledger.reserve("acme", "b", 4_000_000, now, 5_000_000, 60.0) == (True, 4_000_000)
            assert (await ledger.reserve("acme", "c", 1, now, 5_000_000, 60.0))[0] is False
            # "a" finishes with 1.5 J: its hold is replaced by its actual joules, once.
            ledger.record(LedgerRecord("a", "acme", "m", "b", 1, 1, 1.5, "measured", now - 1, now, key="a"))
            await ledger.flush()
            assert await ledger.reserve("acme", "d", 1, now, 9_000_000, 60.0) == (True, 5_500_000)
            await ledger.release("acme", "b")
            await ledger.release("acme", "b")  # idempotent
            assert await ledger.reserve("acme", "e", 1, now, 9_000_000, 60.0) == (True, 1_500_001)
        finally:
            await ledger.close()

    run(body)


def test_holds_expire(store: Store) -> None:
    """A replica that crashed holding budget gives it back after the hold's TTL."""
    async def body() -> None:
        ledger = store.open()
        await ledger.start()
        try:
            now = time.time()
            assert (await ledger.reserve("acme", "crashed", 5_000_000, now, 5_000_000, 0.2))[0]
            assert (await ledger.reserve("acme", "x", 1, now, 5_000_000, 60.0))[0] is False
            await until(lambda: _reserved(ledger.reserve("acme", "y", 1, time.time(), 5_000_000, 60.0)),
                        what="the hold to expire")
        finally:
            await ledger.close()

    run(body)


def test_extended_holds_outlive_their_ttl(store: Store) -> None:
    """A running request's hold, extended, stays while an unextended one of the same TTL
    expires; a hold already released is not brought back by an extension."""
    async def body() -> None:
        ledger = store.open()
        await ledger.start()
        try:
            now = time.time()
            assert (await ledger.reserve("acme", "running", 3_000_000, now, 5_000_000, 0.5))[0]
            assert (await ledger.reserve("globex", "crashed", 5_000_000, now, 5_000_000, 0.5))[0]
            assert (await ledger.reserve("acme", "gone", 1_000_000, now, 5_000_000, 0.5))[0]
            await ledger.release("acme", "gone")
            await ledger.extend([("acme", "running"), ("acme", "gone")], 60.0)
            await until(lambda: _reserved(ledger.reserve("globex", "y", 1, time.time(), 5_000_000, 60.0)),
                        what="the unextended hold to expire")
            # Past the first TTL: the extended 3 J still count, the released 1 J does not.
            assert await ledger.reserve("acme", "z", 1, time.time(), 5_000_000, 60.0) == (True, 3_000_000)
        finally:
            await ledger.close()

    run(body)


# -- budgets in grams CO2e: the same holds, summing µg ------------------------------------------


def test_concurrent_gram_holds_stop_at_the_budget(store: Store) -> None:
    """As for joules: 40 gram holds at once against a budget worth 5 pass 5, across two
    ledgers on one store; joule holds and spent joules do not count against grams."""
    async def body() -> None:
        ledger, other = store.open(), store.open()
        await ledger.start()
        await other.start()
        try:
            now = time.time()
            # A joule hold and 50 J spent, far over the gram budget if they were counted as µg.
            assert (await ledger.reserve("acme", "j", 50_000_000, now, 10**9, 60.0))[0]
            ledger.record(LedgerRecord("spent", "acme", "m", "b", 1, 1, 50.0, "measured", now - 1, now,
                                       gco2e=0.0))
            await ledger.flush()
            results = await asyncio.gather(*(
                (ledger if i % 2 or store.kind == "memory" else other).reserve(
                    "acme", f"g{i}", 1_000_000, now, 5_000_000, 60.0, unit="gco2e") for i in range(40)))
            assert sum(ok for ok, _ in results) == 5, results
            # And the 5 g held do not count against the joule budget.
            assert await ledger.reserve("acme", "j2", 1, now, 10**9, 60.0) == (True, 100_000_000)
        finally:
            await ledger.close()
            await other.close()

    run(body)


def test_gram_budget_refuses_once_booked_grams_reach_it(store: Store) -> None:
    """A record's grams settle its gram hold and count; once they reach the budget, a hold is
    refused; release, expiry and extension work on gram holds as on joule holds."""
    async def body() -> None:
        ledger = store.open()
        await ledger.start()
        try:
            now = time.time()
            assert await ledger.reserve("acme", "a", 400_000, now, 1_000_000, 60.0, unit="gco2e") == (True, 0)
            assert await ledger.reserve("acme", "b", 400_000, now, 1_000_000, 60.0, unit="gco2e") == (True, 400_000)
            # "a" is booked with 0.75 g (and 2 J): its hold is replaced by its grams.
            ledger.record(LedgerRecord("a", "acme", "m", "b", 1, 1, 2.0, "measured", now - 1, now, key="a",
                                       joules_all_in=2.4, gco2e=0.75))
            await ledger.flush()
            assert (await ledger.reserve("acme", "c", 1, now, 1_000_000, 60.0, unit="gco2e"))[0] is False
            await ledger.release("acme", "b")
            assert await ledger.reserve("acme", "d", 100_000, now, 1_000_000, 60.0, unit="gco2e") == (True, 750_000)
            ledger.record(LedgerRecord("d", "acme", "m", "b", 1, 1, 1.0, "measured", now - 1, now, key="d",
                                       joules_all_in=1.2, gco2e=0.25))
            await ledger.flush()
            # 1.0 g booked: the budget is reached, whatever the holds.
            assert await ledger.reserve("acme", "e", 1, now, 1_000_000, 60.0, unit="gco2e") == (False, 1_000_000)
            assert await ledger.reserve("acme", "e", 1, now, 1_000_001, 60.0, unit="gco2e") == (True, 1_000_000)
            # Expiry and extension: a gram hold nobody extends gives its grams back.
            assert (await ledger.reserve("globex", "running", 300_000, now, 1_000_000, 0.5, unit="gco2e"))[0]
            assert (await ledger.reserve("globex", "crashed", 700_000, now, 1_000_000, 0.5, unit="gco2e"))[0]
            await ledger.extend([("globex", "running")], 60.0)
            await until(lambda: _reserved(ledger.reserve("globex", "y", 1, time.time(), 1_000_000, 60.0,
                                                         unit="gco2e")), what="the unextended gram hold to expire")
            assert await ledger.reserve("globex", "z", 1, time.time(), 1_000_000, 60.0, unit="gco2e") == \
                (True, 300_001)
        finally:
            await ledger.close()

    run(body)


async def _reserved(pending: Awaitable[tuple[bool, int]]) -> bool:
    return (await pending)[0]


# -- a managed key's own budget: a subject beside its tenant -----------------------------------


def test_a_key_subject_counts_its_own_records_once_and_never_shows_in_usage(store: Store) -> None:
    """A record with a key subject adds its µJ and µg to the tenant and to the subject, once
    (a replay through another replica adds nothing); the tenant's other records count only
    for the tenant; the write settles both of the request's holds; usage never lists the
    subject, which no replica's reservation can miss."""
    key = key_subject("key_0123")

    async def body() -> None:
        ledger, second = store.open(), store.open()
        other = ledger if store.kind == "memory" else second  # another replica, where one can be
        await ledger.start()
        await second.start()
        try:
            now = time.time()
            assert await ledger.reserve(key, subject_hold("a"), 3_000_000, now, 5_000_000, 60.0) == (True, 0)
            assert await ledger.reserve("acme", "a", 3_000_000, now, 50_000_000, 60.0) == (True, 0)
            # The key's hold counts against the key, not the tenant, and the reverse.
            assert (await other.reserve(key, subject_hold("b"), 3_000_000, now, 5_000_000, 60.0)) == (True, 3_000_000)
            await other.release(key, subject_hold("b"))
            keyed = LedgerRecord("a", "acme", "m", "b", 1, 1, 1.5, "measured", now - 1, now, key="a",
                                 joules_all_in=2.0, gco2e=0.25, key_subject=key)
            ledger.record(keyed)
            ledger.record(LedgerRecord("plain", "acme", "m", "b", 1, 1, 7.0, "measured", now - 1, now,
                                       gco2e=0.5))
            await ledger.flush()
            other.record(keyed)  # the same request again, from another replica: counted once
            await other.flush()
            # Both holds were settled by the write: only the booked amounts count.
            assert await other.reserve(key, subject_hold("c"), 1, now, 5_000_000, 60.0) == (True, 1_500_000)
            assert await other.reserve("acme", "c", 1, now, 50_000_000, 60.0) == (True, 8_500_000)
            assert await ledger.reserve(key, subject_hold("d"), 1, now, 10**6, 60.0, unit="gco2e") == (True, 250_000)
            assert (await ledger.reserve(key, subject_hold("e"), 1, now, 1_500_001, 60.0))[0] is False
            rows = await ledger.usage(group_by=("tenant",))
            assert [(row.tenant, row.requests, row.joules_uj) for row in rows] == [("acme", 2, 8_500_000)]
            assert (await ledger.get_request("a")) is not None
        finally:
            await ledger.close()
            await second.close()

    run(body)


def test_a_journaled_record_keeps_its_key_subject(tmp_path: Path) -> None:
    """A record spilled to the journal in an outage is replayed with its subject (rows carry it)."""
    record = LedgerRecord("j", "acme", "m", "b", 1, 1, 2.0, "measured", T0, T0 + 1, key="k",
                          key_subject=key_subject("key_1"))
    assert LedgerRecord.from_row(record.to_row()) == record
    assert LedgerRecord.from_row(record.to_row()[:15]).key_subject == ""  # a row from before


# -- reasoning tokens: recorded everywhere, old ledgers still readable ---------------------------

# The schema of a ledger file written before reasoning tokens were recorded.
_OLD_SCHEMA = """
CREATE TABLE requests (
    request_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, model TEXT NOT NULL, backend TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    joules REAL NOT NULL, joules_uj INTEGER NOT NULL, method TEXT NOT NULL,
    start_s REAL NOT NULL, end_s REAL NOT NULL, status INTEGER NOT NULL, written_s REAL NOT NULL);
CREATE TABLE aggregates (
    tenant TEXT NOT NULL, model TEXT NOT NULL, backend TEXT NOT NULL, hour_s INTEGER NOT NULL,
    requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, joules_uj INTEGER NOT NULL,
    PRIMARY KEY (tenant, model, backend, hour_s)) WITHOUT ROWID;
"""
#: A record with reasoning tokens, billed next to one written by an older version.
_NEW = LedgerRecord(request_id="new-1", tenant="acme", model="m", backend="b", prompt_tokens=3,
                    completion_tokens=40, reasoning_tokens=30, joules=1.0, method="measured",
                    start_s=T0 + 2, end_s=T0 + 3, joules_all_in=1.5, gco2e=0.25)


def test_sqlite_ledger_from_before_reasoning_tokens_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(_OLD_SCHEMA)
        conn.execute("INSERT INTO requests VALUES ('old-1', 'acme', 'm', 'b', 5, 7, 2.0, 2000000,"
                     " 'measured', ?, ?, 200, ?)", (T0, T0 + 1, time.time()))
        conn.execute("INSERT INTO aggregates VALUES ('acme', 'm', 'b', ?, 1, 5, 7, 2000000)", (int(T0),))
    run(lambda: _reads_old_and_new_rows(open_ledger(f"sqlite://{path}")))


@pytest.mark.parametrize("store", ["postgres"], indirect=True)
def test_postgres_ledger_from_before_reasoning_tokens_is_migrated(store: Store) -> None:
    """Tables made by a version without reasoning tokens or carbon get the columns on start."""
    assert store.database_url is not None
    old_schema = (_OLD_SCHEMA.replace("REAL", "DOUBLE PRECISION").replace("INTEGER", "BIGINT")
                  .replace(" WITHOUT ROWID", ""))
    with psycopg.connect(store.database_url, autocommit=True) as conn:
        conn.execute(old_schema)
        conn.execute("INSERT INTO requests VALUES ('old-1', 'acme', 'm', 'b', 5, 7, 2.0, 2000000,"
                     " 'measured', %s, %s, 200, %s)", (T0, T0 + 1, time.time()))
        conn.execute("INSERT INTO aggregates VALUES ('acme', 'm', 'b', %s, 1, 5, 7, 2000000)", (int(T0),))
    run(lambda: _reads_old_and_new_rows(store.open()))


async def _reads_old_and_new_rows(ledger: Ledger) -> None:
    """A migrated ledger reads its old row with 0 for the new columns and bills `_NEW` fully."""
    await ledger.start()
    try:
        old = await ledger.get_request("old-1")
        assert old is not None and old.reasoning_tokens == 0 and old.completion_tokens == 7
        ledger.record(_NEW)
        await ledger.flush()
        assert await ledger.get_request("new-1") == _NEW
        assert await actual(ledger, ()) == {(): (2, 8, 47, 3_000_000, 30, 1_500_000, 250_000)}
        # A managed key's budget works on a migrated ledger too (its spend table is new there).
        await _books_a_key_subject(ledger, "new-2")
    finally:
        await ledger.close()


@pytest.mark.parametrize("store", ["postgres"], indirect=True)
def test_postgres_ledger_from_before_key_budgets_gets_its_spend_table(store: Store) -> None:
    """A database whose other tables are all there (a version before key budgets) still gets
    `subject_spend` on start."""
    assert store.database_url is not None

    async def body() -> None:
        first = store.open()
        await first.start()
        await first.close()
        async with await psycopg.AsyncConnection.connect(store.database_url, autocommit=True) as conn:
            await conn.execute("DROP TABLE subject_spend")
        ledger = store.open()
        await ledger.start()
        try:
            await _books_a_key_subject(ledger, _NEW.request_id)
        finally:
            await ledger.close()

    run(body)


async def _books_a_key_subject(ledger: Ledger, request_id: str) -> None:
    """A record like `_NEW` with a key subject is booked to it (its 1 J) and read back."""
    subject = key_subject("key_" + request_id)
    ledger.record(replace(_NEW, request_id=request_id, key_subject=subject))
    await ledger.flush()
    assert await ledger.reserve(subject, subject_hold("x"), 1, _NEW.end_s, 10**9, 60.0) == (True, 1_000_000)


@pytest.mark.parametrize("store", ["postgres"], indirect=True)
def test_postgres_start_does_not_wait_behind_running_writes(store: Store) -> None:
    """Another process's open write transaction (a flush, a reservation) must not hold up a
    starting replica: the schema check takes no table lock once the tables are there."""
    assert store.database_url is not None

    async def body() -> None:
        first = store.open()
        await first.start()
        await first.close()
        async with await psycopg.AsyncConnection.connect(store.database_url) as busy:
            for table in ("requests", "aggregates", "holds"):  # what a writer's transaction holds
                await busy.execute(f"LOCK TABLE {table} IN ROW EXCLUSIVE MODE")
            second = store.open()
            await asyncio.wait_for(second.start(), 10)
            second.record(_NEW)
            await second.close()
            await busy.rollback()
        third = store.open()
        await third.start()
        try:
            assert await third.get_request("new-1") == _NEW
        finally:
            await third.close()

    run(body, timeout_s=30)


def test_rows_from_before_reasoning_tokens_are_read() -> None:
    rec = make_records(2, seed=12)[1]
    assert rec.reasoning_tokens > 0
    assert LedgerRecord.from_row(rec.to_row()) == rec
    old = replace(rec, reasoning_tokens=0, joules_all_in=0.0, gco2e=0.0)
    assert LedgerRecord.from_row(rec.to_row()[:12]) == old
    assert LedgerRecord.from_row(rec.to_row()[:11]) == replace(old, key="")
    # Rows from before carbon was recorded: all-in joules and grams read as 0.
    assert LedgerRecord.from_row(rec.to_row()[:13]) == replace(rec, joules_all_in=0.0, gco2e=0.0)


@pytest.mark.parametrize("store", ["redis"], indirect=True)
def test_redis_hours_from_before_reasoning_tokens_sum(store: Store) -> None:
    """An hour written by an older version has no reasoning field (and one a newer version may
    add, `z`): they sum as 0 and are skipped."""
    assert store.redis_url is not None
    hour = int(T0)
    group = '["acme","m","b"]'
    client = redis.Redis.from_url(store.redis_url)
    try:
        client.zadd(f"{store.prefix}hours", {str(hour): hour})
        client.hset(f"{store.prefix}agg:{hour}", mapping={
            f"r:{group}": 1, f"p:{group}": 5, f"c:{group}": 7, f"j:{group}": 2_000_000, f"z:{group}": 9})
    finally:
        client.close()
    new = _NEW

    async def body() -> None:
        ledger = store.open()
        await ledger.start()
        try:
            ledger.record(new)
            await ledger.flush()
            assert await actual(ledger, ()) == {(): (2, 8, 47, 3_000_000, 30, 1_500_000, 250_000)}
            assert await ledger.get_request("new-1") == new
        finally:
            await ledger.close()

    run(body)


def test_sqlite_holds_from_before_gram_budgets_are_migrated(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    conn = sqlite3.connect(db)
    conn.executescript(_OLD_SCHEMA + "CREATE TABLE holds (key TEXT PRIMARY KEY, tenant TEXT NOT NULL,"
                       " joules_uj INTEGER NOT NULL, expires_s REAL NOT NULL);")
    conn.execute("INSERT INTO holds VALUES ('old', 'acme', 7000000, ?)", (time.time() + 60,))
    conn.commit()
    conn.close()

    async def body() -> None:
        ledger = open_ledger(f"sqlite://{db}")
        await ledger.start()
        try:
            now = time.time()
            # The old hold is in joules: it counts for joules, not for grams.
            assert await ledger.reserve("acme", "g", 5, now, 1_000_000, 60.0, unit="gco2e") == (True, 0)
            assert await ledger.reserve("acme", "j", 5, now, 10**9, 60.0) == (True, 7_000_000)
        finally:
            await ledger.close()

    run(body)
