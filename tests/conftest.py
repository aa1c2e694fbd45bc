"""Shared test fixtures: real processes on real sockets (simulated backends, the proxy)."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from proxy.backends import BackendPool
from proxy.config import Config, parse_config

REPO = Path(__file__).resolve().parent.parent
MODEL = "llama-3.1-8b"
KEYS = {"acme": "sk-test-acme-0001", "globex": "sk-test-globex-0002"}
ADMIN_KEY = "sk-test-admin-0003"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout_s: float = 15.0, what: str = "condition") -> None:
    """Poll `predicate` until true; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


class Proc:
    """A child process with its output in a log file; stopped on teardown."""

    def __init__(self, args: list[str], log_path: Path, name: str) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "proxy", *args], cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def stop(self, timeout_s: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode


class SimBackend(Proc):
    def __init__(self, profile: str, tmp: Path, model: str = MODEL, seed: int = 0) -> None:
        self.port = free_port()
        self.profile = profile
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            ["sim-backend", "--profile", profile, "--port", str(self.port), "--model", model, "--seed", str(seed)],
            tmp / f"sim-{profile}-{self.port}.log", f"sim-{profile}",
        )
        wait_until(lambda: self.popen.poll() is not None or _answers(f"{self.url}/v1/models"), 30,
                   f"{profile} simulator to answer")
        assert self.popen.poll() is None, self.log()

    def truth(self, request_id: str) -> dict:
        return httpx.get(f"{self.url}/sim/requests/{request_id}", timeout=5).json()

    def limit_w(self) -> float:
        """Its GPU's power limit now (W), from its agent API."""
        return float(httpx.get(f"{self.url}/v1/power/limits", timeout=5).json()["gpus"][0]["power_limit_w"])

    def governed(self, governor: str) -> tuple[Config, BackendPool]:
        """A config with one backend `h100` on this simulator, its power read and capped through
        the simulator's agent API, and this `governor:` block (a YAML flow mapping); its pool."""
        power = f"power: {{source: sim, url: '{self.url}'}}"
        config = parse_config(f"backends:\n  - {{name: h100, url: '{self.url}/v1', models: [m], {power}}}\n"
                              f"governor: {governor}\n")
        return config, BackendPool(config)


class ProxyProc(Proc):
    def __init__(self, config_text: str, tmp: Path, wait_ready: bool = True,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = tmp / f"joulegate-{self.port}.yaml"
        self.config_path.write_text(config_text)
        super().__init__(["serve", "-c", str(self.config_path), "--port", str(self.port), *extra_args],
                         tmp / f"proxy-{self.port}.log", "proxy")
        check = "/readyz" if wait_ready else "/healthz"
        wait_until(lambda: self.popen.poll() is not None or _answers(self.url + check), 30, "proxy to be ready")
        assert self.popen.poll() is None, self.log()


def backend_yaml(name: str, url: str, models: list[str] | None = None, extra: str = "") -> str:
    models_part = f", models: [{', '.join(models)}]" if models else ""
    return f"  - {{name: {name}, url: '{url}/v1'{models_part}{extra}}}\n"


def tenants_yaml() -> str:
    out = "tenants:\n"
    for tenant, key in KEYS.items():
        out += f"  - {{name: {tenant}, api_keys_sha256: ['{sha256(key)}']}}\n"
    out += f"admin_api_keys_sha256: ['{sha256(ADMIN_KEY)}']\n"
    return out


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("joulegate")


@pytest.fixture(scope="session")
def sims(session_tmp: Path) -> Iterator[dict[str, SimBackend]]:
    """Three simulated GPUs of different kinds serving the same model."""
    started: dict[str, SimBackend] = {}
    try:
        for name, profile in (("h100", "h100-llama3.1-8b"), ("a100", "a100-llama3.1-8b"), ("l4", "l4-llama3.1-8b")):
            started[name] = SimBackend(profile, session_tmp)
        yield started
    finally:
        for sim in started.values():
            sim.stop()


@pytest.fixture
def h100_sim(tmp_path: Path) -> Iterator[SimBackend]:
    """An H100 simulator of this test's own (its power limits are the test's to change)."""
    sim = SimBackend("h100-llama3.1-8b", tmp_path)
    try:
        yield sim
    finally:
        sim.stop()


def sdk_client(proxy: ProxyProc, tenant: str = "acme") -> openai.OpenAI:
    """The openai SDK against `proxy` as `tenant`: no retries, 30 s timeout."""
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEYS[tenant], max_retries=0, timeout=30)


def async_sdk_client(proxy: ProxyProc, tenant: str = "acme") -> openai.AsyncOpenAI:
    """`sdk_client`, async."""
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=KEYS[tenant], max_retries=0,
                              timeout=30)


def stream_chat_raw(proxy: ProxyProc, payload: dict, key: str = KEYS["acme"],
                    ) -> tuple[httpx.Response, bytes]:
    """POST `payload` to the proxy's /v1/chat/completions with plain httpx (no SDK parsing) and
    read the whole body, e.g. the SSE stream as sent."""
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {key}"}, json=payload) as resp:
        body = resp.read()
    return resp, body
