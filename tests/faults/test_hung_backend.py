"""Scenario 2: a backend that takes the connection and the request, and never answers.

Alone, it costs every request it gets exactly the proxy's deadline: a clean 504
`upstream_timeout`, streamed or not, never a hang. The backend had each request, so each is
booked once, with status 504 (and the backend named on the error). A request that ran past its
own limit is not a broken backend: beside a working one, the circuit breaker
(`server.circuit_failures`) does not count time-outs, so the hung backend keeps its share.
"""

from __future__ import annotations

from pathlib import Path

import orjson

from tests.conftest import MODEL, ProxyProc, SimBackend
from tests.faults.conftest import Figures
from tests.faults.ledgers import flush_ledger, sqlite_ledger
from tests.faults.load import (
    MESSAGES,
    Outcome,
    lone_fault_proxy,
    post_many,
    proxy_yaml,
    tally,
)
from tests.faults.servers import FaultServer

TIMEOUT_S = 2.0
DEADLINE_S = TIMEOUT_S + 8.0  # the proxy's deadline plus a margin for a loaded 2-core machine


def _post_all(proxy: ProxyProc, prefix: str, n: int, stream: bool) -> list[tuple[Outcome, bytes, int]]:
    """`n` chat completions at once (4 tokens each); their outcomes, bodies and statuses."""
    payload = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": stream}
    return post_many(proxy, prefix, payload, n, DEADLINE_S)


def _assert_timed_out(outcome: Outcome, body: bytes, status: int) -> None:
    """A clean 504 upstream_timeout, after the proxy's deadline and well before the client's."""
    assert status == 504 and outcome.result == "clean", (outcome, body[:200])
    assert orjson.loads(body)["error"]["code"] == "upstream_timeout"
    assert TIMEOUT_S * 0.9 <= outcome.elapsed_s < DEADLINE_S, outcome


def test_hung_backend_answers_504_in_time(tmp_path: Path, figures: Figures) -> None:
    figures.scenario = "hung_504"
    with lone_fault_proxy("hang", tmp_path, TIMEOUT_S) as (hung, proxy, db):
        results = _post_all(proxy, "hung-whole", 4, False) + _post_all(proxy, "hung-stream", 4, True)
        flush_ledger(proxy)
        booked = sqlite_ledger(db)
        tally(figures, [o for o, _, _ in results], set(booked))
        for result in results:
            _assert_timed_out(*result)
            assert result[0].backend == "hang"  # the error names the backend that billed it
        assert hung.posts == len(results)  # each one did reach the hung backend
        # Each is booked once (the reader fails on a repeated id), as a 504 with its prompt.
        assert sorted(booked) == sorted(o.request_id for o, _, _ in results)
        assert {b.status for b in booked.values()} == {504}
        assert all(b.prompt_tokens > 0 and b.completion_tokens == 0 for b in booked.values())
        figures.check()


def test_timeouts_do_not_open_the_circuit(tmp_path: Path, figures: Figures) -> None:
    figures.scenario = "hung_no_breaker"
    hung = FaultServer("hang")
    sim = SimBackend("h100-llama3.1-8b", tmp_path, seed=21)
    db = tmp_path / "ledger.db"
    config = proxy_yaml([("hung", hung.url, ""), ("sim", sim.url, "")],
                        f"request_timeout_s: {TIMEOUT_S}, health_interval_s: 0.2, "
                        "circuit_failures: 2, circuit_cooldown_s: 60", f"sqlite:///{db}")
    proxy = ProxyProc(config, tmp_path)
    try:
        # Round robin: two of the first four go to the hung backend and time out. Two
        # consecutive failures would open its circuit, but time-outs are not failures...
        first = _post_all(proxy, "breaker-first", 4, False)
        # ... so it still gets its share of the next ones.
        after = _post_all(proxy, "breaker-after", 4, False)
        flush_ledger(proxy)
        tally(figures, [o for o, _, _ in first + after], set(sqlite_ledger(db)))
        for results in (first, after):
            timed_out = [r for r in results if r[2] != 200]
            assert len(timed_out) == 2, [r[0] for r in results]
            for result in timed_out:
                _assert_timed_out(*result)
        assert all(o.result == "ok" for o, _, s in first + after if s == 200)
        assert hung.posts == 4
        assert "circuit open" not in proxy.log()
        figures.check()
    finally:
        proxy.stop()
        sim.stop()
        hung.stop()
    assert "Traceback" not in proxy.log()
