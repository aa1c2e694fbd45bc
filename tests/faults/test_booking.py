"""9. Booked exactly once: a request a backend had is in the ledger whatever ended it.

A slow backend past request_timeout_s (504, with the energy it drew), a client that leaves a
stream or a non-streamed request (499; the proxy hangs up on the backend within a second, seen
from the backend's side), a stream the backend stops feeding (504 after the idle timeout) and a
healthy stream that lasts longer than request_timeout_s (not cut).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from tests.conftest import (
    KEYS,
    MODEL,
    ProxyProc,
    SimBackend,
    backend_yaml,
    tenants_yaml,
    wait_until,
)
from tests.faults.conftest import Figures
from tests.faults.ledgers import Booked, flush_ledger, sqlite_ledger
from tests.faults.load import MESSAGES, Outcome, lone_fault_proxy, post_many, proxy_yaml, tally
from tests.faults.servers import CUT_EVENTS, SLOW_EVENTS, SLOW_GAP_S, FaultServer

HANG_UP_S = 1.0  # the proxy closes the upstream this soon after the client leaves


def _booked(proxy: ProxyProc, db: Path, request_id: str, timeout_s: float = 20.0) -> Booked:
    """The request's ledger row, once it is there (a flush per poll)."""
    found: dict[str, Booked] = {}

    def there() -> bool:
        flush_ledger(proxy)
        found.update(sqlite_ledger(db))
        return request_id in found

    wait_until(there, timeout_s, f"{request_id} to be booked")
    return found[request_id]


def _leave_after(proxy: ProxyProc, request_id: str, payload: dict, until: Callable[[], object]) -> float:
    """Send `payload` on a raw socket, wait for `until()`, hang up; time.monotonic() of the hang-up."""
    body = orjson.dumps(payload)
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEYS['acme']}\r\nx-request-id: {request_id}\r\n".encode()
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    try:
        wait_until(until, 15, f"{request_id} to be under way")
    finally:
        left_s = time.monotonic()
        sock.close()
    return left_s


def test_a_late_backend_is_booked_with_its_energy(tmp_path: Path, figures: Figures) -> None:
    """A simulated L4 (60 ms a token) asked for 300 tokens, with request_timeout_s 1: 504."""
    figures.scenario = "late_504_booked"
    sim = SimBackend("l4-llama3.1-8b", tmp_path, seed=31)
    db = tmp_path / "ledger.db"
    power = f", power: {{source: sim, url: '{sim.url}', interval_s: 0.05}}"
    config = ("server: {request_timeout_s: 1.0, health_interval_s: 30}\nbackends:\n"
              + backend_yaml("l4", sim.url, [MODEL], power) + f"ledger: 'sqlite:///{db}'\n" + tenants_yaml())
    proxy = ProxyProc(config, tmp_path)
    try:
        payload = {"model": MODEL, "messages": MESSAGES, "max_tokens": 300}
        [(outcome, body, status)] = post_many(proxy, "late", payload, 1, 15)
        assert status == 504 and orjson.loads(body)["error"]["code"] == "upstream_timeout", body
        assert outcome.backend == "l4"
        # The proxy hung up, so the engine stopped generating for it.
        wait_until(lambda: sim.truth("late-0").get("end_s") is not None, 10, "the backend to drop the request")
        row = _booked(proxy, db, "late-0")
        assert row.status == 504 and row.backend == "l4" and row.joules > 0 and row.prompt_tokens > 0, row
        tally(figures, [outcome], {"late-0"})
        figures.check()
    finally:
        proxy.stop()
        sim.stop()
    assert "Traceback" not in proxy.log()


def test_a_client_leaving_a_stream_is_booked_and_the_upstream_closed(tmp_path: Path, figures: Figures) -> None:
    figures.scenario = "client_left_stream"
    with lone_fault_proxy("slow_stream", tmp_path, 30.0) as (server, proxy, db):
        payload = {"model": MODEL, "messages": MESSAGES, "max_tokens": 100, "stream": True}
        # Two chunks are out (the first ones leave at once, then one every SLOW_GAP_S).
        left_s = _leave_after(proxy, "left-stream", payload, lambda: server.posts == 1)
        wait_until(lambda: server.closed_s, 10, "the proxy to close the upstream")
        hang_up_s = server.closed_s[0] - left_s
        assert hang_up_s < HANG_UP_S, hang_up_s
        figures.notes.append(f"upstream closed {hang_up_s * 1000:.0f} ms after the client left")
        row = _booked(proxy, db, "left-stream")
        assert row.status == 499 and row.backend == "slow_stream", row
        assert row.completion_tokens < SLOW_EVENTS  # what was generated until the hang-up, no more
        tally(figures, [Outcome("left-stream", "clean", "slow_stream", 0, 0.0)], {"left-stream"})
        figures.check()


