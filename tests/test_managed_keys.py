"""Managed API keys: made, listed and revoked through the admin API, stored as SHA-256 only in
the ledger's store, and revoked on every replica sharing that store within a second. A key's
own energy budget refuses that key alone once spent, across replicas sharing the store.

Real sockets throughout: the proxy under uvicorn, a simulated backend, the openai SDK as client.
Redis tests claim database 5 (no other test uses it) and a key prefix of their own.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis

from proxy.cli import main
from proxy.keystore import open_keystore
from proxy.keystore.base import ManagedKey
from proxy.stores import parse_store
from tests.conftest import (
    ADMIN_KEY,
    KEYS,
    MODEL,
    ProxyProc,
    SimBackend,
    backend_yaml,
    tenants_yaml,
    wait_until,
)
from tests.postgres_support import fresh_database, usable_postgres
from tests.redis_support import usable_redis
from tests.test_accounting import MESSAGES, finals, usage_total
from tests.test_budget_holds import SITES

#: The Redis database these tests (and tests/test_rate_limits.py) write to; no other test does.
REDIS_DB = 5


def keys_config(sim: SimBackend, ledger: str, tenants: str | None = None, extra: str = "") -> str:
    """One simulated backend (no power source: nothing here is about joules), the test tenants."""
    return ("backends:\n" + backend_yaml("h100", sim.url, [MODEL]) + f"ledger: '{ledger}'\n"
            + "cluster: {enabled: false}\ngovernor: {mode: 'off'}\n"
            + (tenants if tenants is not None else tenants_yaml()) + extra)


def admin(proxy: ProxyProc, method: str, path: str = "", key: str = ADMIN_KEY, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{proxy.url}/v1/admin/keys{path}", timeout=10,
                         headers={"Authorization": f"Bearer {key}"}, **kwargs)


def create(proxy: ProxyProc, **body: Any) -> dict[str, Any]:
    resp = admin(proxy, "POST", json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()


def chat_status(proxy: ProxyProc, key: str) -> int:
    """Status of one tiny chat completion through the SDK with `key` (200, else the error's)."""
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0, timeout=30)
    try:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        return 200
    except openai.APIStatusError as exc:
        return exc.status_code
    finally:
        client.close()


@pytest.fixture(scope="module")
def redis_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with usable_redis(tmp_path_factory, "redis-keys") as url:
        yield url.rsplit("/", 1)[0] + f"/{REDIS_DB}"


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[str]:
    with usable_postgres() as url:
        yield url


