"""A hostile tenant reaches only what tenants may reach, end to end: real proxies under uvicorn,
a capture upstream that records every path it receives (tests/test_isolation.py), a simulated
H100 for power.

Elsewhere, not repeated here: another tenant's request id answers exactly like an unknown one
(tests/test_isolation.py); the agent's refusal to start, its 401s, and the agent source with a
token from a file or a variable, over http and https (tests/test_agent.py).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.config import ConfigError, parse_config
from proxy.redact import redact_text, redact_url
from tests.conftest import (
    ADMIN_KEY,
    KEYS,
    REPO,
    ProxyProc,
    SimBackend,
    backend_yaml,
    free_port,
    sha256,
    tenants_yaml,
    wait_until,
)
from tests.test_accounting import DebugProxy, auth, get
from tests.test_agent import H100, Agent, self_signed_cert
from tests.test_isolation import CaptureUpstream

MODEL = "cap-model"
UPSTREAM_KEY = f"sk-upstream-{uuid.uuid4().hex}"
#: Engine routes no tenant may reach (vLLM's LoRA, sleep-mode and cache controls, and more).
ENGINE_ADMIN = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/sleep", "/v1/wake_up",
                "/v1/reset_prefix_cache", "/v1/collective_rpc", "/v1/start_profile", "/v1/chat")
#: Default allowlist entries the capture upstream answers (a JSON object, relayed as is).
ALLOWED = ("/v1/rerank", "/v1/moderations", "/v1/tokenize", "/v1/score")


def post(url: str, path: str, key: str, body: dict[str, Any] | None = None) -> httpx.Response:
    return httpx.post(url + path, headers=auth(key), json=body or {"model": MODEL, "input": "hi"}, timeout=10)


def received(upstream: CaptureUpstream, path: str) -> list[str]:
    """Paths the upstream received that name `path` (after its /v1 prefix)."""
    return [p for _, p, _ in upstream.seen if p.split("?")[0] == path]


def assert_not_found(resp: httpx.Response) -> None:
    assert resp.status_code == 404, resp.text
    error = resp.json()["error"]
    assert error["code"] == "not_found" and error["type"] == "invalid_request_error"


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimBackend]:
    started = SimBackend("h100-llama3.1-8b", tmp_path_factory.mktemp("hostile-sim"))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def upstream() -> Iterator[CaptureUpstream]:
    started = CaptureUpstream([MODEL])
    yield started
    started.stop()


@pytest.fixture(scope="module")
def proxy(upstream: CaptureUpstream, sim: SimBackend, tmp_path_factory: pytest.TempPathFactory,
          ) -> Iterator[ProxyProc]:
    """The default allowlist, /metrics on its own port, a metered backend holding an API key."""
    metrics_port = free_port()
    power = f", power: {{source: sim, url: '{sim.url}', interval_s: 0.05}}"
    config = (f"server: {{metrics_port: {metrics_port}}}\nbackends:\n"
              + backend_yaml("cap", upstream.url, [MODEL], f", api_key: '{UPSTREAM_KEY}'{power}")
              + tenants_yaml() + "ledger: 'memory://'\n")
    started = ProxyProc(config, tmp_path_factory.mktemp("hostile"))
    started.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"  # type: ignore[attr-defined]
    yield started
    started.stop()
    assert "Traceback" not in started.log()


# -- pass-through is an allowlist -------------------------------------------------------------


@pytest.mark.parametrize("key", [KEYS["acme"], ADMIN_KEY], ids=["tenant", "admin"])
def test_engine_admin_routes_are_404_and_never_reach_the_backend(
        proxy: ProxyProc, upstream: CaptureUpstream, key: str) -> None:
    for path in ENGINE_ADMIN:
        body = {"model": MODEL, "lora_name": "evil", "lora_path": "/tmp/evil", "level": 1}
        assert_not_found(post(proxy.url, path, key, body))
    # Encoded dot segments and near misses of allowed paths are no way round it.
    for path in ("/v1/rerank/../sleep", "/v1/%2e%2e/sleep", "/v1/rerank/", "/v1/Rerank", "/v2/rerank"):
        assert post(proxy.url, path, key).status_code == 404
    assert post(proxy.url, "/v1/rerank", key).status_code == 200  # the connection is fine
    for path in ENGINE_ADMIN:
        assert not received(upstream, path), f"{path} reached the engine"
    assert all(not p.startswith(("/v1/sleep", "/v1/..", "/v1/%2e", "/v1/Rerank", "/v2"))
               for _, p, _ in upstream.seen)


def test_allowlisted_routes_pass_with_the_backends_key(proxy: ProxyProc, upstream: CaptureUpstream) -> None:
    for path in ALLOWED:
        resp = post(proxy.url, path, KEYS["globex"])
        assert resp.status_code == 200, (path, resp.text)
        (got,) = [h for _, p, h in upstream.seen if p == path][-1:]
        assert got["authorization"] == f"Bearer {UPSTREAM_KEY}"
    # Only POST: a GET of an allowlisted path is the proxy's 404.
    assert httpx.get(proxy.url + "/v1/rerank", headers=auth(KEYS["acme"]), timeout=10).status_code == 404


def test_allowlisted_route_books_the_engines_usage(proxy: ProxyProc, upstream: CaptureUpstream) -> None:
    # A rerank/score/moderations answer booked with no tokens weighs nothing in the energy split:
    # its GPU time would be billed to whoever ran beside it. The engine's usage counts.
    rid = f"rerank-{uuid.uuid4().hex[:12]}"
    resp = httpx.post(proxy.url + "/v1/rerank", headers={**auth(KEYS["acme"]), "x-request-id": rid}, timeout=10,
                      json={"model": MODEL, "query": "q", "documents": ["a" * 400]})
    assert resp.status_code == 200, resp.text
    view = get(proxy, f"/v1/energy/requests/{rid}", KEYS["acme"]).json()
    assert (view["prompt_tokens"], view["completion_tokens"]) == (3, 1)  # the capture upstream's usage


class MultipartUpstream:
    """An upstream on a thread that records each POST's path, Content-Type and body bytes, and
    answers a transcription ({"text"}) or an image list, without usage."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bytes]] = []  # (path, content-type, body)
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _answer(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._answer(json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode())

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                seen.append((self.path, self.headers.get("Content-Type", ""), body))
                answer = {"text": "hello"} if "/audio/" in self.path else {"created": 0, "data": [{"b64_json": "AA=="}]}
                self._answer(json.dumps(answer).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def multipart() -> Iterator[tuple[ProxyProc, MultipartUpstream]]:
    upstream = MultipartUpstream()
    config = "backends:\n" + backend_yaml("mp", upstream.url, [MODEL]) + tenants_yaml() + "ledger: 'memory://'\n"
    started = ProxyProc(config, Path(tempfile.mkdtemp(prefix="jg-multipart-")))
    yield started, upstream
    started.stop()
    upstream.stop()
    assert "Traceback" not in started.log()


def test_allowlisted_multipart_routes_reach_the_backend_untouched_and_are_booked(
        multipart: tuple[ProxyProc, MultipartUpstream]) -> None:
    # /v1/audio/transcriptions and /v1/images/edits (and translations, variations) are on the
    # default allowlist; OpenAI's API sends them as multipart/form-data, as the SDK does here.
    # The proxy parsed them as JSON (400) and sent them upstream as application/json.
    proxy, upstream = multipart
    sent: list[tuple[str, bytes]] = []

    def keep(request: httpx.Request) -> None:
        if request.method == "POST":
            sent.append((request.headers["content-type"], request.read()))

    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEYS["acme"], max_retries=0, timeout=30,
                           http_client=httpx.Client(event_hooks={"request": [keep]}))
    audio = b"RIFF0000WAVEfmt " + bytes(range(256)) * 8
    raw = client.audio.transcriptions.with_raw_response.create(model=MODEL, file=("hi.wav", audio, "audio/wav"))
    assert raw.parse().text == "hello"
    image = client.images.with_raw_response.edit(model=MODEL, image=("a.png", b"\x89PNG" + b"\0" * 64, "image/png"),
                                                  prompt="a hat")
    assert image.status_code == 200
    assert [(p, ct, body) for p, ct, body in upstream.seen] == [
        ("/v1/audio/transcriptions", *sent[0]), ("/v1/images/edits", *sent[1])]
    assert sent[0][0].startswith("multipart/form-data; boundary=")
    for answer in (raw, image):
        rid = answer.headers["x-request-id"]
        view = get(proxy, f"/v1/energy/requests/{rid}", KEYS["acme"]).json()
        assert view["model"] == MODEL and view["backend"] == "mp", view
        assert view["prompt_tokens"] > 0  # no usage in the answer: the pass-through estimate
    # A multipart body without a model part is a 400, and never reaches the backend.
    bad = httpx.post(proxy.url + "/v1/audio/transcriptions", headers=auth(KEYS["acme"]), timeout=10,
                     files={"file": ("hi.wav", audio, "audio/wav")}, data={"language": "en"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "model", bad.text
    assert len(upstream.seen) == 2


@pytest.fixture(scope="module")
def new_key(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """`joulegate keys new --tenant initech --json`, as an operator would run it."""
    done = subprocess.run([sys.executable, "-m", "proxy", "keys", "new", "--tenant", "initech", "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def edited(upstream: CaptureUpstream, new_key: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[ProxyProc]:
    """`server.passthrough: {add, remove}`; the tenant `initech` holds the key `keys new` made."""
    initech = f"  - {{name: initech, api_keys_sha256: ['{new_key['sha256']}']}}\n"
    config = ("server:\n  passthrough: {add: [/v1/custom/classify], remove: [/v1/rerank, /v1/responses]}\nbackends:\n"
              + backend_yaml("cap", upstream.url, [MODEL], f", api_key: '{UPSTREAM_KEY}'")
              + tenants_yaml().replace("admin_api_keys_sha256", initech + "admin_api_keys_sha256", 1)
              + "ledger: 'memory://'\n")
    started = ProxyProc(config, tmp_path_factory.mktemp("edited"))
    yield started
    started.stop()


def test_passthrough_config_narrows_and_extends(edited: ProxyProc, upstream: CaptureUpstream) -> None:
    before = len(received(upstream, "/v1/rerank"))
    assert_not_found(post(edited.url, "/v1/rerank", KEYS["acme"]))
    assert len(received(upstream, "/v1/rerank")) == before
    assert post(edited.url, "/v1/custom/classify", KEYS["acme"]).status_code == 200
    assert received(upstream, "/v1/custom/classify")
    assert post(edited.url, "/v1/moderations", KEYS["acme"]).status_code == 200  # the rest stays
    # The Responses API is on the allowlist like the others: removed, it is gone too.
    before = len(received(upstream, "/v1/responses"))
    assert_not_found(post(edited.url, "/v1/responses", KEYS["acme"]))
    assert len(received(upstream, "/v1/responses")) == before
    assert_not_found(post(edited.url, "/v1/load_lora_adapter", KEYS["acme"]))


def test_passthrough_as_a_list_replaces_the_default_and_bad_paths_are_refused() -> None:
    base = "backends: [{name: a, url: 'http://127.0.0.1:1/v1'}]\n"
    config = parse_config(base + "server: {passthrough: [/v1/rerank]}\n")
    assert config.server.passthrough_paths() == {"/v1/rerank"}
    assert "/v1/moderations" in parse_config(base).server.passthrough_paths()
    assert parse_config(base + "server: {passthrough: []}\n").server.passthrough_paths() == set()
    for bad in ("/v1/../metrics", "/metrics", "/v1/a?b", "v1/rerank"):
        with pytest.raises(ConfigError, match="server.passthrough"):
            parse_config(base + f"server: {{passthrough: ['{bad}']}}\n")


# -- backends: tenants see no operational detail ----------------------------------------------


def test_backends_view_hides_operational_detail_from_tenants(proxy: ProxyProc) -> None:
    wait_until(lambda: get(proxy, "/v1/energy/backends").json()["data"][0]["power_w"] is not None,
               15, "a power reading")
    (admin_view,) = get(proxy, "/v1/energy/backends").json()["data"]
    assert admin_view["power_w"] > 0 and "idle_w" in admin_view and "cluster" in admin_view
    resp = get(proxy, "/v1/energy/backends", KEYS["acme"])
    assert resp.status_code == 200
    (view,) = resp.json()["data"]
    assert set(view) == {"name", "healthy", "models", "tokens_per_joule"}
    assert view["name"] == "cap" and view["healthy"] is True and view["models"] == [MODEL]
    assert "127.0.0.1" not in resp.text


# -- metrics on their own port; health checks are GET/HEAD only -------------------------------


def test_metrics_only_on_the_metrics_port(proxy: ProxyProc) -> None:
    post(proxy.url, "/v1/rerank", KEYS["acme"])
    assert_not_found(httpx.get(proxy.url + "/metrics", timeout=10))
    resp = httpx.get(proxy.metrics_url, timeout=10)  # type: ignore[attr-defined]
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    assert "joulegate_requests_total" in resp.text and 'joulegate_backend_up{backend="cap"} 1.0' in resp.text
    other = httpx.get(proxy.metrics_url.replace("/metrics", "/v1/models"), timeout=10)  # type: ignore[attr-defined]
    assert other.status_code == 404


def test_health_endpoints_answer_get_and_head_only(proxy: ProxyProc) -> None:
    for path in ("/healthz", "/readyz"):
        assert httpx.get(proxy.url + path, timeout=10).status_code == 200
        head = httpx.head(proxy.url + path, timeout=10)
        assert head.status_code == 200 and head.content == b""
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            resp = httpx.request(method, proxy.url + path, timeout=10)
            assert resp.status_code == 405, (method, path)
            assert resp.headers["allow"] == "GET, HEAD"
            assert resp.json()["error"]["code"] == "method_not_allowed"


# -- no secret in any log line ----------------------------------------------------------------


def test_urls_with_passwords_and_query_secrets_never_reach_the_log(
        upstream: CaptureUpstream, tmp_path: Path) -> None:
    secrets = [f"pw-{uuid.uuid4().hex}" for _ in range(4)]
    dead = free_port()
    power = (f", power: {{source: agent, interval_s: 0.05, "
             f"url: 'http://jg:{secrets[0]}@127.0.0.1:{dead}/agent?token={secrets[1]}'}}")
    config = ("backends:\n"
              + backend_yaml("cap", upstream.url, [MODEL], power)
              + f"  - {{name: ghost, url: 'http://ops:{secrets[2]}@127.0.0.1:{dead}/v1', models: [ghost]}}\n"
              + f"cluster: {{redis_url: 'redis://:{secrets[3]}@127.0.0.1:{dead}/0'}}\n"
              + tenants_yaml() + "ledger: 'memory://'\n")
    proxy = DebugProxy(config, tmp_path)
    try:
        wait_until(lambda: "agent source" in proxy.log() and "ghost" in proxy.log(), 20,
                   "the power source's and the backend's failures to be logged")
        post(proxy.url, "/v1/rerank", KEYS["acme"], {"model": "ghost"})
    finally:
        proxy.stop()
    log = proxy.log()
    assert re.search(rf"agent source http://127\.0\.0\.1:{dead}/agent\?token=\*\*\*", log), log[-3000:]
    for secret in secrets:
        assert secret not in log


def test_redaction_drops_userinfo_and_query_values() -> None:
    assert redact_url("redis://:pw@cache:6379/0?key_prefix=jg") == "redis://cache:6379/0?key_prefix=***"
    assert redact_url("http://u:p@10.0.0.5:9464/x?token=t&flag#frag") == "http://10.0.0.5:9464/x?token=***&flag"
    assert redact_url("http://10.0.0.5:9464") == "http://10.0.0.5:9464"
    assert redact_url("http://[::1:bad") == "http://***"
    text = "Client error '401' for url 'https://a:b@h/v1/power?token=s3cret'\nsee http://x?k=v"
    assert redact_text(text) == "Client error '401' for url 'https://h/v1/power?token=***'\nsee http://x?k=***"


def test_metrics_port_must_differ_from_the_api_port() -> None:
    with pytest.raises(ConfigError, match="metrics_port must differ"):
        parse_config("server: {port: 9000, metrics_port: 9000}\nbackends: [{name: a, url: 'http://h/v1'}]\n")


# -- keys new -----------------------------------------------------------------------------------


def test_keys_new_prints_a_key_once_and_its_digest_authenticates(
        new_key: dict[str, str], edited: ProxyProc) -> None:
    assert set(new_key) == {"tenant", "key", "sha256"} and new_key["tenant"] == "initech"
    key = new_key["key"]
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{43,}", key) and sha256(key) == new_key["sha256"]
    resp = httpx.get(edited.url + "/v1/energy/usage", headers=auth(key), timeout=10)
    assert resp.status_code == 200, resp.text
    assert get(edited, "/v1/models", key).status_code == 200
    # The plain form: the key once, and the digest in a line for the config.
    done = subprocess.run([sys.executable, "-m", "proxy", "keys", "new", "--tenant", "acme"],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    (shown,) = re.findall(r"sk-[A-Za-z0-9_-]+", done.stdout)
    assert done.stdout.count(shown) == 1
    assert f'api_keys_sha256: ["{sha256(shown)}"]' in done.stdout
    assert shown != key


def test_keys_new_help_and_bad_flags() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "proxy", "keys", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=30)

    assert run("new", "--help").returncode == 0
    for args in (("new",), ("new", "--tenant", "a", "--bogus"), ("frobnicate",), ("new", "--tenant", "admin")):
        done = run(*args)
        assert done.returncode == 2 and "Traceback" not in done.stderr, (args, done.stderr)


# -- the proxy reads a token-guarded agent over TLS ---------------------------------------------


def test_proxy_reads_power_from_an_agent_with_a_token_over_tls(upstream: CaptureUpstream, tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI to make a certificate")
    token = f"agent-token-{uuid.uuid4().hex}"
    token_file = tmp_path / "agent-token"
    token_file.write_text(token + "\n")
    cert, key = self_signed_cert(tmp_path)
    agent = Agent(tmp_path, host="0.0.0.0", token=token, ca_file=cert,
                  extra=("--token-file", str(token_file), "--tls-cert", str(cert), "--tls-key", str(key)))
    try:
        power = (f", power: {{source: agent, url: '{agent.url}', gpus: [0], interval_s: 0.05, "
                 f"token_file: '{token_file}', ca_file: '{cert}'}}")
        config = ("backends:\n" + backend_yaml("cap", upstream.url, [MODEL], power)
                  + tenants_yaml() + "ledger: 'memory://'\n")
        proxy = ProxyProc(config, tmp_path)
        try:
            def power_w() -> float | None:
                return get(proxy, "/v1/energy/backends").json()["data"][0]["power_w"]

            wait_until(lambda: power_w() is not None, 15, "power from the agent")
            assert power_w() == pytest.approx(H100["power_w"], rel=0.05)
        finally:
            proxy.stop()
        assert token not in proxy.log() and "401" not in proxy.log()
    finally:
        agent.stop()
