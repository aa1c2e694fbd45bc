"""Tenants, the energy ledger and budgets, end to end: real proxies, a simulated H100, real SQLite
files and a real Redis (its own redis-server where the test stops it).

The ledger books a request's *final* joules (measured once power samples past its end arrive),
while the response carries the value known when it answered; so ledger totals are compared with
the finals read back from `/v1/energy/requests/{id}`, in integer micro-joules as the ledger keeps
them, and ledger request counts with the requests the clients saw answered.

Redis: $REDIS_URL, else 127.0.0.1:6379, else a redis-server started here (tests/redis_support.py
finds it); the proxy's config cannot carry a key prefix, so the shared Redis test claims an empty
database number of its own and flushes it afterwards. Under CI=true a missing Redis fails.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import openai
import orjson
import psycopg
import pytest
import redis

from tests.conftest import (
    ADMIN_KEY,
    KEYS,
    MODEL,
    REPO,
    Proc,
    ProxyProc,
    SimBackend,
    backend_yaml,
    free_port,
    sha256,
    tenants_yaml,
    wait_until,
)
from tests.postgres_support import fresh_database, usable_postgres
from tests.redis_support import RedisServer, missing_redis, need_redis_server, usable_redis

UJ = 1_000_000
MESSAGES = [{"role": "user", "content": "How many joules does this answer cost?"}]
TENANTS = ("acme", "globex")
CLAIM_KEY = "joulegate-test-accounting-claim"  # outside the ledger's `joulegate:` prefix


# -- helpers ------------------------------------------------------------------------------------


def uj(joules: float) -> int:
    """Joules as the ledger stores them: integer micro-joules, rounded to nearest."""
    return round(joules * UJ)


def proxy_config(sim: SimBackend, ledger: str, tenants: str | None = None, extra: str = "") -> str:
    power = f", power: {{source: sim, url: '{sim.url}', interval_s: 0.05}}"
    return ("backends:\n" + backend_yaml("h100", sim.url, [MODEL], power)
            + "routing: {policy: least_loaded}\n" + f"ledger: '{ledger}'\n"
            + (tenants if tenants is not None else tenants_yaml()) + extra)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def get(proxy: ProxyProc, path: str, key: str | None = ADMIN_KEY) -> httpx.Response:
    return httpx.get(proxy.url + path, headers=auth(key) if key else {}, timeout=10)


def usage_total(proxy: ProxyProc, query: str = "", key: str = ADMIN_KEY) -> dict[str, Any]:
    resp = get(proxy, "/v1/energy/usage" + query, key)
    assert resp.status_code == 200, resp.text
    return resp.json()["total"]


@dataclass
class Answer:
    """One request as its client saw it answered."""

    request_id: str
    tenant: str
    kind: str  # chat | stream_usage | stream_comment | embedding
    joules: float  # x-energy-joules, or the stream's energy object
    method: str
    completion_tokens: int  # counted by the client (usage, or the streamed content chunks)
    done_s: float  # monotonic time the answer was complete


KINDS = ("chat", "stream_usage", "stream_comment", "embedding")


async def send(client: httpx.AsyncClient, kind: str, tenant: str, max_tokens: int,
               request_id: str | None = None) -> Answer:
    """One request of `kind`; AssertionError unless it was answered completely."""
    headers = auth(KEYS[tenant])
    if request_id is not None:
        headers["x-request-id"] = request_id
    if kind == "embedding":
        resp = await client.post("/v1/embeddings", headers=headers,
                                 json={"model": MODEL, "input": "joules " * max_tokens})
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["prompt_tokens"] > 0
        return Answer(resp.headers["x-request-id"], tenant, kind, float(resp.headers["x-energy-joules"]),
                      resp.headers["x-energy-method"], 0, time.monotonic())
    body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens}
    if kind == "chat":
        resp = await client.post("/v1/chat/completions", headers=headers, json=body)
        assert resp.status_code == 200, resp.text
        tokens = resp.json()["usage"]["completion_tokens"]
        assert tokens == max_tokens
        return Answer(resp.headers["x-request-id"], tenant, kind, float(resp.headers["x-energy-joules"]),
                      resp.headers["x-energy-method"], tokens, time.monotonic())
    body["stream"] = True
    if kind == "stream_usage":
        body["stream_options"] = {"include_usage": True}
    async with client.stream("POST", "/v1/chat/completions", headers=headers, json=body) as resp:
        raw = await resp.aread()
        assert resp.status_code == 200, raw
        request_id = resp.headers["x-request-id"]
    assert raw.endswith(b"data: [DONE]\n\n"), raw[-300:]
    events = raw.split(b"\n\n")
    chunks = [orjson.loads(e[6:]) for e in events if e.startswith(b"data: {")]
    content = sum(1 for c in chunks if c.get("choices") and c["choices"][0]["delta"].get("content"))
    assert content == max_tokens
    if kind == "stream_usage":
        usage = chunks[-1]["usage"]
        assert usage["completion_tokens"] == content
        energy = usage["energy"]
    else:
        comments = [e for e in events if e.startswith(b": energy ")]
        assert len(comments) == 1, raw[-300:]
        energy = orjson.loads(comments[0][len(b": energy "):])
    return Answer(request_id, tenant, kind, float(energy["joules"]), energy["method"], content,
                  time.monotonic())


def finals(proxy: ProxyProc, ids: list[str], timeout_s: float = 30.0,
           measured: bool = True) -> dict[str, dict[str, Any]]:
    """`/v1/energy/requests/{id}` for every id (admin key), once each is `measured`
    (or, with measured=False, as soon as the ledger knows it)."""
    got: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=proxy.url, headers=auth(ADMIN_KEY), timeout=10) as client:

        def all_final() -> bool:
            for rid in ids:
                if rid in got:
                    continue
                resp = client.get(f"/v1/energy/requests/{rid}")
                if resp.status_code != 200 or (measured and resp.json()["method"] != "measured"):
                    return False
                got[rid] = resp.json()
            return True

        wait_until(all_final, timeout_s, f"{len(ids)} requests to be {'measured' if measured else 'booked'}")
    return got


def assert_ledger_matches(proxy: ProxyProc, answers: list[Answer], final: dict[str, dict[str, Any]]) -> None:
    """Usage totals (all tenants and each one) equal the answered requests, to the micro-joule."""
    for tenant in (None, *TENANTS):
        mine = [a for a in answers if tenant is None or a.tenant == tenant]
        query = "" if tenant is None else f"?tenant={tenant}"
        total = usage_total(proxy, query)
        assert total["requests"] == len(mine), (tenant, total)
        assert total["completion_tokens"] == sum(a.completion_tokens for a in mine), (tenant, total)
        assert total["prompt_tokens"] == sum(final[a.request_id]["prompt_tokens"] for a in mine)
        assert uj(total["joules"]) == sum(uj(final[a.request_id]["joules"]) for a in mine), (tenant, total)
        if tenant is not None:  # the tenant's own key sees the same
            assert usage_total(proxy, "", KEYS[tenant]) == total


class MetricsSampler:
    """Reads the ledger gauges from /metrics every 0.1 s in a thread; keeps the maxima."""

    GAUGES = ("joulegate_ledger_flush_lag_seconds", "joulegate_ledger_buffered_records")

    def __init__(self, proxy: ProxyProc) -> None:
        self.url = proxy.url + "/metrics"
        self.max = dict.fromkeys(self.GAUGES, 0.0)
        self.last = dict.fromkeys(self.GAUGES, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=2) as client:
            while not self._stop.wait(0.1):  # a sampling period, not a synchronisation
                try:
                    text = client.get(self.url).text
                except httpx.HTTPError:
                    continue
                for name in self.GAUGES:  # with or without labels (one series per worker)
                    found = re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
                    if found:
                        self.last[name] = max(float(v) for v in found)
                        self.max[name] = max(self.max[name], self.last[name])

    def __enter__(self) -> MetricsSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# -- Redis --------------------------------------------------------------------------------------


def _with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def _claim_empty_db(url: str) -> str | None:
    """The URL of an empty database number on the Redis at `url`, marked as ours; None if none."""
    token = uuid.uuid4().hex
    for db in random.sample(range(1, 16), 15):
        candidate = _with_db(url, db)
        client = redis.Redis.from_url(candidate)
        try:
            if client.dbsize() == 0 and client.set(CLAIM_KEY, token, nx=True, ex=600):
                return candidate
        except redis.ResponseError:  # fewer databases configured
            return None
        finally:
            client.close()
    return None


@pytest.fixture(scope="module")
def redis_db_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis database of our own: an empty db number claimed on the shared Redis (flushed
    afterwards), else a redis-server started here."""
    with usable_redis(tmp_path_factory, "redis-shared") as url:
        claimed = _claim_empty_db(url)
        if claimed is None:
            missing_redis(f"no empty database on {url} to claim")
        try:
            yield claimed
        finally:
            client = redis.Redis.from_url(claimed)
            try:
                client.flushdb()
            finally:
                client.close()


