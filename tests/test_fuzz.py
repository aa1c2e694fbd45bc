"""Hostile input on every public endpoint, a sample of `bench/fuzz`: the proxy answers 4xx in
OpenAI's shape and never 5xx, stays up, logs no traceback and keeps its memory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings

from bench.fuzz import check, describe, fleet, health_problems, rss_kib
from bench.fuzz_cases import Case, auth_headers, cases, encode, request
from tests.conftest import KEYS, MODEL, ProxyProc

#: RSS of the proxy once the fleet is up, before the sample (KiB).
_RSS_START: dict[str, int] = {}
_ACME = auth_headers("acme")
_EMBED = encode({"model": MODEL, "input": "hi"})


def _case(family: str, method: str, target: bytes, body: bytes | None = None, **flags: bool) -> Case:
    return Case(family, request(method, target, _ACME, body), f"regression {method} {target[:60]!r}", **flags)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProc]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    with fleet(tmp) as proxy:
        _RSS_START["kib"] = rss_kib(proxy.popen.pid)
        yield proxy


# Regressions first: each of these once reached a backend's non-API routes, answered 5xx, or
# stalled a simulator.
@example(case=_case("paths", "POST", b"/v1/../metrics", _EMBED, may_forward=False))
@example(case=_case("paths", "POST", b"/v1/%2e%2e%2fsim/requests/x", _EMBED, may_forward=False))
@example(case=_case("paths", "POST", b"/v1/x%3Fa=b", _EMBED, may_forward=False))
@example(case=_case("passthrough", "POST", b"/v1/x?q=" + b"y" * 9000, _EMBED))
@example(case=_case("energy-usage", "GET", b"/v1/energy/usage?since=1e400"))
@example(case=_case("energy-usage", "GET", b"/v1/energy/usage?until=nan"))
@example(case=_case("energy-usage", "GET", b"/v1/energy/usage?since=1e300&group_by=hour"))
@example(case=_case("energy-usage", "POST", b"/v1/energy/usage", _EMBED, may_forward=False))
@example(case=_case("embeddings", "POST", b"/v1/embeddings",
                    encode({"model": MODEL, "input": ["a"] * 3000, "dimensions": 8192})))
@settings(max_examples=300, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
@given(case=cases)
def test_hostile_requests_get_openai_shaped_4xx(proxy: ProxyProc, case: Case) -> None:
    verdict = check(proxy.port, case)
    assert verdict.problem is None, describe(case, verdict)


def test_reused_request_id_in_flight_never_breaks_the_proxy(proxy: ProxyProc) -> None:
    """A second request with the x-request-id of one still streaming once hit the meter's 500.
    Now it is a request of its own (tests/test_isolation.py); the simulator, like an engine that
    keys on the id, may refuse it, and that answer is relayed in OpenAI's shape."""
    headers = {"Authorization": f"Bearer {KEYS['acme']}", "X-Request-Id": "fuzz-reused-id"}
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64, "stream": True}
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", json=payload, headers=headers, timeout=30) as first:
        assert first.status_code == 200
        second = httpx.post(proxy.url + "/v1/chat/completions", json=payload, headers=headers, timeout=30)
        assert second.status_code < 500, second.text
        if second.status_code != 200:
            assert set(second.json()["error"]) == {"message", "type", "param", "code"}
        assert b"data: [DONE]" in first.read()


def test_proxy_survives_the_sample(proxy: ProxyProc) -> None:
    assert health_problems(proxy, _RSS_START["kib"]) == []
