"""GET /v1/energy/stream (SSE snapshots for the dashboard) and the opt-in access log, against a
real proxy with simulated GPUs."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.auth import Principal
from proxy.dashboard.stream import EnergyStream, parse_interval_s
from proxy.errors import ProxyError
from tests.conftest import (
    ADMIN_KEY,
    KEYS,
    MODEL,
    ProxyProc,
    SimBackend,
    backend_yaml,
    sdk_client,
    tenants_yaml,
    wait_until,
)

MESSAGES = [{"role": "user", "content": "How many joules does a dashboard cost?"}]
ADMIN_ONLY = ("in_flight", "power_w", "governor_cap_w")


def power_config(sims: dict[str, SimBackend], extra: str = "", names: tuple[str, ...] = ("h100", "a100")) -> str:
    """A proxy config over simulated GPUs `names`, each with its simulated power source."""
    config = "backends:\n"
    for name in names:
        url = sims[name].url
        config += backend_yaml(name, url, [MODEL], f", power: {{source: sim, url: '{url}', interval_s: 0.05}}")
    return config + "routing: {policy: round_robin}\nledger: memory://\n" + extra + tenants_yaml()


@pytest.fixture(scope="module")
def proxy(sims: dict[str, SimBackend], session_tmp: Path) -> Iterator[ProxyProc]:
    proc = ProxyProc(power_config(sims, "server: {access_log: true}\n"), session_tmp)
    yield proc
    proc.stop()
    assert "Traceback" not in proc.log()


def _chat(proxy: ProxyProc, tenant: str, n: int = 1) -> list[str]:
    """`n` chat requests as `tenant`; their request ids."""
    client = sdk_client(proxy, tenant)
    ids = []
    for _ in range(n):
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=8)
        ids.append(raw.headers["x-request-id"])
    return ids


def _events(proxy: ProxyProc, key: str, until: Callable[[dict[str, Any]], bool], timeout_s: float = 20.0,
            interval_s: float = 0.5) -> list[dict[str, Any]]:
    """Snapshots from the stream until one satisfies `until` (fails after `timeout_s`)."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    with httpx.stream("GET", f"{proxy.url}/v1/energy/stream?interval_s={interval_s}", timeout=10,
                      headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
                if until(seen[-1]):
                    return seen
            assert time.monotonic() < deadline, f"no matching snapshot in {timeout_s} s: {seen[-1:]}"
    raise AssertionError("the stream ended early")


