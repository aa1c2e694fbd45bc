"""Scenario 6: SIGTERM to the proxy while streams are running.

N streams are all under way (each has its first chunk) when the proxy gets SIGTERM. It must stop
accepting connections at once, let every running stream finish within `drain_timeout_s`, exit,
and have billed each of them: the SQLite ledger, read after the process is gone, holds exactly
these requests with the tokens their clients received.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from pathlib import Path

from tests.conftest import ProxyProc, SimBackend, wait_until
from tests.faults.conftest import Figures
from tests.faults.ledgers import sqlite_ledger
from tests.faults.load import Outcome, client, proxy_yaml, sdk_stream, tally

DRAIN_S = 15.0  # drain_timeout_s: far above the streams' length, so none is cut by it
TIMEOUT_S = 20.0
DEADLINE_S = TIMEOUT_S + 10.0
N = 24  # streams running at SIGTERM


def _refuses(port: int) -> bool:
    """Whether a new TCP connection to the proxy is refused (its listening socket is closed)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def test_sigterm_drains_running_streams_and_bills_them(h100: SimBackend, tmp_path: Path,
                                                       figures: Figures) -> None:
    figures.scenario = "proxy_sigterm"
    db = tmp_path / "ledger.db"
    power = f", power: {{source: sim, url: '{h100.url}', interval_s: 0.05}}"
    proxy = ProxyProc(proxy_yaml([("h100", h100.url, power)],
                                 f"request_timeout_s: {TIMEOUT_S}, health_interval_s: 0.2, drain_timeout_s: {DRAIN_S}",
                                 f"sqlite:///{db}"), tmp_path)
    marks: dict[str, float | int] = {}

    async def run() -> list[Outcome]:
        sdk = client(proxy, DEADLINE_S + 5)
        started: set[str] = set()
        all_started = asyncio.Event()

        def on_start(request_id: str) -> None:
            started.add(request_id)
            if len(started) == N:
                all_started.set()

        # 150 to 290 tokens: a few seconds each at this concurrency, still running at SIGTERM.
        tasks = [asyncio.create_task(sdk_stream(sdk, f"drain-{i}", 150 + 20 * (i % 8), DEADLINE_S,
                                                on_start=on_start)) for i in range(N)]
        try:
            await asyncio.wait_for(all_started.wait(), DEADLINE_S)
            marks["sigterm"] = time.monotonic()
            proxy.popen.send_signal(signal.SIGTERM)
            await asyncio.to_thread(wait_until, lambda: _refuses(proxy.port), 10, "the proxy to stop accepting")
            marks["refusing"] = time.monotonic()
            marks["open_when_refusing"] = sum(not t.done() for t in tasks)
            return await asyncio.gather(*tasks)
        finally:
            await sdk.close()

    try:
        outcomes = asyncio.run(run())
        tally(figures, outcomes)
        wait_until(lambda: proxy.popen.poll() is not None, DRAIN_S + 10, "the proxy to exit after draining")
        exited = time.monotonic()
        assert proxy.popen.returncode in (0, -signal.SIGTERM), proxy.log()[-2000:]
    finally:
        proxy.stop()
    log = proxy.log()
    assert "Traceback" not in log and "not durable" not in log, log[-3000:]

    # It stopped accepting while the streams were still running, and they all finished in time.
    assert marks["open_when_refusing"] > 0, marks
    assert all(o.result == "ok" for o in outcomes), [o for o in outcomes if o.result != "ok"]
    last_end = max(o.start_s + o.elapsed_s for o in outcomes)
    assert last_end - marks["sigterm"] < DRAIN_S, (last_end - marks["sigterm"], marks)
    booked = sqlite_ledger(db)
    figures.ledger = sum(o.request_id in booked for o in outcomes)
    assert set(booked) == {o.request_id for o in outcomes}, set(booked) ^ {o.request_id for o in outcomes}
    for o in outcomes:
        assert booked[o.request_id].completion_tokens == o.tokens, (o, booked[o.request_id])
    print(f"\nSIGTERM with {N} streams running: refusing new connections after "
          f"{marks['refusing'] - marks['sigterm']:.2f} s with {marks['open_when_refusing']} still open; "
          f"last stream done after {last_end - marks['sigterm']:.2f} s, exit after {exited - marks['sigterm']:.2f} s")
    figures.check()