def redis_requests(url: str) -> dict[str, list[Any]]:
    """The per-request records the Redis ledger holds, by request id."""
    client = redis.Redis.from_url(url)
    try:
        return {key.decode()[len("joulegate:req:"):]: orjson.loads(client.get(key))
                for key in client.scan_iter(match="joulegate:req:*", count=1000)}
    finally:
        client.close()


@pytest.fixture
def postgres_db_url() -> Iterator[str]:
    with usable_postgres() as url, fresh_database(url) as db_url:
        yield db_url


def postgres_requests(url: str) -> dict[str, tuple[int, int]]:
    """request id -> (joules_uj, completion_tokens) from a PostgreSQL ledger."""
    with psycopg.connect(url) as conn:
        return {rid: (j, c) for rid, j, c in conn.execute(
            "SELECT request_id, joules_uj, completion_tokens FROM requests")}


def sqlite_requests(path: Path) -> dict[str, tuple[int, int]]:
    """request id -> (joules_uj, completion_tokens) from a SQLite ledger, read-only."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {rid: (j, c) for rid, j, c in conn.execute(
            "SELECT request_id, joules_uj, completion_tokens FROM requests")}
    finally:
        conn.close()


# -- 1. ledger totals == the answered requests, for every store ---------------------------------


N_REQUESTS = 96
LOAD_S = 2.5


@pytest.mark.parametrize("store", ["memory", "sqlite", "redis", "postgres"])
def test_ledger_totals_equal_the_requests_for_each_store(
        store: str, sims: dict[str, SimBackend], tmp_path: Path, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    sim = sims["h100"]
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # a Redis ledger's spill journal stays ours
    ledger = {"memory": "memory://", "sqlite": f"sqlite:///{tmp_path / 'ledger.db'}"}.get(store)
    if store in ("redis", "postgres"):
        ledger = request.getfixturevalue(f"{store}_db_url")
    assert ledger is not None
    proxy = ProxyProc(proxy_config(sim, ledger), tmp_path)
    try:
        async def workload() -> list[Answer]:
            # 16 clients, each sending one request after the other: at least N_REQUESTS, and for
            # LOAD_S, so the once-a-second ledger gauges are read under load.
            done: list[Answer] = []
            counter = iter(range(1_000_000))
            end_s = time.monotonic() + LOAD_S
            async with httpx.AsyncClient(base_url=proxy.url, timeout=30,
                                         limits=httpx.Limits(max_connections=16)) as client:
                async def client_loop() -> None:
                    while len(done) < N_REQUESTS or time.monotonic() < end_s:
                        i = next(counter)
                        done.append(await send(client, KINDS[i % 4], TENANTS[(i + i // 4) % 2], 4 + i % 13))

                await asyncio.gather(*(client_loop() for _ in range(16)))
            return done

        with MetricsSampler(proxy) as sampler:
            answers = asyncio.run(workload())
            ids = [a.request_id for a in answers]
            assert len(set(ids)) == len(ids)
            final = finals(proxy, ids)
        print(f"\n[{store}] c=16, {len(answers)} requests in {LOAD_S} s: max joulegate_ledger_flush_lag_seconds "
              f"{sampler.max['joulegate_ledger_flush_lag_seconds']:.3f} s, max buffered records "
              f"{sampler.max['joulegate_ledger_buffered_records']:.0f}")
        assert sampler.max["joulegate_ledger_flush_lag_seconds"] < 5.0  # flushed every second

        for a in answers:
            f = final[a.request_id]
            assert f["tenant"] == a.tenant and f["backend"] == "h100" and f["joules"] > 0
            assert f["completion_tokens"] == a.completion_tokens
            if a.method == "measured":  # measured when it answered: the header is the final value
                assert f["joules"] == a.joules
        assert_ledger_matches(proxy, answers, final)
        by_tenant = get(proxy, "/v1/energy/usage?group_by=tenant,backend").json()["data"]
        assert {(row["tenant"], row["backend"]) for row in by_tenant} == {(t, "h100") for t in TENANTS}

        # Each request is in the store once, with its final joules.
        if store in ("sqlite", "postgres"):
            rows = (sqlite_requests(tmp_path / "ledger.db") if store == "sqlite"
                    else postgres_requests(ledger))
            assert rows == {a.request_id: (uj(final[a.request_id]["joules"]), a.completion_tokens)
                            for a in answers}
        elif store == "redis":
            rows = redis_requests(ledger)
            assert set(rows) == set(ids)
            for rid, row in rows.items():
                assert row[0] == rid and uj(row[6]) == uj(final[rid]["joules"])
    finally:
        proxy.stop()
    assert "Traceback" not in proxy.log()


# -- 2. SIGTERM under load: every answered request booked exactly once --------------------------


def test_sigterm_under_load_books_every_answered_request_once(
        sims: dict[str, SimBackend], tmp_path: Path) -> None:
    sim = sims["h100"]
    db = tmp_path / "ledger.db"
    config = proxy_config(sim, f"sqlite:///{db}")
    proxy = ProxyProc(config, tmp_path)
    answers: list[Answer] = []
    failures: list[str] = []
    after: list[str] = []  # what the clients got once the proxy was going away
    sigterm_s: float | None = None

    async def load() -> None:
        nonlocal sigterm_s
        async with httpx.AsyncClient(base_url=proxy.url, timeout=30,
                                     limits=httpx.Limits(max_connections=16)) as client:
            async def worker(w: int) -> None:
                nonlocal sigterm_s
                for i in range(10_000):
                    kind = ("chat", "stream_usage", "stream_comment")[(w + i) % 3]
                    try:
                        answer = await send(client, kind, TENANTS[w % 2], 16 + (w * 7 + i * 5) % 32)
                    except httpx.TransportError as exc:
                        (after if sigterm_s is not None else failures).append(f"{kind}: {exc!r}")
                        return
                    except AssertionError as exc:  # answered, but not with a complete 200
                        failures.append(f"{kind}: {exc}")
                        return
                    answers.append(answer)
                    if sigterm_s is None and len(answers) >= 32:
                        sigterm_s = time.monotonic()
                        proxy.popen.send_signal(signal.SIGTERM)

            await asyncio.gather(*(worker(w) for w in range(16)))

    try:
        asyncio.run(asyncio.wait_for(load(), 60))
        assert proxy.popen.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises it after draining
    finally:
        proxy.stop()
    log = proxy.log()
    assert not failures, failures
    assert sigterm_s is not None
    assert after, "no client saw the proxy go away"
    drained = [a for a in answers if a.done_s > sigterm_s]
    assert drained, "no request was in flight at SIGTERM"
    assert "Traceback" not in log and "not durable" not in log, log[-3000:]

    ids = [a.request_id for a in answers]
    assert len(set(ids)) == len(ids)
    restarted = ProxyProc(config, tmp_path)
    try:
        booked = finals(restarted, ids, measured=False)  # from the ledger: a new process
        for a in answers:
            assert booked[a.request_id]["tenant"] == a.tenant
            assert booked[a.request_id]["completion_tokens"] == a.completion_tokens
        total = usage_total(restarted)
        assert total["requests"] == len(answers), (total, len(answers), len(drained))
        assert total["completion_tokens"] == sum(a.completion_tokens for a in answers)
        assert uj(total["joules"]) == sum(uj(b["joules"]) for b in booked.values())
        rows = sqlite_requests(db)
        assert set(rows) == set(ids)
        print(f"\n{len(answers)} answered ({len(drained)} during the drain), "
              f"{len(after)} clients refused after SIGTERM; ledger rows {len(rows)}")
    finally:
        restarted.stop()
    assert "Traceback" not in restarted.log()


# -- 3. Redis down for 10 s under load ----------------------------------------------------------


def globex_with_budget() -> str:
    """The test tenants, globex with a budget it never reaches: its requests read the ledger."""
    tenants = tenants_yaml().replace(
        f"{{name: globex, api_keys_sha256: ['{sha256(KEYS['globex'])}']}}",
        f"{{name: globex, api_keys_sha256: ['{sha256(KEYS['globex'])}'], "
        "energy_budget: {joules: 1.0e9, per: day}}")
    assert "energy_budget" in tenants
    return tenants


def test_redis_outage_under_load_loses_nothing(
        sims: dict[str, SimBackend], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need_redis_server("no redis-server to start and stop")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    server = RedisServer(tmp_path, persist=True)  # AOF, fsync always: what was written survives
    server.start()
    proxy = ProxyProc(proxy_config(sims["h100"], server.url, globex_with_budget()), tmp_path)
    answers: list[Answer] = []
    failures: list[str] = []
    phase = {"name": "before", "outage_answers": 0}

    async def load() -> None:
        done, progress = asyncio.Event(), asyncio.Event()
        async with httpx.AsyncClient(base_url=proxy.url, timeout=30,
                                     limits=httpx.Limits(max_connections=8)) as client:
            async def worker(w: int) -> None:
                i = 0
                while not done.is_set():
                    kind = KINDS[(w + i) % 4]
                    i += 1
                    try:
                        answers.append(await send(client, kind, TENANTS[w % 2], 4 + (w + i) % 12))
                    except (httpx.HTTPError, AssertionError) as exc:
                        failures.append(f"{phase['name']} {kind}: {exc!r}")
                        progress.set()
                        return
                    finally:
                        progress.set()
                    if phase["name"] == "outage":
                        phase["outage_answers"] += 1

            async def until(n: int) -> None:
                while len(answers) < n and not failures:
                    progress.clear()
                    await progress.wait()

            async def script() -> None:
                try:
                    await until(16)
                    await asyncio.to_thread(server.kill)
                    phase["name"] = "outage"
                    await asyncio.sleep(10)  # the outage itself lasts 10 s, by the test's design
                    await asyncio.to_thread(server.start)
                    phase["name"] = "after"
                    await until(len(answers) + 16)
                finally:
                    done.set()

            await asyncio.gather(script(), *(worker(w) for w in range(8)))

    try:
        with MetricsSampler(proxy) as sampler:
            asyncio.run(asyncio.wait_for(load(), 60))
        assert not failures, failures
        assert phase["outage_answers"] >= 16, phase
        # The outage was felt: records were held back for seconds, not written.
        assert sampler.max["joulegate_ledger_flush_lag_seconds"] >= 3.0, sampler.max
        ids = [a.request_id for a in answers]
        final = finals(proxy, ids)

        def caught_up() -> bool:
            resp = get(proxy, "/v1/energy/usage")
            return resp.status_code == 200 and resp.json()["total"]["requests"] == len(answers)

        wait_until(caught_up, 20, "the ledger to catch up after Redis came back")
        assert_ledger_matches(proxy, answers, final)
        rows = redis_requests(server.url)
        assert set(rows) == set(ids)
        print(f"\nRedis outage: {len(answers)} answered, {phase['outage_answers']} during the outage; "
              f"max flush lag {sampler.max['joulegate_ledger_flush_lag_seconds']:.1f} s, max buffered "
              f"{sampler.max['joulegate_ledger_buffered_records']:.0f}")
    finally:
        proxy.stop()
        server.kill()
    assert "Traceback" not in proxy.log()


def test_frozen_redis_neither_stalls_requests_nor_double_counts(
        sims: dict[str, SimBackend], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis that takes connections and answers nothing (SIGSTOP: hung, or cut off by the
    network) for 3 s: requests keep their latency, also those of a tenant with a budget, and
    flushes that timed out (and may be applied once Redis wakes) count once."""
    need_redis_server("no redis-server to start and stop")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    server = RedisServer(tmp_path)
    server.start()
    proxy = ProxyProc(proxy_config(sims["h100"], server.url, globex_with_budget()), tmp_path)
    answers: list[Answer] = []
    failures: list[str] = []
    during: list[tuple[str, float]] = []  # (tenant, latency) of requests sent while frozen
    frozen = {"on": False}

    async def load() -> None:
        done, progress = asyncio.Event(), asyncio.Event()
        async with httpx.AsyncClient(base_url=proxy.url, timeout=30,
                                     limits=httpx.Limits(max_connections=4)) as client:
            async def worker(w: int) -> None:
                i = 0
                while not done.is_set():
                    kind, sent_frozen, t0 = ("chat", "embedding")[i % 2], frozen["on"], time.monotonic()
                    i += 1
                    try:
                        answers.append(await send(client, kind, TENANTS[w % 2], 3 + i % 8))
                    except (httpx.HTTPError, AssertionError) as exc:
                        failures.append(f"{kind}: {exc!r}")
                        return
                    finally:
                        progress.set()
                    if sent_frozen:
                        during.append((TENANTS[w % 2], time.monotonic() - t0))

            async def script() -> None:
                try:
                    while len(answers) < 8 and not failures:
                        progress.clear()
                        await progress.wait()
                    server.popen.send_signal(signal.SIGSTOP)
                    frozen["on"] = True
                    await asyncio.sleep(3)  # the freeze lasts 3 s, by the test's design
                finally:
                    frozen["on"] = False
                    server.popen.send_signal(signal.SIGCONT)
                    done.set()

            await asyncio.gather(script(), *(worker(w) for w in range(4)))

    try:
        asyncio.run(asyncio.wait_for(load(), 60))
        assert not failures, failures
        ids = [a.request_id for a in answers]
        final = finals(proxy, ids)

        def caught_up() -> bool:
            resp = get(proxy, "/v1/energy/usage")
            return resp.status_code == 200 and resp.json()["total"]["requests"] == len(answers)

        wait_until(caught_up, 20, "the ledger to catch up after Redis woke")
        assert_ledger_matches(proxy, answers, final)
        assert set(redis_requests(server.url)) == set(ids)
        worst = {t: max((lat for tt, lat in during if tt == t), default=0.0) for t in TENANTS}
        print(f"\nfrozen Redis: {len(during)} requests sent during the freeze; slowest by tenant {worst}")
        assert all(t in {tt for tt, _ in during} for t in TENANTS), during
        # Normally ~0.05 s each; a budget check that waits on the frozen store takes seconds.
        assert max(worst.values()) < 1.5, f"requests stalled while Redis was frozen: {worst}"
    finally:
        proxy.stop()
        server.kill()
    assert "Traceback" not in proxy.log()


