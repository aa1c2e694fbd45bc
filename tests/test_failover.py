"""Backends that die, and a proxy told to stop: clients get clean errors or complete answers."""

from __future__ import annotations

import threading
from pathlib import Path

import openai
import pytest

from tests.conftest import (
    MODEL,
    ProxyProc,
    SimBackend,
    backend_yaml,
    sdk_client,
    tenants_yaml,
    wait_until,
)

MESSAGES = [{"role": "user", "content": "Tell me about watts."}]


def _config(backends: dict[str, SimBackend]) -> str:
    text = "server: {health_interval_s: 30}\nbackends:\n"
    for name, sim in backends.items():
        text += backend_yaml(name, sim.url, [MODEL])
    return text + "routing: {policy: round_robin}\nledger: memory://\n" + tenants_yaml()


def test_backend_killed_mid_stream_then_failover(tmp_path: Path) -> None:
    a = SimBackend("l4-llama3.1-8b", tmp_path, seed=1)
    b = SimBackend("h100-llama3.1-8b", tmp_path, seed=2)
    # The health interval is long, so the proxy still believes `a` is up after it dies.
    proxy = ProxyProc(_config({"a": a, "b": b}), tmp_path)
    try:
        c = sdk_client(proxy)
        # Round robin: the first request goes to `a` (60 ms a token: a long stream).
        stream = c.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=400, stream=True)
        assert stream.headers["x-energy-backend"] == "a"
        chunks = iter(stream.parse())
        next(chunks)
        a.kill()
        with pytest.raises(openai.APIError):
            for _ in chunks:
                pass
        # `a` now refuses connections: every request lands on `b`, none fails.
        for _ in range(4):
            raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=3)
            assert raw.parse().usage.completion_tokens == 3
            assert raw.headers["x-energy-backend"] == "b"
        assert "Traceback" not in proxy.log()
    finally:
        proxy.stop()
        a.stop()
        b.stop()


def test_sigterm_drains_in_flight_streams(tmp_path: Path) -> None:
    sim = SimBackend("l4-llama3.1-8b", tmp_path, seed=3)
    proxy = ProxyProc(_config({"only": sim}), tmp_path)
    try:
        c = sdk_client(proxy)
        stream = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=30, stream=True)
        chunks = iter(stream)
        first = next(chunks)
        assert first.choices
        stopper = threading.Thread(target=proxy.popen.terminate)
        stopper.start()
        rest = [ch for ch in chunks if ch.choices and ch.choices[0].delta.content]
        stopper.join()
        # All 30 tokens arrive although SIGTERM came after the first chunk.
        got_first = 1 if first.choices[0].delta.content else 0
        assert len(rest) + got_first == 30
        wait_until(lambda: proxy.popen.poll() is not None, 20, "the proxy to exit after draining")
        assert proxy.popen.returncode in (0, -15)  # uvicorn re-raises SIGTERM after draining
    finally:
        proxy.stop()
        sim.stop()


def test_client_disconnect_frees_the_gpu_and_timeouts_answer_504(tmp_path: Path) -> None:
    sim = SimBackend("l4-llama3.1-8b", tmp_path, seed=4)
    config = _config({"only": sim}).replace("server: {health_interval_s: 30}",
                                            "server: {health_interval_s: 30, request_timeout_s: 1.0}")
    proxy = ProxyProc(config, tmp_path)
    try:
        c = sdk_client(proxy)
        raw = c.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=300, stream=True, extra_headers={"x-request-id": "gone-1"})
        chunks = iter(raw.parse())
        next(chunks)
        raw.http_response.close()  # the client walks away mid-stream
        # The proxy closes its upstream request, so the simulated GPU stops generating for it.
        wait_until(lambda: sim.truth("gone-1").get("end_s") is not None, 10, "the backend to drop the request")
        assert sim.truth("gone-1")["completion_tokens"] < 300
        # A non-streamed answer that takes longer than request_timeout_s: 504, OpenAI-shaped.
        with pytest.raises(openai.InternalServerError) as info:
            c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=300)
        assert info.value.status_code == 504
        assert info.value.code == "upstream_timeout"
    finally:
        proxy.stop()
        sim.stop()


def test_circuit_opens_after_repeated_5xx_and_global_cap_answers_429(tmp_path: Path) -> None:
    from tests.test_proxy_sdk import BROKEN_MODEL, BrokenBackend

    sim = SimBackend("l4-llama3.1-8b", tmp_path, seed=5)
    broken = BrokenBackend()
    config = _config({"only": sim}).replace(
        "server: {health_interval_s: 30}",
        "server: {health_interval_s: 30, circuit_failures: 3, circuit_cooldown_s: 60, max_in_flight: 1}")
    config = config.replace("routing:", f"  - {{name: broken, url: '{broken.url}/v1'}}\nrouting:", 1)
    proxy = ProxyProc(config, tmp_path)
    try:
        c = sdk_client(proxy)
        statuses = []
        for _ in range(5):
            with pytest.raises(openai.InternalServerError) as info:
                c.chat.completions.create(model=BROKEN_MODEL, messages=MESSAGES)
            statuses.append(info.value.status_code)
        # Three answered 5xx open the circuit: the rest never reach the broken backend.
        assert statuses == [502, 502, 502, 503, 503]
        # One request in flight is the proxy's limit: a second one is refused cleanly.
        stream = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100, stream=True)
        try:
            next(iter(stream))
            with pytest.raises(openai.RateLimitError) as info:
                c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
            assert info.value.status_code == 429 and info.value.code == "rate_limit_exceeded"
            assert info.value.response.headers["retry-after"] == "1"
        finally:
            stream.close()
    finally:
        proxy.stop()
        sim.stop()


def test_half_open_circuit_lets_one_probe_through() -> None:
    from proxy.backends import Backend
    from proxy.config import BackendConfig

    backend = Backend(BackendConfig(name="b", url="http://127.0.0.1:9/v1"), circuit_failures=2,
                      circuit_cooldown_s=60)
    backend.record_failure("HTTP 500")
    assert backend.view().healthy
    backend.record_failure("HTTP 500")
    assert not backend.view().healthy  # open: cooling down
    backend.circuit_open_until_s = 1e-9  # the cooldown is over: half-open
    assert backend.view().healthy
    backend.in_flight = 1  # the probe is out: nobody else goes
    assert not backend.view().healthy
    backend.in_flight = 0
    backend.record_failure("HTTP 500")  # the probe failed: open again at once
    assert not backend.view().healthy
    backend.circuit_open_until_s = 1e-9
    backend.record_success()  # a probe got through: closed
    backend.in_flight = 3
    assert backend.view().healthy and backend.consecutive_failures == 0
