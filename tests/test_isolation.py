"""Tenants are isolated and secrets stay secret (issue 7, item 5), end to end: real proxies, a
simulated H100, and a tiny capture upstream that records the headers it receives.

Already asserted elsewhere, not repeated here:
- 404 for another tenant's request id, 403 for `?tenant=other`, other tenants' rows absent from
  JSON and CSV usage, the admin sees all, 401 on every /v1/energy/* route for a bad or missing
  key without echoing it: tests/test_accounting.py::test_tenant_isolation_and_auth_on_the_energy_api
- no key material (keys, digests, prefixes) in the DEBUG log nor echoed to a client:
  tests/test_accounting.py::test_no_key_material_in_the_logs
- an over-budget tenant is refused before any GPU sees it; other tenants are not:
  tests/test_accounting.py::test_over_budget_tenant_gets_429_and_nothing_reaches_a_backend
- 401s never echo the key; tenant and admin keys never stand for each other: tests/test_auth.py
- the same ledger record replayed is billed once: tests/test_ledger.py
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    ADMIN_KEY,
    KEYS,
    MODEL,
    REPO,
    ProxyProc,
    SimBackend,
    backend_yaml,
    sha256,
    tenants_yaml,
    wait_until,
)
from tests.test_accounting import MESSAGES, DebugProxy, auth, frugal_proxy, get, uj, usage_total

FRUGAL_KEY = "sk-test-isolation-frugal-0005"
BUDGET_J = 1.0e6  # large: only its arithmetic is checked, it is never used up
UPSTREAM_KEY = f"sk-upstream-{uuid.uuid4().hex}"
UPSTREAM_MARKER = f"upstream-internal-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def proxy(sims: dict[str, SimBackend], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProc]:
    """acme, globex, and frugal (on a daily energy budget), a SQLite ledger, a simulated H100."""
    started = frugal_proxy(sims["h100"], tmp_path_factory.mktemp("isolation"), FRUGAL_KEY, BUDGET_J)
    yield started
    started.stop()
    assert "Traceback" not in started.log()


def chat(proxy: ProxyProc, key: str, max_tokens: int, request_id: str | None = None) -> httpx.Response:
    headers = {**auth(key), **({"x-request-id": request_id} if request_id else {})}
    resp = httpx.post(proxy.url + "/v1/chat/completions", headers=headers, timeout=30,
                      json={"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens})
    assert resp.status_code == 200, resp.text
    return resp


def measured(proxy: ProxyProc, request_id: str, key: str) -> dict[str, Any]:
    """The caller's own request `request_id` once its energy is measured (so it is booked)."""
    got: dict[str, Any] = {}

    def done() -> bool:
        resp = get(proxy, f"/v1/energy/requests/{request_id}", key)
        got.update(resp.json() if resp.status_code == 200 else {})
        return got.get("method") == "measured"

    wait_until(done, 30, f"request {request_id} to be measured")
    return got


# -- ids cannot be probed ------------------------------------------------------------------------


def test_another_tenants_request_id_answers_exactly_like_an_unknown_one(proxy: ProxyProc) -> None:
    own = chat(proxy, KEYS["acme"], 3).headers["x-request-id"]
    unknown = uuid.uuid4().hex[:24]  # the shape of the proxy's own ids
    assert get(proxy, f"/v1/energy/requests/{own}", KEYS["acme"]).json()["tenant"] == "acme"
    theirs = get(proxy, f"/v1/energy/requests/{own}", KEYS["globex"])
    missing = get(proxy, f"/v1/energy/requests/{unknown}", KEYS["globex"])
    assert theirs.status_code == missing.status_code == 404
    # Same body once the id each one echoes is swapped, and the same headers.
    assert theirs.json() == json.loads(missing.text.replace(unknown, own))
    assert sorted(theirs.headers.keys()) == sorted(missing.headers.keys())
    assert "acme" not in theirs.text
    # A pass-through route's request is isolated the same way; the admin key sees both.
    other = httpx.post(proxy.url + "/v1/tokenize", headers=auth(KEYS["acme"]), timeout=10,
                       json={"model": MODEL, "prompt": "hi"}).headers["x-request-id"]
    probe = get(proxy, f"/v1/energy/requests/{other}", KEYS["globex"])
    assert probe.status_code == 404 and "acme" not in probe.text
    for rid in (own, other):
        wait_until(lambda rid=rid: get(proxy, f"/v1/energy/requests/{rid}", ADMIN_KEY).status_code == 200,
                   10, "the admin to see the request")
        assert get(proxy, f"/v1/energy/requests/{rid}", ADMIN_KEY).json()["tenant"] == "acme"
    # Booked before the next test reads usage (a cold start holds final values a while).
    for rid in (own, other):
        measured(proxy, rid, ADMIN_KEY)


