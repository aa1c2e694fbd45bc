"""Power sources against real sockets: DcgmSource scraping an aiohttp exporter that serves
tests/data/dcgm-exporter.txt with counters the test advances, and NvmlSource on the fake pynvml."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import re
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiohttp import web

from proxy.config import PowerConfig
from proxy.energy.sources import PowerSample, make_source
from proxy.energy.sources.base import gpu_key_matches, select_gpus
from proxy.energy.sources.dcgm import ENERGY_MJ, POWER_W, DcgmSource, parse_page, reading_from
from proxy.energy.sources.nvml import NvmlReader, NvmlSource

HERE = Path(__file__).resolve().parent
PAGE = (HERE / "data" / "dcgm-exporter.txt").read_text()
UUID0 = "GPU-8d3c6b2e-4f1a-6e0b-9c57-1a2b3c4d5e6f"
UUID1 = "GPU-f0e1d2c3-b4a5-9687-7869-5a4b3c2d1e0f"
PAGE_ENERGY_MJ = {"0": 2186534287563, "1": 1024837456123}
PAGE_POWER_W = {"0": 412.873, "1": 71.204}


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), 20))


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0, what: str = "condition") -> None:
    """Poll `predicate` on the loop until true; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.01)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Exporter:
    """A dcgm-exporter stand-in on a real socket: the recorded page with values the test sets."""

    _LINE = re.compile(r'^(?P<name>DCGM_FI_DEV_[A-Z_]+)\{gpu="(?P<gpu>\d+)"(?P<rest>[^}]*)\} (?P<value>\S+)$')

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        self.energy_mj = dict(PAGE_ENERGY_MJ)
        self.power_w = dict(PAGE_POWER_W)
        self.with_energy = True
        self.instant_w: dict[str, float] | None = None
        self.timestamp_ms: int | None = None
        self.requests = 0
        self._runner: web.AppRunner | None = None

    def page(self) -> str:
        out = []
        for line in PAGE.splitlines():
            m = self._LINE.match(line)
            if m is None:
                if not self.with_energy and ENERGY_MJ in line:
                    continue
                out.append(line)
                continue
            name, gpu = m["name"], m["gpu"]
            ts = f" {self.timestamp_ms}" if self.timestamp_ms is not None else ""
            labels = f'{{gpu="{gpu}"{m["rest"]}}}'
            if name == ENERGY_MJ:
                if self.with_energy:
                    out.append(f"{name}{labels} {self.energy_mj[gpu]}{ts}")
            elif name == POWER_W:
                out.append(f"{name}{labels} {self.power_w[gpu]:.6f}{ts}")
                if self.instant_w is not None:
                    out.append(f"DCGM_FI_DEV_POWER_USAGE_INSTANT{labels} {self.instant_w[gpu]:.6f}{ts}")
            else:
                out.append(line)
        return "\n".join(out) + "\n"

    async def _metrics(self, request: web.Request) -> web.Response:
        self.requests += 1
        return web.Response(text=self.page(), content_type="text/plain")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class Collector:
    def __init__(self) -> None:
        self.samples: list[PowerSample] = []

    def __call__(self, sample: PowerSample) -> None:
        self.samples.append(sample)


def dcgm_config(url: str, gpus: list[int | str] | None = None, interval_s: float = 0.02) -> PowerConfig:
    return PowerConfig(source="dcgm", url=url, gpus=gpus or [], interval_s=interval_s)


# -- pure helpers ---------------------------------------------------------------------------


def test_parse_recorded_page() -> None:
    page = parse_page(PAGE)
    assert [(v.index, v.uuid, v.value) for v in page[ENERGY_MJ]] == [
        (0, UUID0, PAGE_ENERGY_MJ["0"]), (1, UUID1, PAGE_ENERGY_MJ["1"])]
    assert [v.value for v in page[POWER_W]] == [PAGE_POWER_W["0"], PAGE_POWER_W["1"]]
    assert all(v.timestamp_s is None for v in page[ENERGY_MJ])
    r = reading_from(page, [UUID1.lower().removeprefix("gpu-")])
    assert r.energy_mj == (PAGE_ENERGY_MJ["1"],) and r.power_w == PAGE_POWER_W["1"]
    with pytest.raises(ValueError, match="lacks GPU"):
        reading_from(page, [3])
    with pytest.raises(ValueError, match="has none of"):
        reading_from(parse_page("up 1\n"), [])


