"""`joulegate agent` as a child process on the fake pynvml (tests/fake_nvml), and the proxy-side
AgentSource against it: API shape, counter vs scripted power, stream pacing, DCGM-named metrics,
clock-offset estimation (also with a host clock 5 s ahead), reconnection, startup errors."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import PowerConfig
from proxy.energy.sources import PowerSample, make_source
from proxy.energy.sources.agent import AgentSource, OffsetEstimator
from proxy.energy.sources.sim import SimSource

REPO = Path(__file__).resolve().parent.parent
FAKE_DIR = REPO / "tests" / "fake_nvml"
INTERVAL_S = 0.05
H100 = {"uuid": "GPU-aaaaaaaa-1111-2222-3333-444444444444", "name": "NVIDIA H100 80GB HBM3",
        "power_w": 200.0, "energy_start_mj": 123_456_789}
L4 = {"uuid": "GPU-bbbbbbbb-1111-2222-3333-444444444444", "name": "NVIDIA L4",
      "power_w": 75.5, "energy_counter": False}
SCRIPT = {"gpus": [H100, L4]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.01)


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), 20))


def _env(script_path: Path | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": f"{FAKE_DIR}{os.pathsep}{REPO}", "PYTHONUNBUFFERED": "1"}
    env.pop("JOULEGATE_FAKE_NVML", None)
    if script_path is not None:
        env["JOULEGATE_FAKE_NVML"] = str(script_path)
    return env


class Agent:
    """`python -m proxy.agent` (optionally with its clock skewed) on the fake NVML."""

    def __init__(self, tmp: Path, skew_s: float = 0.0, port: int | None = None, *, host: str = "127.0.0.1",
                 extra: tuple[str, ...] = (), token: str | None = None, ca_file: Path | None = None) -> None:
        self.port = port or free_port()
        self.url = f"{'https' if ca_file else 'http'}://127.0.0.1:{self.port}"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.verify: Any = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
        script_path = tmp / f"nvml-{self.port}.json"
        script_path.write_text(json.dumps(SCRIPT))
        self.log_path = tmp / f"agent-{self.port}.log"
        args = ["--host", host, "--port", str(self.port), "--interval-s", str(INTERVAL_S), *extra]
        code = ("import time, proxy.agent as a; "
                f"a._clock = lambda: time.time() + {skew_s!r}; a.main({args!r})")
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=_env(script_path),
                                          stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: self.popen.poll() is not None or self._healthy(), 15, "the agent to answer")
        assert self.popen.poll() is None, self.log_path.read_text()

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", headers=self.headers, verify=self.verify,
                             timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    proc = Agent(tmp_path_factory.mktemp("agent"))
    yield proc
    proc.stop()


class Collector:
    def __init__(self) -> None:
        self.samples: list[PowerSample] = []

    def __call__(self, sample: PowerSample) -> None:
        self.samples.append(sample)


def config(url: str, gpus: list[int | str] | None = None, source: str = "agent") -> PowerConfig:
    return PowerConfig(source=source, url=url, gpus=gpus or [], interval_s=INTERVAL_S)


# -- the agent's HTTP API -------------------------------------------------------------------


def test_power_shape_and_no_counter_gpu(agent: Agent) -> None:
    body = httpx.get(f"{agent.url}/v1/power", timeout=5).json()
    assert set(body) == {"t", "gpus"} and abs(body["t"] - time.time()) < 1.0
    assert [set(g) for g in body["gpus"]] == [{"index", "uuid", "name", "energy_mj", "power_w"}] * 2
    h100, l4 = body["gpus"]
    assert (h100["index"], h100["uuid"], h100["name"]) == (0, H100["uuid"], H100["name"])
    assert isinstance(h100["energy_mj"], int) and h100["energy_mj"] >= H100["energy_start_mj"]
    assert h100["power_w"] == pytest.approx(200.0)
    # No counter on the L4: energy_mj null, power from the instant field.
    assert (l4["index"], l4["energy_mj"], l4["power_w"]) == (1, None, pytest.approx(75.5))


def test_counter_is_monotonic_and_matches_scripted_power(agent: Agent) -> None:
    readings = [httpx.get(f"{agent.url}/v1/power", timeout=5).json()]

    def span_s() -> float:
        readings.append(httpx.get(f"{agent.url}/v1/power", timeout=5).json())
        return readings[-1]["t"] - readings[0]["t"]

    wait_until(lambda: span_s() >= 1.0, 5, "a 1 s window of readings")
    energy_mj = [r["gpus"][0]["energy_mj"] for r in readings]
    assert energy_mj == sorted(energy_mj)
    first, last = readings[0], readings[-1]
    watts = (last["gpus"][0]["energy_mj"] - first["gpus"][0]["energy_mj"]) / 1000.0 / (last["t"] - first["t"])
    assert watts == pytest.approx(200.0, rel=0.03)


def _stream_times(url: str, events: int) -> list[float]:
    times: list[float] = []
    with httpx.stream("GET", url, timeout=5) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                obj = orjson.loads(line[6:])
                assert len(obj["gpus"]) == 2
                times.append(obj["t"])
                if len(times) == events:
                    break
    return times


def test_stream_paces_events(agent: Agent) -> None:
    slow = _stream_times(f"{agent.url}/v1/power/stream?interval_s=0.1", 8)
    gaps = [b - a for a, b in zip(slow, slow[1:], strict=False)]
    assert all(g > 0 for g in gaps)
    assert sorted(gaps)[len(gaps) // 2] == pytest.approx(0.1, abs=0.03)
    # Faster than the agent samples: clamped to its own 0.05 s.
    fast = _stream_times(f"{agent.url}/v1/power/stream?interval_s=0.001", 8)
    gaps = [b - a for a, b in zip(fast, fast[1:], strict=False)]
    assert sorted(gaps)[len(gaps) // 2] == pytest.approx(INTERVAL_S, abs=0.02)
    assert httpx.get(f"{agent.url}/v1/power/stream?interval_s=-1", timeout=5).status_code == 400


def test_metrics_in_dcgm_names(agent: Agent) -> None:
    text = httpx.get(f"{agent.url}/metrics", timeout=5).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name.removesuffix("_total"), s.labels["gpu"])] = s
    power = samples[("DCGM_FI_DEV_POWER_USAGE", "0")]
    assert power.labels == {"gpu": "0", "UUID": H100["uuid"], "device": "nvidia0", "modelName": H100["name"]}
    assert power.value == pytest.approx(200.0)
    assert samples[("DCGM_FI_DEV_POWER_USAGE_INSTANT", "1")].value == pytest.approx(75.5)
    assert samples[("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "0")].value >= H100["energy_start_mj"]
    assert ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "1") not in samples  # the L4 has no counter
    health = httpx.get(f"{agent.url}/healthz", timeout=5).json()
    assert health["status"] == "ok" and health["gpus"] == 2 and health["error"] is None


# -- AgentSource ----------------------------------------------------------------------------


def test_agent_source_samples_with_offset_near_zero(agent: Agent) -> None:
    async def body() -> None:
        energy, power = Collector(), Collector()
        counter_source = make_source(config(agent.url, [0]), energy)
        power_source = make_source(config(agent.url, [], source="sim"), power)
        assert isinstance(counter_source, AgentSource) and isinstance(power_source, SimSource)
        try:
            await counter_source.start()
            await power_source.start()
            await wait_for(lambda: len(energy.samples) >= 10 and len(power.samples) >= 10, what="samples")
            await wait_for(lambda: energy.samples[-1].t_s - energy.samples[0].t_s >= 1.0, what="1 s of samples")
            assert abs(counter_source.offset_s) < 0.02 and abs(power_source.offset_s) < 0.02
            assert counter_source.healthy and counter_source.method == "energy_counter"
            first, last = energy.samples[0], energy.samples[-1]
            assert (last.energy_j - first.energy_j) / (last.t_s - first.t_s) == pytest.approx(200.0, rel=0.03)
            assert abs(last.t_s - time.time()) < 0.5
            # Both GPUs selected, one without a counter: no energy sum with a hole, power only.
            assert all(s.energy_j is None and s.power_w == pytest.approx(275.5) for s in power.samples)
            assert power_source.method == "power_instant"
            ts = [s.t_s for s in energy.samples]
            assert ts == sorted(ts) and len(set(ts)) == len(ts)
        finally:
            await counter_source.close()
            await power_source.close()

    run(body)


def test_agent_source_removes_a_5s_clock_skew(tmp_path: Path) -> None:
    skewed = Agent(tmp_path, skew_s=5.0)

    async def body() -> None:
        got = Collector()
        source = AgentSource(config(skewed.url, [H100["uuid"]]), got)
        try:
            await source.start()
            await wait_for(lambda: len(got.samples) >= 5, what="samples from the skewed agent")
            assert source.offset_s == pytest.approx(5.0, abs=0.05)
            assert source.offset.rtt_s < 0.05
            assert abs(got.samples[-1].t_s - time.time()) < 0.3  # on the proxy's clock, not +5 s
        finally:
            await source.close()

    try:
        run(body)
    finally:
        skewed.stop()


def test_agent_source_reconnects_after_the_agent_restarts(tmp_path: Path) -> None:
    first = Agent(tmp_path)
    procs = [first]

    async def body() -> None:
        got = Collector()
        source = AgentSource(config(first.url, [0]), got)
        try:
            await source.start()
            await wait_for(lambda: source.healthy and len(got.samples) >= 3, what="samples")
            first.stop()
            await wait_for(lambda: not source.healthy, what="the source to notice the agent is gone")
            assert "power stream" in (source.last_error or "")
            count = len(got.samples)
            procs.append(await asyncio.to_thread(Agent, tmp_path, 0.0, first.port))
            await wait_for(lambda: source.healthy and len(got.samples) >= count + 3, timeout_s=10,
                           what="samples after the agent came back")
        finally:
            await source.close()

    try:
        run(body)
    finally:
        for proc in procs:
            proc.stop()


def test_agent_source_unreachable_never_raises() -> None:
    async def body() -> None:
        source = AgentSource(config(f"http://127.0.0.1:{free_port()}"), Collector())
        await source.start()
        await wait_for(lambda: source.last_error is not None, what="an error")
        assert not source.healthy and "clock probe" in source.last_error
        await source.close()

    run(body)


# -- offset estimator -----------------------------------------------------------------------


def test_offset_estimator_keeps_the_smallest_round_trip_in_its_window() -> None:
    est = OffsetEstimator(window_s=60.0)
    assert est.offset_s is None
    # Remote clock 3 s ahead. A slow probe whose delay sat on the way back reads 3 s - 0.1 s.
    est.add(send_s=100.0, recv_s=100.2, remote_t_s=103.0, taken_s=0.0)
    assert est.offset_s == pytest.approx(2.9)
    est.add(send_s=101.0, recv_s=101.002, remote_t_s=104.001, taken_s=1.0)  # symmetric, fast
    est.add(send_s=102.0, recv_s=102.05, remote_t_s=105.04, taken_s=2.0)
    assert est.offset_s == pytest.approx(3.0) and est.rtt_s == pytest.approx(0.002)
    # The fast probe ages out of the window; the best of the recent ones takes over.
    est.add(send_s=170.0, recv_s=170.01, remote_t_s=173.105, taken_s=70.0)
    assert est.offset_s == pytest.approx(3.1) and est.rtt_s == pytest.approx(0.01)


# -- startup errors -------------------------------------------------------------------------


def _run_agent(tmp: Path, script: dict[str, Any] | None, *args: str) -> subprocess.CompletedProcess[str]:
    path = None
    if script is not None:
        path = tmp / "script.json"
        path.write_text(json.dumps(script))
    return subprocess.run([sys.executable, "-m", "proxy.agent", "--port", str(free_port()), *args],
                          cwd=REPO, env=_env(path), capture_output=True, text=True, timeout=20)


def test_agent_without_gpu_exits_2_with_one_line(tmp_path: Path) -> None:
    done = _run_agent(tmp_path, None)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "joulegate agent: error: NVML could not initialise" in done.stderr
    done = _run_agent(tmp_path, SCRIPT, "--gpus", "0,7")
    assert done.returncode == 2 and "GPU index 7 does not exist" in done.stderr


# -- beyond loopback: a bearer token, optionally TLS ------------------------------------------


def test_agent_binds_loopback_by_default_and_refuses_other_addresses_without_a_token(tmp_path: Path) -> None:
    help_text = subprocess.run([sys.executable, "-m", "proxy", "agent", "--help"], cwd=REPO,
                               capture_output=True, text=True, timeout=30).stdout
    assert "default 127.0.0.1" in help_text
    for host in ("0.0.0.0", "::", "10.1.2.3"):
        done = _run_agent(tmp_path, SCRIPT, "--host", host)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "without a bearer token" in done.stderr
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    done = _run_agent(tmp_path, SCRIPT, "--host", "0.0.0.0", "--token-file", str(empty))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "is empty" in done.stderr
    done = _run_agent(tmp_path, SCRIPT, "--tls-cert", str(empty))
    assert done.returncode == 2 and "--tls-cert and --tls-key go together" in done.stderr


def self_signed_cert(tmp: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, made with the openssl CLI."""
    cert, key = tmp / "agent-cert.pem", tmp / "agent-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=joulegate-agent-test", "-keyout", str(key),
                    "-out", str(cert), "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=30)
    return cert, key


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_agent_with_a_token_wants_it_on_every_route_and_the_source_sends_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tls: bool) -> None:
    if tls and shutil.which("openssl") is None:
        pytest.skip("no openssl CLI to make a certificate")
    token = f"agent-token-{os.urandom(16).hex()}"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    extra: tuple[str, ...] = ("--token-file", str(token_file))
    cert = None
    if tls:
        cert, key = self_signed_cert(tmp_path)
        extra += ("--tls-cert", str(cert), "--tls-key", str(key))
    agent = Agent(tmp_path, host="0.0.0.0", extra=extra, token=token, ca_file=cert)
    try:
        for path in ("/v1/power", "/v1/power/stream", "/metrics", "/healthz"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token},
                            {"Authorization": f"Bearer {token}x"}):
                resp = httpx.get(agent.url + path, headers=headers, verify=agent.verify, timeout=5)
                assert resp.status_code == 401, (path, headers)
                assert resp.json()["error"]["type"] == "authentication_error" and token not in resp.text
        assert httpx.get(f"{agent.url}/v1/power", headers=agent.headers, verify=agent.verify,
                         timeout=5).json()["gpus"][0]["uuid"] == H100["uuid"]
        if tls:  # plain http to a TLS listener gets nothing
            with pytest.raises(httpx.HTTPError):
                httpx.get(agent.url.replace("https:", "http:") + "/v1/power", headers=agent.headers, timeout=5)

        async def body(power: PowerConfig, expect_ok: bool) -> None:
            got = Collector()
            source = AgentSource(power, got)
            try:
                await source.start()
                if expect_ok:
                    await wait_for(lambda: len(got.samples) >= 3, what="samples through the token")
                    assert source.healthy and abs(source.offset_s) < 0.05
                else:
                    await wait_for(lambda: source.last_error is not None, what="an error")
                    assert not got.samples and "401" in source.last_error
            finally:
                await source.close()

        ca = str(cert) if cert else None
        monkeypatch.setenv("JG_TEST_AGENT_TOKEN", token)
        for power, ok in ((PowerConfig(source="agent", url=agent.url, interval_s=INTERVAL_S, gpus=[0],
                                       token_file=str(token_file), ca_file=ca), True),
                          (PowerConfig(source="agent", url=agent.url, interval_s=INTERVAL_S, gpus=[0],
                                       token_env="JG_TEST_AGENT_TOKEN", ca_file=ca), True),
                          (PowerConfig(source="agent", url=agent.url, interval_s=INTERVAL_S, gpus=[0],
                                       ca_file=ca), False)):
            run(lambda power=power, ok=ok: body(power, ok))
    finally:
        agent.stop()
    assert token not in agent.log_path.read_text()