# -- x-request-id belongs to the client: reusing one (even another tenant's) is its own request ----


def test_a_reused_request_id_is_a_separate_request_billed_to_its_own_tenant(proxy: ProxyProc) -> None:
    """Before the fix, the ledger deduplicated on the client's id: the second request under an
    id went unbilled (and out of its tenant's budget), whoever sent it."""
    before = {t: usage_total(proxy, f"?tenant={t}") for t in ("acme", "globex")}
    shared, repeated = f"shared-{uuid.uuid4().hex}", f"again-{uuid.uuid4().hex}"
    assert chat(proxy, KEYS["acme"], 5, shared).headers["x-request-id"] == shared
    assert chat(proxy, KEYS["globex"], 7, shared).headers["x-request-id"] == shared
    chat(proxy, KEYS["acme"], 3, repeated)
    chat(proxy, KEYS["acme"], 3, repeated)

    # Each tenant reads its own request under the shared id, never the other's.
    for tenant, tokens in (("acme", 5), ("globex", 7)):
        mine = measured(proxy, shared, KEYS[tenant])
        assert (mine["tenant"], mine["completion_tokens"]) == (tenant, tokens)
    # Every request is billed, to its own tenant: acme 3 (5+3+3 tokens), globex 1 (7).
    want = {"acme": (3, 5 + 3 + 3), "globex": (1, 7)}

    def billed() -> bool:
        for tenant, (requests, tokens) in want.items():
            total = usage_total(proxy, f"?tenant={tenant}")
            if (total["requests"] - before[tenant]["requests"],
                    total["completion_tokens"] - before[tenant]["completion_tokens"]) != (requests, tokens):
                return False
        return True

    wait_until(billed, 30, "every request under a reused id to be booked")


# -- budgets ---------------------------------------------------------------------------------------


def test_another_tenants_usage_never_counts_against_a_budget(proxy: ProxyProc) -> None:
    first = chat(proxy, FRUGAL_KEY, 4)
    rid = first.headers["x-request-id"]
    spent_j = measured(proxy, rid, FRUGAL_KEY)["joules"]
    spent_uj = uj(usage_total(proxy, "?tenant=frugal")["joules"])  # flushes the ledger too
    # globex spends, once even under frugal's own request id.
    ids = [chat(proxy, KEYS["globex"], 24, request_id).headers["x-request-id"]
           for request_id in (rid, None, None)]
    for request_id in ids[1:]:
        measured(proxy, request_id, KEYS["globex"])
    assert measured(proxy, rid, FRUGAL_KEY)["joules"] == spent_j  # frugal's own is untouched
    usage_total(proxy, "?tenant=globex")  # flush what globex spent before frugal asks again
    assert uj(usage_total(proxy, "?tenant=frugal")["joules"]) == spent_uj
    second = chat(proxy, FRUGAL_KEY, 4)
    left_before_j = (float(second.headers["x-energy-budget-remaining-joules"])
                     + float(second.headers["x-energy-joules"]))
    assert left_before_j == pytest.approx(BUDGET_J - spent_uj / 1e6, abs=1e-5)


# -- the usage API: query-string tricks ------------------------------------------------------------


def test_usage_query_tricks_never_reach_another_tenant(proxy: ProxyProc) -> None:
    chat(proxy, KEYS["globex"], 2)
    measured(proxy, chat(proxy, KEYS["acme"], 2).headers["x-request-id"], KEYS["acme"])
    acme = KEYS["acme"]
    for query in ("?tenant=acme&tenant=globex", "?tenant=ACME", "?tenant=acme%20",
                  "?tenant=*", "?tenant=globex&group_by=tenant&format=csv"):
        resp = get(proxy, "/v1/energy/usage" + query, acme)
        assert resp.status_code == 403, (query, resp.text)
    # The last value wins, for the check and the query alike; a blank one is no value.
    for query in ("tenant=globex&tenant=acme", "tenant=", "tenant=acme"):
        own = get(proxy, f"/v1/energy/usage?{query}&group_by=tenant", acme).json()
        assert [row["tenant"] for row in own["data"]] == ["acme"], query
    for group_by in ("tenant", "tenant,model,backend,hour", ""):
        text = get(proxy, f"/v1/energy/usage?group_by={group_by}&format=csv&tenant=acme", acme).text
        assert "globex" not in text and "frugal" not in text
    assert get(proxy, "/v1/energy/usage?group_by=tenant", KEYS["globex"]).json()["data"][0]["tenant"] == "globex"


# -- metrics and backends carry no tenant and no key -----------------------------------------------