def test_gpu_selection_helpers() -> None:
    assert gpu_key_matches(0, 0, "GPU-x") and gpu_key_matches("1", 1, None)
    assert gpu_key_matches("GPU-ABC", 3, "GPU-abc") and gpu_key_matches("abc", 3, "GPU-abc")
    assert not gpu_key_matches(2, 0, "GPU-2")
    pairs = [(0, "GPU-a"), (1, "GPU-b")]
    assert select_gpus([], pairs) == [0, 1]
    assert select_gpus(["GPU-b", 0], pairs) == [1, 0]
    assert select_gpus([0, 7], pairs) is None


# -- DcgmSource -----------------------------------------------------------------------------


def test_dcgm_selects_by_index_and_uuid_in_joules() -> None:
    async def body() -> None:
        exporter = Exporter()
        await exporter.start()
        got = {name: Collector() for name in ("index", "uuid", "all")}
        sources = [
            DcgmSource(dcgm_config(exporter.url, [0]), got["index"]),
            DcgmSource(dcgm_config(exporter.url, [UUID1]), got["uuid"]),
            make_source(dcgm_config(exporter.url), got["all"]),
        ]
        try:
            for source in sources:
                await source.start()
            await wait_for(lambda: all(c.samples for c in got.values()), what="a sample from each source")
            assert got["index"].samples[0].energy_j == pytest.approx(PAGE_ENERGY_MJ["0"] / 1000.0)
            assert got["index"].samples[0].power_w == pytest.approx(PAGE_POWER_W["0"])
            assert got["uuid"].samples[0].energy_j == pytest.approx(PAGE_ENERGY_MJ["1"] / 1000.0)
            assert got["all"].samples[0].energy_j == pytest.approx(sum(PAGE_ENERGY_MJ.values()) / 1000.0)
            assert got["all"].samples[0].power_w == pytest.approx(sum(PAGE_POWER_W.values()))
            assert all(s.healthy and s.method == "energy_counter" for s in sources)
            assert abs(got["all"].samples[0].t_s - time.time()) < 1.0
        finally:
            for source in sources:
                await source.close()
            await exporter.stop()

    run(body)


def test_dcgm_unchanged_counter_gives_no_sample() -> None:
    async def body() -> None:
        exporter = Exporter()
        await exporter.start()
        got = Collector()
        source = DcgmSource(dcgm_config(exporter.url, [0, 1]), got)
        try:
            await source.start()
            await wait_for(lambda: source.scrapes >= 6, what="six scrapes")
            assert len(got.samples) == 1 and source.repeats >= 5  # the exporter's coarse interval
            exporter.energy_mj["0"] += 1500  # a new collection: +1.5 J on GPU 0, +0.5 J on GPU 1
            exporter.energy_mj["1"] += 500
            await wait_for(lambda: len(got.samples) == 2, what="the second sample")
            first, second = got.samples
            assert second.energy_j - first.energy_j == pytest.approx(2.0)
            assert second.t_s > first.t_s
            scrapes = source.scrapes
            await wait_for(lambda: source.scrapes >= scrapes + 4, what="more scrapes")
            assert len(got.samples) == 2
        finally:
            await source.close()
            await exporter.stop()

    run(body)


def test_dcgm_power_fallback_and_page_timestamps() -> None:
    async def body() -> None:
        exporter = Exporter()
        exporter.with_energy = False
        await exporter.start()
        got = Collector()
        source = DcgmSource(dcgm_config(exporter.url, [1]), got)
        try:
            await source.start()
            await wait_for(lambda: len(got.samples) >= 3, what="power samples")
            # No counter: the averaged gauge, emitted every scrape (a stale gauge is still power).
            assert all(s.energy_j is None and s.power_w == pytest.approx(71.204) for s in got.samples)
            assert source.method == "power_average"
            exporter.instant_w = {"0": 433.5, "1": 88.25}
            await wait_for(lambda: got.samples[-1].power_w == pytest.approx(88.25), what="instant power")
            assert source.method == "power_instant"
            # Timestamps on the page: they stamp the sample, and a repeated one is no new sample.
            exporter.timestamp_ms = int(time.time() * 1000) - 2500
            await wait_for(lambda: got.samples[-1].t_s == pytest.approx(exporter.timestamp_ms / 1000.0),
                           what="a sample at the page's timestamp")
            count, scrapes = len(got.samples), source.scrapes
            await wait_for(lambda: source.scrapes >= scrapes + 4, what="more scrapes")
            assert len(got.samples) == count
        finally:
            await source.close()
            await exporter.stop()

    run(body)


