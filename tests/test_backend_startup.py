"""A backend whose `/models` answer is malformed, slow or refused never stops the proxy starting:
it stays unhealthy, says why in /readyz and the log, and is checked again until it recovers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODEL, ProxyProc, backend_yaml, free_port, tenants_yaml, wait_until

#: What the bad backend answers on GET /v1/models, and the reason /readyz must give.
BAD_SHAPES = {
    "data_not_list": (200, b'{"data": 5}', "no OpenAI model list"),
    "list_not_object": (200, b'[1, 2]', "no OpenAI model list"),
    "not_json": (200, b"<html>oops</html>", "no OpenAI model list"),
    "http_500": (500, b'{"error": "boom"}', "HTTP 500"),
    "slow": (200, b'{"data": []}', "timed out"),
}
GOOD = (200, b'{"object": "list", "data": [{"id": "%s", "object": "model"}]}' % MODEL.encode(), "")
SLOW_S = 3.0  # the proxy's connect_timeout_s below is 0.3 s, its whole check 0.6 s


class ModelsServer:
    """A real HTTP server whose GET /v1/models answers `self.shape` (switchable while running)."""

    def __init__(self, shape: str) -> None:
        self.shape = shape
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                outer.hits += 1
                status, body, _ = GOOD if outer.shape == "good" else BAD_SHAPES[outer.shape]
                if outer.shape == "slow":
                    time.sleep(SLOW_S)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def models_server(request: pytest.FixtureRequest) -> Iterator[ModelsServer]:
    server = ModelsServer(request.param)
    yield server
    server.stop()


def _config(url: str) -> str:
    return ("server: {connect_timeout_s: 0.3, health_interval_s: 0.2}\nbackends:\n"
            + backend_yaml("bad", url) + "ledger: memory://\n" + tenants_yaml())


def _readyz(proxy: ProxyProc) -> httpx.Response:
    return httpx.get(proxy.url + "/readyz", timeout=5)


@pytest.mark.parametrize("models_server", list(BAD_SHAPES), indirect=True)
def test_bad_models_answer_leaves_proxy_up_then_recovers(models_server: ModelsServer, tmp_path: Path) -> None:
    proxy = ProxyProc(_config(models_server.url), tmp_path, wait_ready=False)
    try:
        ready = _readyz(proxy)
        assert ready.status_code == 503, ready.text
        body = ready.json()
        assert body["backends"] == {"bad": False}
        assert BAD_SHAPES[models_server.shape][2] in body["errors"]["bad"]
        assert "bad failed its health check" in proxy.log()
        # Checked again on the health interval: once it answers properly it serves.
        models_server.shape = "good"
        wait_until(lambda: _readyz(proxy).status_code == 200, 15, "the backend to recover")
        assert _readyz(proxy).json()["errors"] == {}
        models = httpx.get(proxy.url + "/v1/models", headers={"Authorization": "Bearer sk-test-acme-0001"}).json()
        assert [m["id"] for m in models["data"]] == [MODEL]
    finally:
        proxy.stop()
    assert "Traceback" not in proxy.log()


def test_refused_backend_leaves_proxy_up(tmp_path: Path) -> None:
    proxy = ProxyProc(_config(f"http://127.0.0.1:{free_port()}"), tmp_path, wait_ready=False)
    try:
        ready = _readyz(proxy)
        assert ready.status_code == 503
        assert "ConnectError" in ready.json()["errors"]["bad"]
    finally:
        proxy.stop()
    assert "Traceback" not in proxy.log()
