"""8. Slow clients: one that stops reading a stream is cut off (its GPU slot freed, memory put);
one that never finishes sending its body gets 408 and gives its in-flight slot back."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

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
from tests.faults.conftest import Figures
from tests.faults.servers import FLOOD_EVENTS, FaultServer


@pytest.fixture
def flood_proxy(tmp_path: Path) -> Iterator[tuple[FaultServer, ProxyProc]]:
    backend = FaultServer("flood")
    config = ("server: {client_write_timeout_s: 1.0}\nbackends:\n" + backend_yaml("flood", backend.url, [MODEL])
              + "ledger: memory://\n" + tenants_yaml())
    proxy = ProxyProc(config, tmp_path)
    try:
        yield backend, proxy
    finally:
        proxy.stop()
        backend.stop()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_client_that_stops_reading_is_cut_and_billed(
    flood_proxy: tuple[FaultServer, ProxyProc], figures: Figures,
) -> None:
    figures.scenario = "slow_client_cut"
    backend, proxy = flood_proxy
    rss_before_kib = _rss_kib(proxy.popen.pid)
    body = orjson.dumps({"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "flood"}]})
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        sock.connect(("127.0.0.1", proxy.port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEYS['acme']}\r\nx-request-id: stalled-1\r\n".encode()
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        # ... and never reads again. The proxy must give up on it and hang up on the backend.
        wait_until(lambda: backend.flood_ended is not None, 20, "the proxy to cut the stalled stream")
        assert backend.flood_ended != "complete"
        assert backend.flood_sent < FLOOD_EVENTS
        # Meanwhile other clients are served.
        other = httpx.get(proxy.url + "/v1/models", headers={"Authorization": f"Bearer {KEYS['globex']}"}, timeout=10)
        assert other.status_code == 200
        views = httpx.get(proxy.url + "/v1/energy/backends", timeout=10,
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["data"]
        assert views[0]["in_flight"] == 0
        growth_mib = (_rss_kib(proxy.popen.pid) - rss_before_kib) / 1024
        # The stream would be 32 MiB; only socket buffers' worth may ever sit in the proxy.
        assert growth_mib < 12, f"RSS grew {growth_mib:.1f} MiB"
    wait_until(lambda: "stream cut" in proxy.log(), 10, "the cut to be logged")
    assert "without completing response" not in proxy.log()  # a warning, not uvicorn's ERROR
    usage = httpx.get(proxy.url + "/v1/energy/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    wait_until(lambda: httpx.get(proxy.url + "/v1/energy/usage", timeout=10,
                                 headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["total"]["requests"] == 1,
               20, "the cut request to be billed")
    assert usage.status_code == 200
    print(f"\nslow client: backend sent {backend.flood_sent}/{FLOOD_EVENTS} events before the cut, "
          f"proxy RSS grew {growth_mib:.1f} MiB")
    # The client got a 200 and part of a stream: a clean failure as far as it could tell.
    figures.sent = figures.clean = figures.answered = figures.ledger = 1
    figures.notes.append(f"cut after {backend.flood_sent}/{FLOOD_EVENTS} events, RSS +{growth_mib:.1f} MiB")
    figures.check()


def test_a_slow_sender_gets_408_and_frees_its_slot(h100: SimBackend, tmp_path: Path, figures: Figures) -> None:
    """A client that declares a body and never finishes it must not hold the one slot there is."""
    figures.scenario = "slow_sender_408"
    config = ("server: {client_read_timeout_s: 1.0, max_in_flight: 1}\nbackends:\n"
              + backend_yaml("h100", h100.url, [MODEL]) + "ledger: memory://\n" + tenants_yaml())
    proxy = ProxyProc(config, tmp_path)
    chat = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    auth = {"Authorization": f"Bearer {KEYS['acme']}"}
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Authorization: Bearer {KEYS['acme']}\r\nContent-Length: 100\r\n\r\n".encode()
                         + b'{"model": ')
            # While it dawdles it holds the slot: others are shed, cleanly.
            busy = httpx.post(proxy.url + "/v1/chat/completions", json=chat, headers=auth, timeout=10)
            assert busy.status_code == 429 and busy.json()["error"]["code"] == "rate_limit_exceeded"
            assert busy.headers["retry-after"] == "1"
            # The head and the body are two sends: read until the body is there (or EOF).
            answer = b""
            while b"request_timeout" not in answer and (chunk := sock.recv(65536)):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"code":"request_timeout"' in body  # (chunked: the JSON sits inside a chunk)
        after = httpx.post(proxy.url + "/v1/chat/completions", json=chat, headers=auth, timeout=10)
        assert after.status_code == 200, after.text

        def booked() -> int:
            return httpx.get(proxy.url + "/v1/energy/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                             timeout=10).json()["total"]["requests"]

        wait_until(lambda: booked() >= 1, 20, "the answered request to be booked")
        figures.ledger = booked()
    finally:
        proxy.stop()
    assert "Traceback" not in proxy.log()
    figures.sent, figures.succeeded, figures.clean = 3, 1, 2
    figures.answered = 1  # only the last one reached a backend
    figures.check()