# -- 4. tenants see only their own usage and requests -------------------------------------------


def test_tenant_isolation_and_auth_on_the_energy_api(sims: dict[str, SimBackend], tmp_path: Path) -> None:
    proxy = ProxyProc(proxy_config(sims["h100"], "memory://"), tmp_path)
    try:
        async def some() -> list[Answer]:
            async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as client:
                return await asyncio.gather(
                    send(client, "chat", "acme", 5), send(client, "embedding", "acme", 3),
                    send(client, "chat", "globex", 7))

        answers = asyncio.run(some())
        finals(proxy, [a.request_id for a in answers])  # booked once measured
        a_id, b_id = answers[0].request_id, answers[2].request_id
        acme, globex = KEYS["acme"], KEYS["globex"]

        # A sees its own usage only; asking for B's is refused, asking for its own is fine.
        own = get(proxy, "/v1/energy/usage?group_by=tenant", acme).json()
        assert [row["tenant"] for row in own["data"]] == ["acme"]
        assert own["total"]["requests"] == 2 and own["total"]["completion_tokens"] == 5
        assert usage_total(proxy, "?tenant=acme", acme) == own["total"]
        for key, other in ((acme, "globex"), (globex, "acme")):
            forbidden = get(proxy, f"/v1/energy/usage?tenant={other}&group_by=tenant", key)
            assert forbidden.status_code == 403
            assert set(forbidden.json()["error"]) == {"message", "type", "param", "code"}
            assert other not in get(proxy, "/v1/energy/usage?format=csv&group_by=tenant", key).text
        # ... and B's requests do not exist for A (nor A's for B).
        assert get(proxy, f"/v1/energy/requests/{b_id}", acme).status_code == 404
        assert get(proxy, f"/v1/energy/requests/{a_id}", globex).status_code == 404
        assert get(proxy, f"/v1/energy/requests/{a_id}", acme).json()["tenant"] == "acme"
        assert get(proxy, "/v1/energy/requests/no-such-request", acme).status_code == 404

        # The admin reads both.
        both = get(proxy, "/v1/energy/usage?group_by=tenant").json()
        assert {row["tenant"]: row["requests"] for row in both["data"]} == {"acme": 2, "globex": 1}
        assert usage_total(proxy, "?tenant=acme") == own["total"]
        assert usage_total(proxy, "?tenant=globex")["completion_tokens"] == 7
        assert get(proxy, f"/v1/energy/requests/{a_id}").json()["tenant"] == "acme"
        assert get(proxy, f"/v1/energy/requests/{b_id}").json()["tenant"] == "globex"

        # A bad or missing key is 401 on every /v1/energy/* route, before anything else.
        routes = ["/v1/energy/usage", "/v1/energy/usage?tenant=acme", "/v1/energy/usage?format=csv",
                  f"/v1/energy/requests/{a_id}", "/v1/energy/requests/no-such-request",
                  "/v1/energy/backends", "/v1/energy/no-such-route"]
        bad_headers: list[dict[str, str]] = [
            {}, auth("sk-not-a-key"), {"Authorization": "Bearer"}, {"Authorization": f"Basic {acme}"},
            {"Authorization": acme}, auth(sha256(acme)),
        ]
        for route in routes:
            for headers in bad_headers:
                resp = httpx.get(proxy.url + route, headers=headers, timeout=10)
                assert resp.status_code == 401, (route, headers, resp.text)
                error = resp.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}
                assert acme not in resp.text
    finally:
        proxy.stop()
    assert "Traceback" not in proxy.log()