def test_dcgm_recovers_when_the_exporter_returns() -> None:
    async def body() -> None:
        exporter = Exporter()
        await exporter.start()
        got = Collector()
        source = DcgmSource(dcgm_config(exporter.url), got)
        try:
            await source.start()
            await wait_for(lambda: source.healthy and got.samples, what="a first sample")
            await exporter.stop()
            await wait_for(lambda: not source.healthy, what="the source to notice the exporter is down")
            assert "scrape of" in (source.last_error or "")
            exporter.energy_mj["0"] += 10_000
            await exporter.start()
            await wait_for(lambda: source.healthy and len(got.samples) == 2, timeout_s=8,
                           what="recovery after the exporter came back")
            assert got.samples[1].energy_j - got.samples[0].energy_j == pytest.approx(10.0)
        finally:
            await source.close()
            await exporter.stop()

    run(body)


def test_dcgm_missing_gpu_and_unreachable_url_never_raise() -> None:
    async def body() -> None:
        exporter = Exporter()
        await exporter.start()
        missing = DcgmSource(dcgm_config(exporter.url, [4]), Collector())
        nowhere = DcgmSource(dcgm_config(f"http://127.0.0.1:{free_port()}/metrics"), Collector())
        try:
            await missing.start()
            await nowhere.start()
            await wait_for(lambda: missing.last_error is not None and nowhere.last_error is not None,
                           what="both sources to report an error")
            assert not missing.healthy and "lacks GPU" in (missing.last_error or "")
            assert not nowhere.healthy and "ConnectError" in (nowhere.last_error or "")
        finally:
            await missing.close()
            await nowhere.close()
            await exporter.stop()

    run(body)


# -- NvmlSource on the fake pynvml ---------------------------------------------------------