def test_a_client_leaving_a_whole_answer_is_booked_and_the_upstream_closed(tmp_path: Path, figures: Figures) -> None:
    """Non-streamed: the proxy is waiting for the head (a hung engine) when the client leaves."""
    figures.scenario = "client_left_whole"
    with lone_fault_proxy("hang", tmp_path, 30.0) as (server, proxy, db):
        payload = {"model": MODEL, "messages": MESSAGES, "max_tokens": 100}
        left_s = _leave_after(proxy, "left-whole", payload, lambda: server.posts == 1)
        wait_until(lambda: server.closed_s, 10, "the proxy to close the upstream")
        hang_up_s = server.closed_s[0] - left_s
        assert hang_up_s < HANG_UP_S, hang_up_s
        figures.notes.append(f"upstream closed {hang_up_s * 1000:.0f} ms after the client left")
        row = _booked(proxy, db, "left-whole")
        assert row.status == 499 and row.backend == "hang" and row.prompt_tokens > 0, row
        tally(figures, [Outcome("left-whole", "clean", "hang", 0, 0.0)], {"left-whole"})
        figures.check()


def test_streams_are_bounded_by_their_idle_gap_not_request_timeout(tmp_path: Path, figures: Figures) -> None:
    """request_timeout_s 1 bounds only the head: a 3 s healthy stream completes; a stream that
    goes silent is cut after stream_idle_timeout_s with a 504 error event, and booked."""
    figures.scenario = "stream_idle_cut"
    slow, stall = FaultServer("slow_stream"), FaultServer("stall_stream")
    db = tmp_path / "ledger.db"
    config = proxy_yaml([("slow", slow.url, ""), ("stall", stall.url, "")],
                        "request_timeout_s: 1.0, stream_idle_timeout_s: 1.0, health_interval_s: 0.2",
                        f"sqlite:///{db}")
    proxy = ProxyProc(config, tmp_path)
    try:
        payload = {"model": MODEL, "messages": MESSAGES, "max_tokens": 100, "stream": True}
        # Round robin: one to each backend.
        results = post_many(proxy, "idle", payload, 2, 15)
        by_backend = {o.backend: (o, body, status) for o, body, status in results}
        healthy, _, status = by_backend["slow"]
        assert status == 200 and healthy.result == "ok" and healthy.tokens == SLOW_EVENTS, healthy
        assert healthy.elapsed_s > SLOW_EVENTS * SLOW_GAP_S * 0.9  # it did outlast request_timeout_s
        stalled, body, status = by_backend["stall"]
        assert status == 200 and stalled.result == "clean" and stalled.tokens == CUT_EVENTS, (stalled, body[-300:])
        error = orjson.loads(body.rstrip().rsplit(b"\n\n", 1)[-1].removeprefix(b"data: "))["error"]
        assert error["code"] == "upstream_timeout", error
        wait_until(lambda: stall.closed_s, 10, "the proxy to close the stalled upstream")
        rows = {i: _booked(proxy, db, o.request_id) for i, (o, _, _) in by_backend.items()}
        assert rows["slow"].status == 200 and rows["slow"].completion_tokens == SLOW_EVENTS
        assert rows["stall"].status == 504 and rows["stall"].completion_tokens == CUT_EVENTS
        tally(figures, [o for o, _, _ in results], {o.request_id for o, _, _ in results})
        figures.check()
    finally:
        proxy.stop()
        slow.stop()
        stall.stop()
    assert "Traceback" not in proxy.log()


def test_a_stream_past_stream_max_s_is_cut(tmp_path: Path) -> None:
    """A healthy 3 s stream under `stream_max_s: 1`: cut with a 504 error event, booked."""
    server = FaultServer("slow_stream")
    db = tmp_path / "ledger.db"
    proxy = ProxyProc(proxy_yaml([("slow", server.url, "")], "stream_max_s: 1.0, health_interval_s: 0.2",
                                 f"sqlite:///{db}"), tmp_path)
    try:
        payload = {"model": MODEL, "messages": MESSAGES, "max_tokens": 100, "stream": True}
        [(outcome, body, status)] = post_many(proxy, "capped", payload, 1, 15)
        assert status == 200 and outcome.result == "clean", (outcome, body[-300:])
        assert b'"code":"upstream_timeout"' in body
        row = _booked(proxy, db, "capped-0")
        assert row.status == 504 and 0 < row.completion_tokens < SLOW_EVENTS, row
    finally:
        proxy.stop()
        server.stop()