# -- 5. no key material in the logs --------------------------------------------------------------


class DebugProxy(ProxyProc):
    """A proxy run with `--log-level debug`; its output goes to its log file."""

    def __init__(self, config_text: str, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = tmp / f"joulegate-debug-{self.port}.yaml"
        self.config_path.write_text(config_text)
        Proc.__init__(self, ["serve", "-c", str(self.config_path), "--port", str(self.port),
                             "--log-level", "debug"], tmp / f"proxy-debug-{self.port}.log", "proxy")
        wait_until(lambda: self.popen.poll() is not None or _ready(self.url), 30, "proxy to be ready")
        assert self.popen.poll() is None, self.log()


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_no_key_material_in_the_logs(sims: dict[str, SimBackend], tmp_path: Path) -> None:
    invalid = f"sk-invalid-{uuid.uuid4().hex}"
    in_body = f"sk-body-{uuid.uuid4().hex}"
    in_id = f"sk-id-{uuid.uuid4().hex}"
    in_header = f"sk-header-{uuid.uuid4().hex}"
    secrets = [*KEYS.values(), ADMIN_KEY, invalid, in_body, in_id, in_header]
    proxy = DebugProxy(proxy_config(sims["h100"], f"sqlite:///{tmp_path / 'ledger.db'}"), tmp_path)
    responses: list[httpx.Response] = []
    try:
        chat = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4}
        with httpx.Client(base_url=proxy.url, timeout=30) as client:
            def post(key: str | None, **kw: Any) -> httpx.Response:
                headers = {**(auth(key) if key else {}), **kw.pop("headers", {})}
                resp = client.post("/v1/chat/completions", headers=headers, **kw)
                responses.append(resp)
                return resp

            ok = post(KEYS["acme"], json=chat)
            assert ok.status_code == 200
            assert post(KEYS["globex"], json={**chat, "stream": True}).status_code == 200
            assert post(ADMIN_KEY, json=chat).status_code == 200
            assert post(invalid, json=chat).status_code == 401
            assert post(None, json=chat).status_code == 401
            assert post(None, json=chat, headers={"Authorization": f"Basic {KEYS['acme']}"}).status_code == 401
            # A key inside a body that is not JSON, and inside an over-long (ignored) request id.
            bad = post(KEYS["acme"], content=f'{{"model": "{MODEL}", "api_key": "{in_body}", '.encode(),
                       headers={"content-type": "application/json"})
            assert bad.status_code == 400
            long_id = post(KEYS["acme"], json=chat, headers={"x-request-id": in_id + "-" * 200,
                                                             "x-api-key": in_header, "api-key": in_header})
            assert long_id.status_code == 200 and in_id not in long_id.headers["x-request-id"]
            assert post(invalid, json={**chat, "model": in_body}).status_code == 401
            for key in (KEYS["acme"], ADMIN_KEY, invalid):
                responses.append(client.get("/v1/energy/usage", headers=auth(key)))
                responses.append(client.get(f"/v1/energy/requests/{ok.headers['x-request-id']}",
                                            headers=auth(key)))
            responses.append(client.get("/v1/models", headers=auth(invalid)))
            finals(proxy, [ok.headers["x-request-id"]])
    finally:
        proxy.stop()
    log = proxy.log()
    assert "DEBUG" in log  # the debug level is on: the search covers it
    for secret in secrets:
        digest = hashlib.sha256(secret.encode()).hexdigest()
        for needle in (secret, secret[3:], digest, digest[:8]):
            assert needle not in log, f"key material {needle[:6]}... in the proxy log"
    # Nor is any key echoed to a client.
    for resp in responses:
        echoed = resp.text + str(resp.headers)
        for secret in secrets:
            assert secret not in echoed, (resp.status_code, resp.text)