def shared_ledger(store: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A ledger URL of its own on a shared store: a fresh key prefix, or a fresh database."""
    if store == "redis":
        prefix = f"jgtest-keys-{uuid.uuid4().hex[:8]}:"
        url = request.getfixturevalue("redis_base")
        yield f"{url}?key_prefix={prefix}"
        client = redis.Redis.from_url(url)
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)
        client.close()
    else:
        with fresh_database(request.getfixturevalue("postgres_server")) as url:
            yield url


@pytest.fixture(params=["redis", "postgresql"])
def shared_store(request: pytest.FixtureRequest) -> Iterator[str]:
    yield from shared_ledger(request.param, request)


def test_create_use_list_revoke(sims: dict[str, SimBackend], tmp_path: Path) -> None:
    proxy = ProxyProc(keys_config(sims["h100"], f"sqlite:///{tmp_path / 'ledger.db'}"), tmp_path)
    try:
        made = create(proxy, tenant="initech", name="ci bot", rpm=100)
        assert made["key"].startswith("sk-") and made["id"].startswith("key_")
        assert {"id", "key", "tenant", "name", "created_at", "expires_at", "rpm", "tpm", "energy_budget"} <= set(made)
        assert (made["tenant"], made["name"], made["rpm"], made["tpm"], made["expires_at"]) == (
            "initech", "ci bot", 100, None, None)
        # A tenant the config does not know: its requests are billed under that name.
        assert chat_status(proxy, made["key"]) == 200
        usage = httpx.get(proxy.url + "/v1/energy/usage", headers={"Authorization": f"Bearer {made['key']}"},
                          timeout=10).json()
        assert usage["total"]["requests"] == 1

        listed = admin(proxy, "GET")
        assert listed.status_code == 200
        (entry,) = [k for k in listed.json()["data"] if k["id"] == made["id"]]
        assert entry["revoked"] is False and entry["tenant"] == "initech"
        # The secret is shown once: never listed, nor its digest.
        from proxy.auth import key_digest
        assert made["key"] not in listed.text and key_digest(made["key"]) not in listed.text
        assert "key" not in entry and "sha256" not in entry
        assert made["key"] not in admin(proxy, "GET", f"/{made['id']}").text

        revoked = admin(proxy, "DELETE", f"/{made['id']}")
        assert revoked.status_code == 200 and revoked.json()["revoked"] is True
        assert chat_status(proxy, made["key"]) == 401  # this replica installs it at once
        again = admin(proxy, "DELETE", f"/{made['id']}")  # idempotent
        assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]
        assert chat_status(proxy, KEYS["acme"]) == 200  # config keys unaffected
    finally:
        proxy.stop()
    log = proxy.log()
    assert "Traceback" not in log and made["key"] not in log

    # The store kept it (revoked) across a restart: SQLite holds the digest, never the key.
    assert made["key"].encode() not in (tmp_path / "ledger.db").read_bytes()
    proxy = ProxyProc(keys_config(sims["h100"], f"sqlite:///{tmp_path / 'ledger.db'}"), tmp_path)
    try:
        assert chat_status(proxy, made["key"]) == 401
        assert [k["revoked"] for k in admin(proxy, "GET").json()["data"]] == [True]
    finally:
        proxy.stop()


def test_revocation_reaches_a_second_replica_within_a_second(
        sims: dict[str, SimBackend], tmp_path: Path, shared_store: str) -> None:
    a = ProxyProc(keys_config(sims["h100"], shared_store), tmp_path)
    b = ProxyProc(keys_config(sims["h100"], shared_store), tmp_path)
    try:
        made = create(a, tenant="acme", name="replicated")
        # Made on A, usable on B once B's refresh has seen it.
        wait_until(lambda: chat_status(b, made["key"]) == 200, 5, "the new key to work on replica B")
        assert [k["id"] for k in admin(b, "GET").json()["data"]] == [made["id"]]
        assert admin(a, "DELETE", f"/{made['id']}").status_code == 200
        revoked_at = time.monotonic()
        wait_until(lambda: chat_status(b, made["key"]) == 401, 5, "replica B to refuse the revoked key")
        took_s = time.monotonic() - revoked_at
        assert took_s < 1.0, f"revocation took {took_s:.2f} s to reach replica B"
        assert chat_status(a, KEYS["acme"]) == chat_status(b, KEYS["globex"]) == 200
    finally:
        a.stop()
        b.stop()
    assert "Traceback" not in a.log() + b.log()


def test_an_expired_key_is_refused(keys_proxy: ProxyProc) -> None:
    made = create(keys_proxy, tenant="acme", expires_at=time.time() + 1.0)
    assert made["expires_at"].endswith("Z")
    assert chat_status(keys_proxy, made["key"]) == 200
    wait_until(lambda: chat_status(keys_proxy, made["key"]) == 401, 5, "the key to expire")
    iso = create(keys_proxy, tenant="acme", expires_at="2999-01-01T00:00:00Z")
    assert iso["expires_at"] == "2999-01-01T00:00:00Z" and chat_status(keys_proxy, iso["key"]) == 200


@pytest.mark.parametrize(("body", "param"), [
    ({}, "tenant"),
    ({"tenant": ""}, "tenant"),
    ({"tenant": "admin"}, "tenant"),
    ({"tenant": 7}, "tenant"),
    ({"tenant": "a\nb"}, "tenant"),
    ({"tenant": "acme", "rpm": 0}, "rpm"),
    ({"tenant": "acme", "tpm": "100"}, "tpm"),
    ({"tenant": "acme", "rpm": True}, "rpm"),
    ({"tenant": "acme", "expires_at": "yesterday"}, "expires_at"),
    ({"tenant": "acme", "expires_at": 1.0}, "expires_at"),
    ({"tenant": "acme", "expires_at": 1e300}, "expires_at"),
    ({"tenant": "acme", "name": ["x"]}, "name"),
    ({"tenant": "acme", "energy_budget": {"joules": 0}}, "energy_budget"),
    ({"tenant": "acme", "energy_budget": {"joules": 5, "gco2e": 1}}, "energy_budget"),
    ({"tenant": "acme", "energy_budget": {"per": "day"}}, "energy_budget"),
    ({"tenant": "acme", "energy_budget": {"joules": 5, "per": "week"}}, "energy_budget"),
    ({"tenant": "acme", "energy_budget": {"joules": 5, "watts": 1}}, "energy_budget"),
    ({"tenant": "acme", "energy_budget": "5000 J"}, "energy_budget"),
    # This proxy's backend has no site: it books no grams, so a gram budget could never bite.
    ({"tenant": "acme", "energy_budget": {"gco2e": 1}}, "energy_budget"),
    ({"tenant": "acme", "secret": "sk-mine"}, "secret"),
])
def test_bad_input_is_a_400(body: dict[str, Any], param: str, keys_proxy: ProxyProc) -> None:
    resp = admin(keys_proxy, "POST", json=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)


def test_only_admin_keys_manage_keys(keys_proxy: ProxyProc) -> None:
    for raw in (b"not json", b"[1, 2]"):
        resp = admin(keys_proxy, "POST", content=raw)
        assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"
    for method, path in (("GET", ""), ("POST", ""), ("DELETE", "/key_0"), ("GET", "/key_0")):
        resp = admin(keys_proxy, method, path, key=KEYS["acme"], json={"tenant": "acme"})
        assert resp.status_code == 403, resp.text
        assert resp.json()["error"]["code"] == "forbidden"
        assert admin(keys_proxy, method, path, key="sk-nobody").status_code == 401
    assert admin(keys_proxy, "DELETE", "/key_missing").json()["error"]["code"] == "key_not_found"
    assert admin(keys_proxy, "PUT").status_code == 405
    assert admin(keys_proxy, "POST", "/key_0").status_code == 405
    assert admin(keys_proxy, "GET", "/").status_code == 404
    assert "Traceback" not in keys_proxy.log()


@pytest.fixture(scope="module")
def keys_proxy(sims: dict[str, SimBackend], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProc]:
    proxy = ProxyProc(keys_config(sims["h100"], "memory://"), tmp_path_factory.mktemp("keys"))
    yield proxy
    proxy.stop()


@pytest.mark.parametrize("store", ["memory", "sqlite", "redis", "postgresql"])
def test_every_store_keeps_keys_and_versions(store: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    urls = {"memory": iter(["memory://"]), "sqlite": iter([f"sqlite:///{tmp_path / 'l.db'}"])}
    ledgers = urls.get(store) or shared_ledger(store, request)
    url = next(ledgers)

    async def body() -> None:
        keystore = open_keystore(parse_store(url))
        await keystore.start()
        try:
            assert await keystore.version() == 0 and await keystore.all() == []
            key = ManagedKey(id="key_1", sha256="ab" * 32, tenant="acme", name=None, created_at_s=1.5, tpm=9,
                             energy_budget={"gco2e": 2.5, "per": "month"})
            await keystore.put(key)
            first = await keystore.version()
            assert await keystore.get("key_1") == key and await keystore.get("key_2") is None
            await keystore.put(key.revoked(2.5))
            assert await keystore.version() != first
            assert [(k.revoked_at_s, k.energy_budget) for k in await keystore.all()] == [
                (2.5, {"gco2e": 2.5, "per": "month"})]
        finally:
            await keystore.close()

    asyncio.run(body())
    for _ in ledgers:  # the shared store's clean-up
        pass


def test_a_key_stored_before_key_budgets_reads_without_one() -> None:
    old = orjson.dumps({"id": "key_0", "sha256": "ab" * 32, "tenant": "acme", "name": "old", "created_at_s": 1.0,
                        "expires_at_s": None, "rpm": None, "tpm": None, "revoked_at_s": None})
    key = ManagedKey.from_json(old)
    assert key.energy_budget is None and key.view()["energy_budget"] is None


def joulegate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`joulegate ARGS` in this process (the same parser and code as the console script):
    exit status, stdout, stderr."""
    try:
        status = main(list(args))
    except SystemExit as exc:
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


def test_the_keys_commands_drive_the_admin_api(keys_proxy: ProxyProc, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JG_TEST_ADMIN", ADMIN_KEY)
    where = ("--url", keys_proxy.url, "--admin-key-env", "JG_TEST_ADMIN")
    status, out, err = joulegate(capsys, "keys", "create", "--tenant", "cli-tenant", "--name", "from the CLI",
                                 "--rpm", "50", "--expires", "2999-01-01T00:00:00Z", "--json", *where)
    assert status == 0, err
    key = json.loads(out)
    assert (key["tenant"], key["rpm"], key["expires_at"]) == ("cli-tenant", 50, "2999-01-01T00:00:00Z")
    assert chat_status(keys_proxy, key["key"]) == 200

    status, out, err = joulegate(capsys, "keys", "list", *where)
    assert status == 0, err
    assert key["id"] in out and "from the CLI" in out and key["key"] not in out
    as_json = json.loads(joulegate(capsys, "keys", "list", "--json", *where)[1])
    assert key["id"] in [k["id"] for k in as_json["data"]]

    # An energy budget: an amount in one unit and a period (a day unless given); listed with it.
    status, out, err = joulegate(capsys, "keys", "create", "--tenant", "cli-budget", "--name", "capped",
                                 "--energy-budget-joules", "5000", "--energy-budget-per", "hour", "--json", *where)
    assert status == 0, err
    capped = json.loads(out)
    assert capped["energy_budget"] == {"joules": 5000.0, "per": "hour"}
    status, out, err = joulegate(capsys, "keys", "create", "--tenant", "cli-budget", "--energy-budget-joules",
                                 "12.5", *where)
    assert status == 0 and re.search(r"^budget: +12.5 J/day$", out, re.M), out
    out = joulegate(capsys, "keys", "list", *where)[1]
    (row,) = [line for line in out.splitlines() if capped["id"] in line]
    assert "5000 J/hour" in row and "energy_budget" in out.splitlines()[0]
    # A budget in grams needs a site on every backend; this proxy's has none: the API's 400, one line.
    status, _, err = joulegate(capsys, "keys", "create", "--tenant", "t", "--energy-budget-gco2e", "3", *where)
    assert status == 1 and "HTTP 400" in err and "site" in err and err.count("\n") == 1

    status, out, _ = joulegate(capsys, "keys", "revoke", key["id"], *where)
    assert status == 0 and f"revoked {key['id']}" in out
    assert chat_status(keys_proxy, key["key"]) == 401

    status, out, _ = joulegate(capsys, "keys", "create", "--tenant", "cli-tenant", *where)
    assert status == 0 and re.search(r"^key: +sk-\S+$", out, re.M)
    status, _, err = joulegate(capsys, "keys", "revoke", "key_nope", *where)
    assert status == 1 and err.count("\n") == 1 and "HTTP 404" in err
    monkeypatch.setenv("JG_TEST_ADMIN", KEYS["acme"])
    status, _, err = joulegate(capsys, "keys", "list", *where)
    assert status == 1 and "HTTP 403" in err


@pytest.mark.parametrize("args", [
    ("keys", "create", "--tenant", "t", "--energy-budget-joules", "0"),
    ("keys", "create", "--tenant", "t", "--energy-budget-joules", "nan"),
    ("keys", "create", "--tenant", "t", "--energy-budget-joules", "5", "--energy-budget-gco2e", "1"),
    ("keys", "create", "--tenant", "t", "--energy-budget-joules", "5", "--energy-budget-per", "week"),
    ("keys", "create", "--tenant", "t", "--energy-budget-per", "day"),
    ("keys", "create", "--tenant", "t", "--rpm", "0"),
    ("keys", "create", "--tenant", "t", "--tpm", "many"),
    ("keys", "create", "--tenant", "t", "--expires", "next week"),
    ("keys", "create", "--rpm", "5"),
    ("keys", "list", "--url", "127.0.0.1:8080"),
    ("keys", "revoke"),
    ("keys", "list", "--admin-key-env", "JG_TEST_UNSET_VARIABLE"),
])
def test_bad_flags_exit_2_with_one_line(args: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = joulegate(capsys, *args)
    assert status == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err


# -- a key's own energy budget ---------------------------------------------------------------------

#: Tenant acme's own budget in the budget tests: far above anything they spend.
TENANT_BUDGET_J = 1e6


def budget_config(sim: SimBackend, ledger: str) -> str:
    """The simulated H100 with a power source at site `north` (requests book joules and grams);
    tenant acme on a daily budget of TENANT_BUDGET_J. 2 s for a store's holds: these tests are
    about what a budget counts, not a slow store."""
    power = f", power: {{source: sim, url: '{sim.url}', interval_s: 0.05}}, site: north"
    tenants = tenants_yaml().replace("{name: acme,", f"{{name: acme, energy_budget: {{joules: {TENANT_BUDGET_J}}},")
    return ("backends:\n" + backend_yaml("h100", sim.url, [MODEL], power) + f"ledger: '{ledger}'\n" + tenants
            + SITES + "cluster: {enabled: false}\ngovernor: {mode: 'off'}\nenergy_budget_timeout_ms: 2000\n")


def chat_raw(proxy: ProxyProc, key: str) -> tuple[int, httpx.Headers, dict[str, Any]]:
    """One chat completion through the SDK: status, headers, and the error object if refused."""
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0, timeout=30)
    try:
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=8)
        return 200, raw.headers, {}
    except openai.APIStatusError as exc:
        return exc.status_code, exc.response.headers, exc.response.json()["error"]
    finally:
        client.close()


def booked(proxy: ProxyProc, headers: httpx.Headers, unit: str = "joules") -> float:
    """The request's measured joules (or grams CO2e) once booked; reading usage after it flushes
    the ledger, so the store's spend holds it before the next request."""
    rid = headers["x-request-id"]
    value = float(finals(proxy, [rid])[rid][unit])
    usage_total(proxy)
    return value


def known_on(proxy: ProxyProc, key: str) -> bool:
    """Whether `proxy` knows a managed key yet (a usage read: it spends nothing)."""
    return httpx.get(proxy.url + "/v1/energy/usage", headers={"Authorization": f"Bearer {key}"},
                     timeout=10).status_code == 200


def assert_refused_for_key(status: int, headers: httpx.Headers, error: dict[str, Any], made: dict[str, Any],
                           unit: str) -> None:
    """A 429 naming the key (id and name, never its secret) and its budget."""
    assert status == 429, (status, error)
    assert (error["code"], error["type"]) == ("insufficient_quota", "insufficient_quota")
    assert made["id"] in error["message"] and made["name"] in error["message"], error
    assert made["key"] not in error["message"] and "Tenant" not in error["message"]
    assert ("gCO2e per day" if unit == "gco2e" else " J per day") in error["message"], error
    assert headers[f"x-energy-budget-remaining-{unit}"] == "0.0"


def spend_until_refused(replicas: Sequence[ProxyProc], key: str, budget: float, unit: str = "joules"
                        ) -> tuple[tuple[int, httpx.Headers, dict[str, Any]], float, int]:
    """Requests with `key`, round robin over `replicas`, each on a settled ledger, until one is
    refused; every answer's remaining header (in `unit`) is the budget less what the key spent
    before it and its own cost. Returns the refusal, what was spent and how many were served."""
    spent = 0.0
    cost_header = "x-energy-joules" if unit == "joules" else "x-energy-gco2e"
    for served in range(20):
        proxy = replicas[served % len(replicas)]
        answer = chat_raw(proxy, key)
        status, headers, _ = answer
        if status != 200:
            return answer, spent, served
        assert float(headers[f"x-energy-budget-remaining-{unit}"]) == pytest.approx(
            max(budget - spent - float(headers[cost_header]), 0.0), abs=2e-6)
        if unit == "gco2e":  # budgets in different units: one header each (the tenant's is in J)
            assert float(headers["x-energy-budget-remaining-joules"]) > TENANT_BUDGET_J - 100
        spent += booked(proxy, headers, unit)
    raise AssertionError("the key's budget never ran out")


def test_a_key_budget_refuses_that_key_while_its_tenant_keeps_working(
        sims: dict[str, SimBackend], tmp_path: Path) -> None:
    proxy = ProxyProc(budget_config(sims["h100"], f"sqlite:///{tmp_path / 'ledger.db'}"), tmp_path)
    try:
        status, headers, _ = chat_raw(proxy, KEYS["acme"])
        assert status == 200
        budget_j = 2.5 * booked(proxy, headers)  # about three requests like it
        capped = create(proxy, tenant="acme", name="capped", energy_budget={"joules": budget_j})
        assert capped["energy_budget"] == {"joules": budget_j, "per": "day"}
        free = create(proxy, tenant="acme", name="free")
        # The header shows the key's remaining (the tighter budget), not the tenant's.
        refusal, spent_j, _ = spend_until_refused([proxy], capped["key"], budget_j)
        assert_refused_for_key(*refusal, capped, "joules")
        assert spent_j >= budget_j
        # The same tenant's other keys keep working, on the tenant's budget alone.
        status, headers, _ = chat_raw(proxy, free["key"])
        assert status == 200 and float(headers["x-energy-budget-remaining-joules"]) > TENANT_BUDGET_J - 100
        assert chat_status(proxy, KEYS["acme"]) == 200
        # The key's spend is billed to its tenant and nowhere else: no subject in usage.
        rows = httpx.get(proxy.url + "/v1/energy/usage?group_by=tenant", timeout=10,
                         headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["data"]
        assert [row["tenant"] for row in rows] == ["acme"]
        # Revoked, it is still listed with its budget.
        assert admin(proxy, "DELETE", f"/{capped['id']}").status_code == 200
        (listed,) = [k for k in admin(proxy, "GET").json()["data"] if k["id"] == capped["id"]]
        assert listed["revoked"] is True and listed["energy_budget"] == {"joules": budget_j, "per": "day"}
        assert admin(proxy, "GET", f"/{free['id']}").json()["energy_budget"] is None
    finally:
        proxy.stop()
    assert "Traceback" not in proxy.log() and capped["key"] not in proxy.log()


def test_a_gram_key_budget_under_a_joule_tenant_budget_shows_both(
        sims: dict[str, SimBackend], tmp_path: Path) -> None:
    proxy = ProxyProc(budget_config(sims["h100"], "memory://"), tmp_path)
    try:
        status, headers, _ = chat_raw(proxy, KEYS["acme"])
        assert status == 200
        budget_g = 2.5 * booked(proxy, headers, "gco2e")
        green = create(proxy, tenant="acme", name="green", energy_budget={"gco2e": budget_g, "per": "day"})
        refusal, spent_g, _ = spend_until_refused([proxy], green["key"], budget_g, "gco2e")
        assert_refused_for_key(*refusal, green, "gco2e")
        assert spent_g >= budget_g
        assert chat_status(proxy, KEYS["acme"]) == 200
    finally:
        proxy.stop()
    assert "Traceback" not in proxy.log()


def test_a_key_budget_is_shared_by_replicas(sims: dict[str, SimBackend], tmp_path: Path, shared_store: str) -> None:
    a = ProxyProc(budget_config(sims["h100"], shared_store), tmp_path)
    b = ProxyProc(budget_config(sims["h100"], shared_store), tmp_path)
    try:
        status, headers, _ = chat_raw(a, KEYS["acme"])
        assert status == 200
        budget_j = 2.5 * booked(a, headers)
        capped = create(a, tenant="acme", name="shared", energy_budget={"joules": budget_j})
        wait_until(lambda: known_on(b, capped["key"]), 5, "replica B to know the key")
        # Alternating replicas: each sees what the other spent (the store's spend, not its own).
        refusal, _, served = spend_until_refused([a, b], capped["key"], budget_j)
        assert served >= 2, "both replicas served the key before its budget ran out"
        assert_refused_for_key(*refusal, capped, "joules")
        other = (a, b)[(served + 1) % 2]  # the other replica refuses it as well
        assert_refused_for_key(*chat_raw(other, capped["key"]), capped, "joules")
        assert chat_status(a, KEYS["acme"]) == chat_status(b, KEYS["acme"]) == 200
    finally:
        a.stop()
        b.stop()
    assert "Traceback" not in a.log() + b.log()
