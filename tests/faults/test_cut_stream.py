"""Scenario 4: a backend that breaks off a stream in the middle of an event.

It sends the SSE headers, CUT_EVENTS complete chunks, half of the next event, then closes: in
the middle of an HTTP chunk (`cut_chunked`, what vLLM's chunked streams would do) or simply at
EOF (`cut_eof`, a body delimited by the connection). The client must get the complete events,
then one well-formed SSE error event and never the half event; the ledger books the request
once, with the tokens that were relayed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.conftest import MODEL, ProxyProc
from tests.faults.conftest import Figures
from tests.faults.ledgers import flush_ledger, sqlite_ledger
from tests.faults.load import (
    MESSAGES,
    client,
    lone_fault_proxy,
    post_many,
    sdk_stream,
    tally,
)
from tests.faults.servers import CUT_EVENTS, HALF_EVENT, FaultServer, chat_chunk

TIMEOUT_S = 3.0
DEADLINE_S = TIMEOUT_S + 7.0  # the proxy's deadline plus a margin for a loaded 2-core machine
N = 8  # raw streams per case, sent at once


@pytest.fixture(params=["cut_chunked", "cut_eof"])
def cutter(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[FaultServer, ProxyProc, Path]]:
    """The cutting server and a proxy (SQLite ledger) with it as the only backend."""
    with lone_fault_proxy(request.param, tmp_path, TIMEOUT_S) as setup:
        yield setup


def test_stream_cut_mid_event(cutter: tuple[FaultServer, ProxyProc, Path], figures: Figures) -> None:
    server, proxy, db = cutter
    figures.scenario = server.mode
    payload = {"model": MODEL, "messages": MESSAGES, "max_tokens": 20, "stream": True}

    raw = post_many(proxy, server.mode, payload, N, DEADLINE_S)
    # And through the SDK: the error event is an APIError, not a broken connection.
    sdk = asyncio.run(sdk_stream(client(proxy, DEADLINE_S + 5), f"{server.mode}-sdk", 20, DEADLINE_S))
    flush_ledger(proxy)
    booked = sqlite_ledger(db)
    tally(figures, [o for o, _, _ in raw] + [sdk], set(booked))

    complete = b"".join(chat_chunk(i) for i in range(CUT_EVENTS))
    for outcome, body, status in raw:
        assert status == 200 and outcome.result == "clean", (outcome, body[-300:])
        assert body.startswith(complete), body[:300]
        rest = body[len(complete):]
        # Exactly one event after the complete ones: the proxy's error, OpenAI-shaped.
        assert rest.startswith(b"data: ") and rest.endswith(b"\n\n") and rest.count(b"\n\n") == 1, rest
        error = orjson.loads(rest[len(b"data: "):])["error"]
        assert error["code"] == "upstream_error" and error["message"], error
        assert HALF_EVENT not in body
        assert outcome.tokens == CUT_EVENTS
    assert sdk.result == "clean" and sdk.tokens == CUT_EVENTS, sdk
    assert sdk.detail == "stream error upstream_error", sdk
    # Booked once each (the ledger keys rows by request id), with the tokens relayed.
    for outcome in [o for o, _, _ in raw] + [sdk]:
        assert booked[outcome.request_id].completion_tokens == CUT_EVENTS
        assert booked[outcome.request_id].status == 502  # the ledger says how it ended
        assert booked[outcome.request_id].backend == server.mode  # the backend is named after its mode
    assert server.posts == N + 1
    figures.check()