# -- 6. budgets: 429 insufficient_quota, nothing reaches a backend -------------------------------


BUDGET_KEY = "sk-test-frugal-0004"
BUDGET_J = 60.0


def frugal_proxy(sim: SimBackend, tmp: Path, key: str, budget_j: float) -> ProxyProc:
    """A proxy on a SQLite ledger, with a third tenant `frugal` (key `key`) on a daily budget."""
    tenants = tenants_yaml().replace(
        "admin_api_keys_sha256", f"  - {{name: frugal, api_keys_sha256: ['{sha256(key)}'], "
        f"energy_budget: {{joules: {budget_j}, per: day}}}}\nadmin_api_keys_sha256")
    return ProxyProc(proxy_config(sim, f"sqlite:///{tmp / 'ledger.db'}", tenants), tmp)


@pytest.fixture(scope="module")
def ledger_proxy(sims: dict[str, SimBackend], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProc]:
    """A proxy on a SQLite ledger, with a third tenant on a small daily energy budget."""
    proxy = frugal_proxy(sims["h100"], tmp_path_factory.mktemp("ledger-proxy"), BUDGET_KEY, BUDGET_J)
    yield proxy
    proxy.stop()
    assert "Traceback" not in proxy.log()


def test_over_budget_tenant_gets_429_and_nothing_reaches_a_backend(
        ledger_proxy: ProxyProc, sims: dict[str, SimBackend]) -> None:
    sim = sims["h100"]
    client = openai.OpenAI(base_url=ledger_proxy.url + "/v1", api_key=BUDGET_KEY, max_retries=0)
    accepted: list[tuple[str, float, float]] = []  # (id, x-energy-joules, remaining header)
    spent_uj = 0  # the ledger's view of the accepted requests so far: their finals
    refused_first: openai.RateLimitError | None = None
    for _ in range(30):
        try:
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=MESSAGES, max_tokens=24)
        except openai.RateLimitError as exc:
            refused_first = exc
            break
        rid, joules = raw.headers["x-request-id"], float(raw.headers["x-energy-joules"])
        remaining = float(raw.headers["x-energy-budget-remaining-joules"])
        accepted.append((rid, joules, remaining))
        # Before this request the budget had BUDGET_J minus the finals of the earlier ones left;
        # the header subtracts this request's own (response-time) joules.
        assert remaining == pytest.approx(max(BUDGET_J - spent_uj / UJ - joules, 0.0), abs=1e-5)
        spent_uj += uj(finals(ledger_proxy, [rid])[rid]["joules"])  # measured before the next one
        # Reading usage flushes the ledger, so the next budget check reads a settled store.
        assert uj(usage_total(ledger_proxy, "?tenant=frugal")["joules"]) == spent_uj
    assert refused_first is not None, f"{len(accepted)} requests never exhausted {BUDGET_J} J"
    assert refused_first.code == "insufficient_quota" and refused_first.status_code == 429
    assert isinstance(refused_first.body, dict) and refused_first.body["type"] == "insufficient_quota"
    assert len(accepted) >= 1 and spent_uj >= BUDGET_J * UJ
    # What was left before each accepted request (from its headers) went down every time.
    lefts = [remaining + joules for _, joules, remaining in accepted if remaining > 0]
    assert all(b < a for a, b in zip(lefts, lefts[1:], strict=False)), lefts
    assert accepted[0][2] < BUDGET_J

    # Every kind of request is refused now, and the simulator never sees one of them.
    refused_ids = [refused_first.response.headers["x-request-id"]]
    calls = [
        lambda h: client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, extra_headers=h),
        lambda h: client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, stream=True,
                                                 extra_headers=h),
        lambda h: client.completions.create(model=MODEL, prompt="joules", max_tokens=4, extra_headers=h),
        lambda h: client.embeddings.create(model=MODEL, input="joules", extra_headers=h),
    ]
    for call in calls:
        rid = f"over-budget-{uuid.uuid4().hex}"
        with pytest.raises(openai.RateLimitError) as refused:
            call({"x-request-id": rid})
        assert refused.value.code == "insufficient_quota"
        assert refused.value.response.headers["x-request-id"] == rid
        refused_ids.append(rid)
    for rid in refused_ids:
        assert httpx.get(f"{sim.url}/sim/requests/{rid}", timeout=5).status_code == 404, rid
        assert get(ledger_proxy, f"/v1/energy/requests/{rid}").status_code == 404
    for rid, _, _ in accepted:
        assert httpx.get(f"{sim.url}/sim/requests/{rid}", timeout=5).status_code == 200
    # The ledger bills the accepted requests only; other tenants are not affected.
    total = usage_total(ledger_proxy, "?tenant=frugal")
    assert total["requests"] == len(accepted) and uj(total["joules"]) == spent_uj
    other = openai.OpenAI(base_url=ledger_proxy.url + "/v1", api_key=KEYS["acme"], max_retries=0)
    raw = other.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert "x-energy-budget-remaining-joules" not in raw.headers


