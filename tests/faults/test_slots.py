"""10. Backend slots and the in-flight cap: held no longer than the upstream needs them.

A pooled connection the engine closed while idle is retried on a fresh one (no failure, no
circuit); a client reading a large non-streamed answer at ~1 KB/s does not keep the backend's
slot; three times `max_in_flight` at once: the excess gets 429 at once, nothing is lost.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import httpx
import orjson

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
from tests.faults.ledgers import flush_ledger, sqlite_ledger
from tests.faults.load import MESSAGES, Outcome, http_post, lone_fault_proxy, proxy_yaml, tally
from tests.faults.servers import BIG_JSON_BYTES, FaultServer

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CAP = 32  # max_in_flight of the flood scenario
FLOOD = 3 * CAP


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _in_flight(proxy: ProxyProc) -> int:
    return httpx.get(proxy.url + "/v1/energy/backends", headers=ADMIN, timeout=10).json()["data"][0]["in_flight"]


def test_a_stale_keepalive_connection_is_retried_not_failed(tmp_path: Path, figures: Figures) -> None:
    """Every reused connection is closed under its request; one failure would open the circuit."""
    figures.scenario = "stale_keepalive"
    server = FaultServer("stale_keepalive")
    db = tmp_path / "ledger.db"
    config = proxy_yaml([("stale", server.url, "")], "health_interval_s: 30, circuit_failures: 1", f"sqlite:///{db}")
    proxy = ProxyProc(config, tmp_path)
    try:
        payload = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4}

        async def one_by_one() -> list[tuple[Outcome, bytes, int]]:
            async with httpx.AsyncClient(base_url=proxy.url, timeout=15) as http:
                return [await http_post(http, f"stale-{i}", payload, 10) for i in range(6)]

        results = asyncio.run(one_by_one())
        assert [s for _, _, s in results] == [200] * 6, [(o, b[:120]) for o, b, _ in results]
        assert server.posts > server.answered == 6  # some did meet a closed connection
        view = httpx.get(proxy.url + "/v1/energy/backends", headers=ADMIN, timeout=10).json()["data"][0]
        assert view["healthy"], view
        assert "marked down" not in proxy.log() and "circuit open" not in proxy.log()
        flush_ledger(proxy)
        tally(figures, [o for o, _, _ in results], set(sqlite_ledger(db)))
        figures.check()
    finally:
        proxy.stop()
        server.stop()
    assert "Traceback" not in proxy.log()


def test_a_slow_reader_does_not_hold_the_backend_slot(tmp_path: Path, figures: Figures) -> None:
    """Two pipelined requests for 24 MiB answers on one connection, read at ~1 KB/s: the second
    answer waits for the first to drain, yet its backend slot is free as soon as the backend
    has answered. (uvicorn buffers one answer whole, so the second is the one that waits.)"""
    figures.scenario = "slow_reader_1kbs"
    with lone_fault_proxy("big_json", tmp_path, 30.0) as (server, proxy, db):
        body = orjson.dumps({"model": MODEL, "messages": MESSAGES})
        requests = b"".join(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEYS['acme']}\r\nx-request-id: slow-reader-{i}\r\n".encode()
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body for i in range(2))
        received = 0
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
            sock.connect(("127.0.0.1", proxy.port))
            sock.settimeout(10)
            sock.sendall(requests)
            head = sock.recv(1024)
            assert head.startswith(b"HTTP/1.1 200"), head[:200]
            received += len(head)
            paced_s = time.monotonic()

            def freed_while_reading() -> bool:
                nonlocal received, paced_s
                if time.monotonic() >= paced_s:  # the reader's pace, ~1 KB a second
                    received += len(sock.recv(1024))
                    paced_s += 1.0
                return server.posts == 2 and _in_flight(proxy) == 0

            wait_until(freed_while_reading, 30, "the backend slot to be freed while the client reads")
            assert received < BIG_JSON_BYTES // 100  # the client has read next to nothing yet
            flush_ledger(proxy)
            booked = sqlite_ledger(db)
            for i in range(2):
                assert booked[f"slow-reader-{i}"].status == 200 and booked[f"slow-reader-{i}"].completion_tokens == 7
        figures.sent = figures.succeeded = figures.answered = 2
        figures.ledger = len(booked)
        figures.notes.append(f"slots free after the client read {received} B of 2 x {BIG_JSON_BYTES}")
        figures.check()


async def _shed_latencies_ms(proxy: ProxyProc, payload: dict) -> list[float]:
    """Once the flood fills the cap: how long single requests from another client take to get
    their 429 (the proxy's own refusal time, without the flood client's queueing)."""
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as http:
        for _ in range(1500):  # poll the condition for up to ~30 s, as wait_until does
            if (await http.get("/v1/energy/backends", headers=ADMIN)).json()["data"][0]["in_flight"] >= CAP:
                break
            await asyncio.sleep(0.02)
        else:
            return []
        latencies_ms = []
        for i in range(5):
            start = time.monotonic()
            resp = await http.post("/v1/chat/completions", json=payload,
                                   headers={"Authorization": f"Bearer {KEYS['acme']}", "x-request-id": f"probe-{i}"})
            if resp.status_code == 429:
                latencies_ms.append((time.monotonic() - start) * 1000)
        return latencies_ms


def test_a_flood_of_three_times_max_in_flight(h100: SimBackend, tmp_path: Path, figures: Figures) -> None:
    """FLOOD requests at once against max_in_flight CAP: the excess gets 429 rate_limit_exceeded
    with Retry-After at once; every answered one is booked; RSS stays flat."""
    figures.scenario = "flood_3x_max_in_flight"
    db = tmp_path / "ledger.db"
    config = (f"server: {{max_in_flight: {CAP}, health_interval_s: 30}}\nbackends:\n"
              + backend_yaml("h100", h100.url, [MODEL]) + f"ledger: 'sqlite:///{db}'\n" + tenants_yaml())
    proxy = ProxyProc(config, tmp_path)
    try:
        rss_before_kib = _rss_kib(proxy.popen.pid)
        payload = {"model": MODEL, "messages": MESSAGES, "max_tokens": 256}  # seconds each: the slots stay taken

        async def flood() -> tuple[list[tuple[Outcome, bytes, int, str | None]], list[float]]:
            limits = httpx.Limits(max_connections=FLOOD, max_keepalive_connections=FLOOD)
            async with httpx.AsyncClient(base_url=proxy.url, timeout=60, limits=limits) as http:
                # Open the connections first, so the requests arrive together.
                await asyncio.gather(*(http.get("/healthz") for _ in range(FLOOD)))

                async def one(i: int) -> tuple[Outcome, bytes, int, str | None]:
                    headers = {"Authorization": f"Bearer {KEYS['acme']}", "x-request-id": f"flood-{i}"}
                    start = time.monotonic()
                    resp = await http.post("/v1/chat/completions", json=payload, headers=headers)
                    outcome = Outcome(f"flood-{i}", "ok" if resp.status_code == 200 else "clean",
                                      resp.headers.get("x-energy-backend"), 0, time.monotonic() - start)
                    return outcome, resp.content, resp.status_code, resp.headers.get("retry-after")

                flooding = asyncio.gather(*(one(i) for i in range(FLOOD)))
                shed_ms = await _shed_latencies_ms(proxy, payload)
                return await flooding, shed_ms

        results, probe_ms = asyncio.run(flood())
        assert probe_ms, "no probe met a full proxy"
        rss_after_kib = _rss_kib(proxy.popen.pid)
        flush_ledger(proxy)
        booked = sqlite_ledger(db)
        statuses = [s for _, _, s, _ in results]
        shed = [(o, b, r) for o, b, s, r in results if s == 429]
        assert set(statuses) <= {200, 429}, statuses
        assert len(shed) >= CAP, statuses  # at most CAP in flight, and each takes seconds
        for _, body, retry_after in shed:
            assert orjson.loads(body)["error"]["code"] == "rate_limit_exceeded" and retry_after == "1"
        latencies = sorted(o.elapsed_s for o, _, _, _ in results)
        p99_s = latencies[int(0.99 * (len(latencies) - 1))]
        shed_p99_s = sorted(o.elapsed_s for o, _, _ in shed)[int(0.99 * (len(shed) - 1))]
        growth_mib = (rss_after_kib - rss_before_kib) / 1024
        tally(figures, [o for o, _, _, _ in results], set(booked))
        figures.notes.append(f"429: {len(shed)}/{FLOOD}, p99 {p99_s * 1000:.0f} ms (429s: {shed_p99_s * 1000:.0f} ms; "
                             f"a lone probe at the cap: max {max(probe_ms):.0f} ms), "
                             f"RSS {rss_before_kib / 1024:.0f} -> {rss_after_kib / 1024:.0f} MiB")
        print(f"\nflood: {FLOOD} at once, max_in_flight {CAP}: {len(shed)} got 429; p99 {p99_s * 1000:.0f} ms, "
              f"429 p99 {shed_p99_s * 1000:.0f} ms (client-side, all {FLOOD} on one client loop); probes at the "
              f"cap answered 429 in {', '.join(f'{m:.0f}' for m in probe_ms)} ms; "
              f"RSS {rss_before_kib / 1024:.1f} -> {rss_after_kib / 1024:.1f} MiB")
        assert growth_mib < 20, f"RSS grew {growth_mib:.1f} MiB"
        figures.check()  # every answered request is booked, none twice
    finally:
        proxy.stop()
    assert "Traceback" not in proxy.log()