def test_metrics_and_backends_name_no_tenant_and_no_key(proxy: ProxyProc) -> None:
    chat(proxy, KEYS["acme"], 2)
    metrics = httpx.get(proxy.url + "/metrics", timeout=10).text
    assert "joulegate_requests_total" in metrics
    assert "tenant=" not in metrics  # only with metrics.tenant_label: true
    backends = get(proxy, "/v1/energy/backends", KEYS["globex"]).text
    for text in (metrics, backends):
        for tenant in ("acme", "globex", "frugal"):
            assert f'"{tenant}"' not in text
        for key in (*KEYS.values(), ADMIN_KEY, FRUGAL_KEY):
            for needle in (key, sha256(key)[:8]):
                assert needle not in text


# -- upstream keys: sent upstream, never to clients; client keys never upstream --------------------


class CaptureUpstream:
    """A minimal OpenAI-compatible upstream on a thread that records every request's headers.
    Model `broken` answers a bare 500; requests with `"user": "together"` are held until two
    of them are in flight (unlike the simulator, it accepts a request id twice at once)."""

    def __init__(self, models: list[str]) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []  # (method, path, headers)
        self.together = threading.Barrier(2, timeout=10)
        seen, model_list, together = self.seen, models, self.together

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _answer(self, status: int, body: bytes, content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Upstream-Internal", UPSTREAM_MARKER)
                self.send_header("Set-Cookie", f"session={UPSTREAM_MARKER}")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                seen.append(("GET", self.path, {k.lower(): v for k, v in self.headers.items()}))
                data = [{"id": m, "object": "model", "owned_by": "capture"} for m in model_list]
                self._answer(200, json.dumps({"object": "list", "data": data}).encode())

            def do_POST(self) -> None:
                seen.append(("POST", self.path, {k.lower(): v for k, v in self.headers.items()}))
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if payload["model"] == "broken":
                    self._answer(500, b"upstream exploded", "text/plain")
                    return
                if payload.get("user") == "together":
                    together.wait()
                self._answer(200, json.dumps({
                    "id": "cmpl-1", "object": "chat.completion", "model": payload["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": "ok"}}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
                }).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def captured(sims: dict[str, SimBackend], tmp_path_factory: pytest.TempPathFactory,
             ) -> Iterator[tuple[DebugProxy, CaptureUpstream, CaptureUpstream]]:
    """A DEBUG-logging proxy in front of two capture upstreams: `keyed` has an api_key (and the
    simulated H100's power, so its requests are metered), `open` none."""
    tmp = tmp_path_factory.mktemp("capture")
    keyed, open_ = CaptureUpstream(["keyed-model", "broken"]), CaptureUpstream(["open-model"])
    power = f", power: {{source: sim, url: '{sims['h100'].url}', interval_s: 0.05}}"
    config = ("backends:\n"
              + backend_yaml("keyed", keyed.url, ["keyed-model", "broken"],
                             f", api_key: '{UPSTREAM_KEY}'{power}")
              + backend_yaml("open", open_.url, ["open-model"])
              + "routing: {policy: least_loaded}\nledger: 'memory://'\n" + tenants_yaml())
    proxy = DebugProxy(config, tmp)
    try:
        yield proxy, keyed, open_
    finally:
        proxy.stop()
        keyed.stop()
        open_.stop()
    assert "Traceback" not in proxy.log()


def test_upstream_gets_the_backends_key_and_never_the_clients(
        captured: tuple[DebugProxy, CaptureUpstream, CaptureUpstream]) -> None:
    proxy, keyed, open_ = captured
    client_secret = f"sk-client-extra-{uuid.uuid4().hex}"
    for model in ("keyed-model", "open-model"):
        resp = httpx.post(proxy.url + "/v1/chat/completions", timeout=30, json={
            "model": model, "messages": MESSAGES}, headers={
            **auth(KEYS["acme"]), "x-request-id": f"cap-{model}", "x-api-key": client_secret,
            "api-key": client_secret, "cookie": f"s={client_secret}", "openai-organization": client_secret})
        assert resp.status_code == 200, resp.text
    posts = {up: [h for method, _, h in up.seen if method == "POST"] for up in (keyed, open_)}
    assert [h["authorization"] for h in posts[keyed]] == [f"Bearer {UPSTREAM_KEY}"]
    assert [h.get("authorization") for h in posts[open_]] == [None]
    for up in (keyed, open_):
        assert [h["x-request-id"] for h in posts[up]] == [f"cap-{'keyed' if up is keyed else 'open'}-model"]
        for method, path, headers in up.seen:  # health checks and model discovery too
            text = json.dumps(headers)
            assert KEYS["acme"] not in text and client_secret not in text, (method, path)
            if up is open_:
                assert "authorization" not in headers, (method, path)
            else:
                assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}", (method, path)


