"""Scenario 3: a backend that answers garbage gets the client a clean error, never a 500 or a hang.

(a) `not_http`: random bytes, then close -> 502 upstream_error, streamed or not;
(b) `not_json`: HTTP 200 whose body is not JSON, non-streamed -> 502 upstream_error;
(c) `sse_garbage`: a stream that turns into binary junk -> the good events, then an SSE error
    event; the junk (no complete event) is never relayed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.conftest import MODEL, ProxyProc
from tests.faults.conftest import Figures
from tests.faults.ledgers import flush_ledger, sqlite_ledger
from tests.faults.load import (
    MESSAGES,
    Outcome,
    lone_fault_proxy,
    post_many,
    tally,
)
from tests.faults.servers import FaultServer, chat_chunk

TIMEOUT_S = 3.0
DEADLINE_S = TIMEOUT_S + 7.0  # the proxy's deadline plus a margin for a loaded 2-core machine
N = 6  # requests per case

@pytest.fixture
def garbage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[FaultServer, ProxyProc, Path]]:
    """The fault server for this case, and a proxy (SQLite ledger) with it as the only backend."""
    with lone_fault_proxy(request.param, tmp_path, TIMEOUT_S) as setup:
        yield setup


def _run(proxy: ProxyProc, stream: bool) -> list[tuple[Outcome, bytes, int]]:
    payload = {"model": MODEL, "messages": MESSAGES, "max_tokens": 5, "stream": stream}
    return post_many(proxy, f"garbage-{stream}", payload, N, DEADLINE_S)


@pytest.mark.parametrize("garbage", ["not_http", "not_json"],
                         indirect=True)
def test_garbage_answer_is_a_clean_502(garbage: tuple[FaultServer, ProxyProc, Path], figures: Figures) -> None:
    server, proxy, db = garbage
    figures.scenario = f"garbage_{server.mode}"
    # (a) fails before any byte reaches the client, streamed or not; (b) is about JSON bodies.
    results = _run(proxy, False) + (_run(proxy, True) if server.mode == "not_http" else [])
    flush_ledger(proxy)
    outcomes = [o for o, _, _ in results]
    tally(figures, outcomes, set(sqlite_ledger(db)))
    assert server.posts >= len(results)  # each request did reach the bad backend
    for outcome, body, status in results:
        assert outcome.result not in ("hung", "unclean"), outcome
        assert status == 502, (status, body[:200])
        error = orjson.loads(body)["error"]
        assert error["code"] == "upstream_error" and error["type"] == "upstream_error", error
        assert outcome.elapsed_s < DEADLINE_S
    figures.check()


@pytest.mark.parametrize("garbage", ["sse_garbage"], indirect=True)
def test_garbage_stream_ends_with_an_error_event(garbage: tuple[FaultServer, ProxyProc, Path],
                                                 figures: Figures) -> None:
    server, proxy, db = garbage
    figures.scenario = "garbage_sse"
    results = _run(proxy, True)
    flush_ledger(proxy)
    booked = sqlite_ledger(db)
    tally(figures, [o for o, _, _ in results], set(booked))
    for outcome, body, status in results:
        assert status == 200 and outcome.result == "clean", (outcome, body[-200:])
        events = body.split(b"\n\n")
        # The one good chunk, then the proxy's error event; not a byte of the junk.
        assert body.startswith(chat_chunk(0)), body[:200]
        assert events[1].startswith(b'data: {"error":') and events[2:] == [b""], body[-300:]
        # Billed once, with the one token that was relayed.
        assert booked[outcome.request_id].completion_tokens == 1
    figures.check()