def _load_fake() -> ModuleType:
    spec = importlib.util.spec_from_file_location("joulegate_fake_pynvml", HERE / "fake_nvml" / "pynvml.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FAKE = _load_fake()
H100 = {"uuid": "GPU-aaaaaaaa-0000-0000-0000-000000000000", "name": "NVIDIA H100 80GB HBM3",
        "power_w": 200.0, "energy_start_mj": 7_000_000}
A100 = {"uuid": "GPU-bbbbbbbb-0000-0000-0000-000000000000", "name": "NVIDIA A100-SXM4-80GB",
        "power_w": 100.0, "energy_start_mj": 3_000_000}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Any:
    FAKE.fake_reset()
    monkeypatch.delenv("JOULEGATE_FAKE_NVML", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", FAKE)  # what `import pynvml` finds
    yield FAKE
    FAKE.fake_reset()


def nvml_config(gpus: list[int | str] | None = None, interval_s: float = 0.02) -> PowerConfig:
    return PowerConfig(source="nvml", gpus=gpus or [], interval_s=interval_s)


def rate_w(samples: list[PowerSample]) -> float:
    a, b = samples[0], samples[-1]
    assert a.energy_j is not None and b.energy_j is not None
    return (b.energy_j - a.energy_j) / (b.t_s - a.t_s)


def test_nvml_source_energy_counter_and_selection(fake: Any) -> None:
    fake.fake_load({"gpus": [H100, A100]})

    async def body() -> None:
        both, by_uuid = Collector(), Collector()
        sources = [make_source(nvml_config(), both), NvmlSource(nvml_config([A100["uuid"]]), by_uuid)]
        try:
            for source in sources:
                await source.start()
            await wait_for(lambda: len(both.samples) >= 2 and len(by_uuid.samples) >= 2, what="samples")
            await wait_for(lambda: both.samples[-1].t_s - both.samples[0].t_s >= 1.0, what="1 s of samples")
            assert both.samples[0].energy_j >= 10_000.0  # mJ -> J, the counters' start included
            assert rate_w(both.samples) == pytest.approx(300.0, rel=0.03)
            assert both.samples[-1].power_w == pytest.approx(300.0)
            await wait_for(lambda: by_uuid.samples[-1].t_s - by_uuid.samples[0].t_s >= 1.0, what="A100 samples")
            assert rate_w(by_uuid.samples) == pytest.approx(100.0, rel=0.03)
            assert all(s.healthy and s.method == "energy_counter" for s in sources)
            gaps = [b.t_s - a.t_s for a, b in zip(both.samples, both.samples[1:], strict=False)]
            assert 0.01 <= sorted(gaps)[len(gaps) // 2] <= 0.04  # one sample per interval_s
        finally:
            for source in sources:
                await source.close()

    run(body)
    assert fake.calls["nvmlInit"] == fake.calls["nvmlShutdown"]


def test_nvml_without_counter_uses_instant_power_then_average(fake: Any, caplog: pytest.LogCaptureFixture) -> None:
    no_counter = {**A100, "energy_counter": False, "power_w": {"steps": [[0, 90.0], [0.3, 140.0]]}}
    no_instant = {**H100, "uuid": "GPU-cccccccc-0000-0000-0000-000000000000", "energy_counter": False,
                  "power_instant": False}
    fake.fake_load({"gpus": [no_counter, no_instant]})

    async def body() -> None:
        instant, average = Collector(), Collector()
        sources = [NvmlSource(nvml_config([0]), instant), NvmlSource(nvml_config([1]), average)]
        try:
            for source in sources:
                await source.start()
            await wait_for(lambda: instant.samples and instant.samples[-1].power_w == pytest.approx(140.0),
                           what="the instant power to follow the step")
            assert all(s.energy_j is None for s in instant.samples)
            assert instant.samples[0].power_w == pytest.approx(90.0)
            assert sources[0].method == "power_instant"
            await wait_for(lambda: bool(average.samples), what="an averaged sample")
            assert sources[1].method == "power_average" and average.samples[0].power_w == pytest.approx(200.0)
        finally:
            for source in sources:
                await source.close()

    with caplog.at_level(logging.WARNING):
        run(body)
    assert "1 s average" in caplog.text


def test_nvml_skips_samples_with_a_failed_gpu_and_recovers(fake: Any) -> None:
    fake.fake_load({"gpus": [H100, A100]})

    async def body() -> None:
        got = Collector()
        source = NvmlSource(nvml_config(), got)
        try:
            await source.start()
            await wait_for(lambda: len(got.samples) >= 3, what="samples")
            fake.fake_fail(1, 3)
            await wait_for(lambda: source.last_error is not None, what="the failed read")
            assert "GPU 1" in source.last_error and "GPU is lost" in source.last_error
            count = len(got.samples)
            await wait_for(lambda: source.healthy and len(got.samples) >= count + 3, what="recovery")
            # Every sample sums both GPUs: a sum without GPU 1 would drop by its 3000 J counter.
            energies = [s.energy_j for s in got.samples]
            assert energies == sorted(energies)
            assert rate_w(got.samples) == pytest.approx(300.0, rel=0.03)
        finally:
            await source.close()

    run(body)


def test_nvml_init_failure_never_raises_and_recovers(fake: Any) -> None:
    async def body() -> None:
        got = Collector()
        source = NvmlSource(nvml_config(), got)
        try:
            await source.start()  # no script: NVML cannot initialise, as on this machine
            await wait_for(lambda: source.last_error is not None, what="the init error")
            assert not source.healthy and "NVML could not initialise" in source.last_error
            fake.fake_load({"gpus": [H100]})
            await wait_for(lambda: source.healthy and got.samples, timeout_s=5, what="recovery after init")
        finally:
            await source.close()
        await source.close()  # twice is fine

    run(body)


def test_nvml_reader_rejects_a_bad_selection(fake: Any) -> None:
    fake.fake_load({"gpus": [H100]})
    reader = NvmlReader([3])
    with pytest.raises(Exception, match="GPU index 3 does not exist"):
        reader.init()
    reader = NvmlReader(["GPU-nope"])
    with pytest.raises(Exception, match="no GPU with UUID GPU-nope"):
        reader.init()
    reader = NvmlReader([H100["uuid"]])
    reader.init()
    try:
        (reading,) = reader.read()
        assert (reading.index, reading.uuid, reading.name) == (0, H100["uuid"], H100["name"])
        assert reading.energy_mj >= 7_000_000 and reading.power_w == pytest.approx(200.0)
    finally:
        reader.shutdown()
    assert fake._init_count == 0