def test_two_requests_in_flight_under_one_id_are_both_served_and_billed(
        captured: tuple[DebugProxy, CaptureUpstream, CaptureUpstream]) -> None:
    """Same x-request-id from two tenants, in flight together on one metered backend. Before
    the fix the meter refused the second ('already in flight'): a 500, and the backend's
    in-flight count leaked for good, so repeating it pinned the backend at its cap."""
    proxy, _, _ = captured
    rid = f"both-{uuid.uuid4().hex}"

    async def at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as client:
            body = {"model": "keyed-model", "messages": MESSAGES, "user": "together"}
            return await asyncio.gather(*(
                client.post("/v1/chat/completions", json=body,
                            headers={**auth(KEYS[tenant]), "x-request-id": rid})
                for tenant in ("acme", "globex")))

    for resp in asyncio.run(at_once()):
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-request-id"] == rid and "x-energy-joules" in resp.headers
    for tenant in ("acme", "globex"):
        assert measured(proxy, rid, KEYS[tenant])["tenant"] == tenant
    rows = get(proxy, "/v1/energy/usage?group_by=tenant").json()["data"]
    assert all(row["requests"] >= 1 for row in rows) and {r["tenant"] for r in rows} >= {"acme", "globex"}
    views = get(proxy, "/v1/energy/backends").json()["data"]
    wait_until(lambda: all(v["in_flight"] == 0 for v in get(proxy, "/v1/energy/backends").json()["data"]),
               10, "no request left in flight")
    assert {v["name"] for v in views} == {"keyed", "open"}


def test_the_upstream_key_never_reaches_a_client_or_the_log(
        captured: tuple[DebugProxy, CaptureUpstream, CaptureUpstream]) -> None:
    proxy, _, _ = captured
    body = {"messages": MESSAGES, "max_tokens": 2}
    seen: list[httpx.Response] = []
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        ok = client.post("/v1/chat/completions", headers=auth(KEYS["acme"]), json={**body, "model": "keyed-model"})
        assert ok.status_code == 200
        broken = client.post("/v1/chat/completions", headers=auth(KEYS["acme"]), json={**body, "model": "broken"})
        assert broken.status_code == 502 and set(broken.json()["error"]) == {"message", "type", "param", "code"}
        seen += [ok, broken]
        for key in (KEYS["acme"], ADMIN_KEY, "sk-not-a-key"):
            seen += [client.get(path, headers=auth(key)) for path in (
                "/v1/models", "/v1/models/keyed-model", "/v1/energy/backends", "/v1/energy/usage",
                f"/v1/energy/requests/{ok.headers['x-request-id']}")]
        seen += [client.get(path) for path in ("/metrics", "/readyz", "/healthz")]
    for resp in seen:
        text = resp.text + json.dumps(dict(resp.headers))
        assert UPSTREAM_KEY not in text and UPSTREAM_KEY[3:] not in text, (resp.request.url, resp.status_code)
        assert UPSTREAM_MARKER not in text  # the upstream's own headers are not relayed
    log = proxy.log()
    assert "DEBUG" in log
    digest = hashlib.sha256(UPSTREAM_KEY.encode()).hexdigest()
    for needle in (UPSTREAM_KEY, UPSTREAM_KEY[3:], digest[:8]):
        assert needle not in log


# -- the CLI prints no secrets ---------------------------------------------------------------------


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=30, env={**os.environ, **(env or {})})


def test_check_config_and_usage_print_no_secret(tmp_path: Path) -> None:
    upstream_key, password = f"sk-env-{uuid.uuid4().hex}", f"pw-{uuid.uuid4().hex}"
    tenant_key = f"sk-raw-{uuid.uuid4().hex}"
    config = tmp_path / "c.yaml"
    base = ("backends:\n  - {name: a, url: 'http://127.0.0.1:9/v1', models: [m], api_key: '${UP_KEY}'}\n"
            + tenants_yaml())
    config.write_text(base + "ledger: 'memory://'\n")
    done = cli("check-config", str(config), env={"UP_KEY": upstream_key})
    assert done.returncode == 0, done.stderr
    # A raw key where its digest belongs: the error names the field, not the key.
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(base.replace(sha256(KEYS["acme"]), tenant_key))
    bad = cli("check-config", str(wrong), env={"UP_KEY": upstream_key})
    assert bad.returncode == 2 and "api_keys_sha256" in bad.stderr, bad.stderr
    # A Redis ledger that cannot be reached: one line that names no password.
    unreachable = tmp_path / "redis.yaml"
    unreachable.write_text(base + f"ledger: 'redis://:{password}@127.0.0.1:9/0'\n")
    usage = cli("usage", "-c", str(unreachable), env={"UP_KEY": upstream_key})
    assert usage.returncode == 1 and "ledger" in usage.stderr, usage.stderr
    for done_ in (done, bad, usage):
        out = done_.stdout + done_.stderr
        assert "Traceback" not in out
        for secret in (upstream_key, password, tenant_key):
            assert secret not in out, out