# -- 7. `joulegate usage` prints what the API answers ----------------------------------------------


def cli_usage(config_path: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "proxy", "usage", "-c", str(config_path), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_usage_cli_prints_the_api_totals(ledger_proxy: ProxyProc) -> None:
    async def workload() -> list[Answer]:
        async with httpx.AsyncClient(base_url=ledger_proxy.url, timeout=30) as client:
            return await asyncio.gather(*(send(client, KINDS[i % 4], TENANTS[i % 2], 3 + i) for i in range(8)))

    answers = asyncio.run(workload())
    finals(ledger_proxy, [a.request_id for a in answers])
    group = "tenant,model,backend"
    api = get(ledger_proxy, f"/v1/energy/usage?group_by={group}").json()  # flushes the ledger
    assert api["total"]["requests"] >= len(answers)
    config = ledger_proxy.config_path

    assert json.loads(cli_usage(config, "--format", "json", "--group-by", group)) == api
    assert json.loads(cli_usage(config, "--format", "json", "--group-by", group, "--tenant", "acme")) == \
        get(ledger_proxy, f"/v1/energy/usage?group_by={group}&tenant=acme").json()

    text = cli_usage(config, "--format", "csv", "--group-by", group)
    assert text == get(ledger_proxy, f"/v1/energy/usage?group_by={group}&format=csv").text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert sum(int(r["requests"]) for r in rows) == api["total"]["requests"]
    assert sum(int(r["completion_tokens"]) for r in rows) == api["total"]["completion_tokens"]
    assert sum(Decimal(r["joules"]) for r in rows) * UJ == uj(api["total"]["joules"])

    table = cli_usage(config, "--format", "table", "--group-by", group)
    total_line = [line for line in table.splitlines() if line.startswith("TOTAL")]
    assert len(total_line) == 1, table
    numbers = total_line[0].split()[1:]
    t = api["total"]
    assert numbers == [str(t["requests"]), str(t["prompt_tokens"]), str(t["completion_tokens"]),
                       str(t["reasoning_tokens"]), f"{t['joules']:.3f}", f"{t['joules_all_in']:.3f}",
                       f"{t['gco2e']:.4f}"], table
    for tenant in TENANTS:
        assert any(line.startswith(tenant) for line in table.splitlines()), table


def test_usage_cli_with_postgres_down_says_one_line_without_the_password(tmp_path: Path) -> None:
    config = tmp_path / "joulegate.yaml"
    config.write_text("backends:\n" + backend_yaml("h100", "http://127.0.0.1:9", [MODEL]) +
                      f"ledger: 'postgresql://jg:s3cret-pw@127.0.0.1:{free_port()}/jg?connect_timeout_s=0.5'\n")
    done = subprocess.run([sys.executable, "-m", "proxy", "usage", "-c", str(config)],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("joulegate: error: cannot read the ledger"), done.stderr
    assert "s3cret-pw" not in done.stderr