def _tenant(snapshot: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((t for t in snapshot["tenants"] if t["tenant"] == name), None)


def test_stream_needs_a_key_and_a_sane_interval(proxy: ProxyProc) -> None:
    resp = httpx.get(proxy.url + "/v1/energy/stream", timeout=10)
    assert resp.status_code == 401
    assert resp.json()["error"]["type"] == "authentication_error"
    for bad in ("0.1", "abc", "nan", "1e9"):
        resp = httpx.get(proxy.url + f"/v1/energy/stream?interval_s={bad}", timeout=10,
                         headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert resp.status_code == 400, bad
        assert resp.json()["error"]["param"] == "interval_s"
    resp = httpx.post(proxy.url + "/v1/energy/stream", timeout=10, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert resp.status_code == 405


def test_admin_snapshot_shape_and_it_changes(proxy: ProxyProc) -> None:
    first, second = _events(proxy, ADMIN_KEY, lambda s: "history" not in s)[:2]
    assert "history" not in second  # only a stream's first snapshot carries it
    assert set(first["history"]) == {"h100", "a100"}
    assert all(len(sample) == 3 for samples in first["history"].values() for sample in samples)
    assert {b["name"] for b in first["backends"]} == {"h100", "a100"}
    for backend in first["backends"]:
        assert set(backend) >= {"name", "healthy", "models", "tokens_per_joule", *ADMIN_ONLY}
    assert set(first["fleet"]) == {"tokens_per_joule_now", "tokens_per_joule_hour"}
    before = _tenant(first, "acme") or {"requests": 0, "joules": 0.0}
    _chat(proxy, "acme", 3)

    def booked(s: dict[str, Any]) -> bool:
        row = _tenant(s, "acme")
        return row is not None and row["requests"] >= before["requests"] + 3 and row["joules"] > before["joules"]

    last = _events(proxy, ADMIN_KEY, booked)[-1]
    row = _tenant(last, "acme")
    assert row is not None and row["tokens"] > 0 and row["tokens"] == row["prompt_tokens"] + row["completion_tokens"]
    assert any(b["power_w"] is not None and b["power_w"] > 0 for b in last["backends"])
    assert last["fleet"]["tokens_per_joule_hour"] > 0


def test_tenant_sees_only_its_own_numbers(proxy: ProxyProc) -> None:
    _chat(proxy, "acme")
    _chat(proxy, "globex")
    # Wait until the admin sees both tenants, then a tenant must see only itself.
    _events(proxy, ADMIN_KEY, lambda s: bool(_tenant(s, "acme") and _tenant(s, "globex")))
    snap = _events(proxy, KEYS["globex"], lambda s: _tenant(s, "globex") is not None)[-1]
    assert [t["tenant"] for t in snap["tenants"]] == ["globex"]
    assert snap["subscribers"] is None
    history = _events(proxy, KEYS["globex"], lambda s: True)[0]["history"]
    assert history["h100"] and all(power is None for _, power, _ in history["h100"])
    for backend in snap["backends"]:
        assert not set(ADMIN_ONLY) & set(backend), backend
        assert {"name", "healthy", "tokens_per_joule"} <= set(backend)


def test_stream_ends_when_the_client_leaves(proxy: ProxyProc) -> None:
    # An admin snapshot counts the open streams: a second one opened and closed must go away.
    with httpx.stream("GET", f"{proxy.url}/v1/energy/stream?interval_s=0.5", timeout=10,
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as watcher:
        lines = watcher.iter_lines()

        def subscribers() -> int:
            for line in lines:
                if line.startswith("data: "):
                    return int(json.loads(line[6:])["subscribers"])
            raise AssertionError("stream ended")

        with httpx.stream("GET", f"{proxy.url}/v1/energy/stream", timeout=10,
                          headers={"Authorization": f"Bearer {KEYS['acme']}"}) as leaving:
            leaving_lines = leaving.iter_lines()  # kept: a dropped iterator closes the response
            next(leaving_lines)
            wait_until(lambda: subscribers() == 2, 15, "two subscribers")
        wait_until(lambda: subscribers() == 1, 15, "the departed subscriber to be gone")


def test_access_log_lines(proxy: ProxyProc) -> None:
    request_id = _chat(proxy, "acme")[0]
    stream = sdk_client(proxy, "acme").chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, stream=True)
    streamed_id = stream.headers["x-request-id"]
    assert list(stream.parse())

    def line(rid: str) -> dict[str, Any] | None:
        for text in proxy.log().splitlines():
            if "joulegate.access:" in text and rid in text:
                return json.loads(text.split("joulegate.access: ", 1)[1])
        return None

    wait_until(lambda: line(request_id) is not None and line(streamed_id) is not None, 15, "the access log lines")
    entry, streamed = line(request_id), line(streamed_id)
    assert entry is not None and streamed is not None
    assert 0 < streamed["ttft_ms"] <= streamed["total_ms"]
    assert entry["tenant"] == "acme" and entry["model"] == MODEL and entry["status"] == 200
    assert entry["backend"] in ("h100", "a100")
    assert entry["completion_tokens"] > 0 and entry["prompt_tokens"] > 0
    assert entry["joules"] is not None and entry["joules"] > 0
    # Not streamed, but gathered from the engine's stream (the backend has a power source): its
    # first token was seen on the way.
    assert 0 < entry["ttft_ms"] <= entry["total_ms"]
    assert set(entry) >= {"time", "request_id", "energy_method"}
    log = proxy.log()
    for key in (*KEYS.values(), ADMIN_KEY):
        assert key not in log


def test_drain_ends_streams_and_access_log_is_off_by_default(sims: dict[str, SimBackend], session_tmp: Path) -> None:
    proc = ProxyProc(power_config(sims), session_tmp)
    try:
        _chat(proc, "acme")
        with httpx.stream("GET", f"{proc.url}/v1/energy/stream?interval_s=0.5", timeout=10,
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            started = time.monotonic()
            proc.popen.send_signal(signal.SIGTERM)
            rest = list(lines)  # ends: the proxy closes the stream instead of waiting 30 s for it
        assert "event: end" in rest
        assert time.monotonic() - started < 15
        assert proc.popen.wait(15) in (0, -signal.SIGTERM)  # uvicorn re-raises it after draining
    finally:
        proc.stop()
    assert "joulegate.access" not in proc.log()
    assert "Traceback" not in proc.log()


def test_interval_parsing_and_tenant_view() -> None:
    assert parse_interval_s({}) == 1.0
    assert parse_interval_s({"interval_s": "0.5"}) == 0.5
    with pytest.raises(ProxyError):
        parse_interval_s({"interval_s": "-1"})
    snap = {"backends": [{"name": "a", "healthy": True, "tokens_per_joule": 2.0, "power_w": 300.0,
                          "in_flight": 3, "governor_cap_w": 250.0}],
            "tenants": [{"tenant": "acme", "joules": 1.0}, {"tenant": "globex", "joules": 2.0}],
            "fleet": {}, "ledger_error": "ConnectionError", "subscribers": 4}
    view = EnergyStream.view_for(snap, Principal("acme"))
    assert view["backends"] == [{"name": "a", "healthy": True, "tokens_per_joule": 2.0}]
    assert view["tenants"] == [{"tenant": "acme", "joules": 1.0}]
    assert EnergyStream.view_for(snap, Principal("admin", is_admin=True)) is snap


def test_dashboard_page_is_served(proxy: ProxyProc) -> None:
    resp = httpx.get(proxy.url + "/dashboard", timeout=10)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    page = resp.text
    assert 'name="api_key"' in page and 'type="password"' in page
    assert "/v1/energy/stream" in page and "sessionStorage" in page
    assert "<script src=" not in page and "https://" not in page  # no CDN, nothing fetched elsewhere
