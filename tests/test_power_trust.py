"""Power samples you can trust, through real sources on real sockets: one GPU's counter restarting
on a multi-GPU backend, a glitch reading, and the health fields the meter reports.

DcgmSource scrapes `LiveExporter` (the recorded dcgm-exporter page, counters advancing with the
wall clock at a set power per GPU) and feeds a real BackendMeter; NvmlSource reads the fake
pynvml."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.agent import reading_json
from proxy.config import BackendConfig, Config, EnergyConfig, PowerConfig
from proxy.energy.attribution import Final
from proxy.energy.meter import POWER_HEALTH_KEYS, BackendMeter
from proxy.energy.sources.nvml import NvmlReader, NvmlSource
from tests.conftest import (
    ADMIN_KEY,
    MODEL,
    ProxyProc,
    SimBackend,
    backend_yaml,
    tenants_yaml,
    wait_until,
)
from tests.test_sources import FAKE, UUID0, UUID1, Collector, Exporter, rate_w, run, wait_for

WATTS = {"0": 300.0, "1": 200.0}
DAY_AND_A_HALF_MJ = {"0": 130e9, "1": 125e9}  # ~1.5 days of uptime at ~1 kW


class LiveExporter(Exporter):
    """The recorded exporter page with counters that advance with the wall clock at `WATTS`."""

    def __init__(self, limit_w: float | None = None) -> None:
        super().__init__()
        self.t0_s = time.time()
        self.base_mj = dict(DAY_AND_A_HALF_MJ)
        self.power_w = dict(WATTS)
        self.limit_w = limit_w
        self.glitch_mj: dict[str, float] = {}  # added to the next page's counter only

    def counter_mj(self, gpu: str) -> float:
        return self.base_mj[gpu] + WATTS[gpu] * (time.time() - self.t0_s) * 1000.0

    def restart(self, gpu: str) -> None:
        """A driver reload: the GPU's counter reads 0 now and counts on from there."""
        self.base_mj[gpu] = -WATTS[gpu] * (time.time() - self.t0_s) * 1000.0

    def page(self) -> str:
        for gpu in WATTS:
            self.energy_mj[gpu] = int(self.counter_mj(gpu) + self.glitch_mj.pop(gpu, 0.0))
        text = super().page()
        if self.limit_w is not None:
            for gpu, uuid in (("0", UUID0), ("1", UUID1)):
                text += f'DCGM_FI_DEV_POWER_MGMT_LIMIT{{gpu="{gpu}",UUID="{uuid}"}} {self.limit_w}\n'
        return text


def make_meter(url: str, finals: list[Final]) -> BackendMeter:
    power = PowerConfig(source="dcgm", url=url, interval_s=0.05)
    config = Config(backends=[BackendConfig(name="gpu", url="http://127.0.0.1:9/v1", power=power)],
                    energy=EnergyConfig(idle="separate"))
    return BackendMeter("gpu", power, config, lambda _backend, final: finals.append(final))


def sampled_past(meter: BackendMeter, t_s: float) -> bool:
    return (meter.timeline.last_sample_s or 0.0) > t_s


def test_one_gpu_restarting_on_a_two_gpu_backend_books_the_true_energy() -> None:
    async def body() -> None:
        exporter, finals = LiveExporter(limit_w=700.0), []
        await exporter.start()
        meter = make_meter(exporter.url, finals)
        assert meter.source is not None
        try:
            await meter.source.start()
            await wait_for(lambda: len(meter.timeline) >= 4, what="samples")
            start_s = time.time()
            meter.attributor.open("run", start_s, stream=False, prompt_tokens=100)
            await wait_for(lambda: sampled_past(meter, start_s + 0.5), what="samples in the run")
            exporter.restart("1")
            restart_s = time.time()
            await wait_for(lambda: sampled_past(meter, restart_s + 0.5), what="samples after the restart")
            end_s = time.time()
            meter.attributor.close("run", end_s, 100, 50)
            await wait_for(lambda: bool(finals), what="the run's final")
            truth_j = sum(WATTS.values()) * (end_s - start_s)
            assert meter.timeline.joules_between(start_s, end_s) == pytest.approx(truth_j, rel=0.01)
            (final,) = finals
            # `estimated`: the moment before the restart is modelled from the GPU's last power.
            assert final.joules == pytest.approx(truth_j, rel=0.01) and final.method == "estimated"
            assert meter.source.counters.resets == 1 and meter.source.counters.discarded == 0
            assert meter.power_health()["power_counter_resets"] == 1
        finally:
            await meter.source.close()
            await exporter.stop()

    run(body)


def test_a_1_mj_glitch_is_discarded_interpolated_estimated_and_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        exporter, finals = LiveExporter(limit_w=700.0), []
        await exporter.start()
        meter = make_meter(exporter.url, finals)
        source = meter.source
        assert source is not None
        try:
            await source.start()
            await wait_for(lambda: len(meter.timeline) >= 4, what="samples")
            start_s = time.time()
            meter.attributor.open("glitched", start_s, stream=False, prompt_tokens=100)
            await wait_for(lambda: sampled_past(meter, start_s + 0.3), what="samples before the glitch")
            exporter.glitch_mj["0"] = 1e9  # one reading 1 MJ ahead: ~20 MW over one 50 ms step
            await wait_for(lambda: source.counters.discarded == 1, what="the glitch to be discarded")
            glitch_s = time.time()
            await wait_for(lambda: sampled_past(meter, glitch_s + 0.3), what="samples after the glitch")
            mid_s = time.time()
            meter.attributor.close("glitched", mid_s, 100, 50)
            meter.attributor.open("clean", mid_s + 0.05, stream=False, prompt_tokens=100)
            await wait_for(lambda: sampled_past(meter, mid_s + 0.5), what="a clean stretch")
            end_s = time.time()
            meter.attributor.close("clean", end_s, 100, 50)
            await wait_for(lambda: len(finals) == 2, what="both finals")
            truth_j = sum(WATTS.values()) * (end_s - start_s)
            assert meter.timeline.joules_between(start_s, end_s) == pytest.approx(truth_j, rel=0.01)
            by_id = {f.request_id: f for f in finals}
            assert by_id["glitched"].method == "estimated"
            assert by_id["glitched"].joules == pytest.approx(sum(WATTS.values()) * (mid_s - start_s), rel=0.01)
            assert by_id["clean"].method == "measured"
            exporter.glitch_mj["1"] = 1e9  # a second glitch: counted, not logged again
            await wait_for(lambda: source.counters.discarded == 2, what="the second glitch")
            assert meter.power_health()["power_samples_discarded"] == 2
            assert source.counters.resets == 0
        finally:
            await source.close()
            await exporter.stop()

    with caplog.at_level(logging.WARNING, logger="joulegate.power"):
        run(body)
    logged = [r for r in caplog.records if "discarded an implausible reading" in r.getMessage()]
    assert len(logged) == 1 and "over 1050 W" in logged[0].getMessage()  # 1.5 x the 700 W limit


def test_power_health_of_a_meter() -> None:
    async def body() -> None:
        exporter, finals = LiveExporter(), []
        await exporter.start()
        meter = make_meter(exporter.url, finals)
        assert meter.source is not None
        try:
            health = meter.power_health()
            assert set(health) == set(POWER_HEALTH_KEYS) and health["power_sample_gap_s"] is None
            await meter.source.start()
            await wait_for(lambda: len(meter.timeline) >= 3, what="samples")
            health = meter.power_health()
            assert health["power_clock_offset_s"] is None  # dcgm: stamped on the proxy's clock
            assert 0.0 < health["power_sample_gap_s"] < 1.0
            await exporter.stop()  # the source stops: the open gap grows
            stopped_s = time.time()
            await wait_for(lambda: meter.power_health()["power_sample_gap_s"] > 1.0, timeout_s=5,
                           what="the gap to grow")
            assert meter.power_health(stopped_s + 10.0)["power_last_sample_age_s"] >= 10.0
        finally:
            await meter.source.close()
            await exporter.stop()

    run(body)


# -- NvmlSource on the fake pynvml ---------------------------------------------------------

UPTIME_GPUS = [
    {"uuid": "GPU-aaaaaaaa-0000-0000-0000-000000000000", "power_w": 300.0, "energy_start_mj": 130_000_000_000,
     "power_limit_w": 700.0},
    {"uuid": "GPU-bbbbbbbb-0000-0000-0000-000000000000", "power_w": 200.0, "energy_start_mj": 125_000_000_000},
]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Any:
    FAKE.fake_reset()
    monkeypatch.delenv("JOULEGATE_FAKE_NVML", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", FAKE)
    yield FAKE
    FAKE.fake_reset()


def test_nvml_one_gpu_restarting_keeps_the_summed_counter_continuous(fake: Any) -> None:
    fake.fake_load({"gpus": UPTIME_GPUS})

    async def body() -> None:
        got = Collector()
        source = NvmlSource(PowerConfig(source="nvml", interval_s=0.02), got)

        def span_s() -> float:
            return got.samples[-1].t_s - got.samples[0].t_s
        try:
            await source.start()
            await wait_for(lambda: len(got.samples) >= 5, what="samples")
            fake.fake_counter_restart(1, 0)
            await wait_for(lambda: span_s() >= 1.0, what="samples after the restart")
            fake.fake_glitch(0, 1_000_000_000)
            await wait_for(lambda: source.counters.discarded == 1, what="the glitch")
            await wait_for(lambda: span_s() >= 2.0, what="samples after the glitch")
            assert source.counters.resets == 1
            energies = [s.energy_j for s in got.samples]
            assert energies == sorted(energies)
            assert rate_w(got.samples) == pytest.approx(500.0, rel=0.03)
            assert sum(s.gap_before for s in got.samples) == 2  # the restart's step, the glitch's
        finally:
            await source.close()

    run(body)


def test_nvml_reads_the_enforced_power_limit_and_the_agent_serves_it(fake: Any) -> None:
    fake.fake_load({"gpus": UPTIME_GPUS})
    reader = NvmlReader()
    reader.init()
    try:
        readings = reader.read()
        assert [r.power_limit_w for r in readings] == [700.0, None]
        # Optional in the agent's API: only where NVML knows it (older proxies ignore it).
        limited, unknown = reading_json(time.time(), readings)["gpus"]
        assert limited["power_limit_w"] == 700.0 and "power_limit_w" not in unknown
    finally:
        reader.shutdown()


# -- the proxy: /v1/energy/backends and /metrics ----------------------------------------------


class ThreadedExporter:
    """Runs an Exporter on its own event loop in a thread: the proxy is another process, and the
    test's waits block."""

    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter
        self.url = exporter.url
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(exporter.start(), self.loop).result(10)

    def stop(self) -> None:
        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(self.exporter.stop(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def metric(text: str, name: str, backend: str) -> float | None:
    prefix = f'{name}{{backend="{backend}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return None


def test_power_health_in_the_backends_view_and_metrics(tmp_path: Path) -> None:
    exporter = LiveExporter(limit_w=700.0)
    pages = ThreadedExporter(exporter)
    sim = SimBackend("h100-llama3.1-8b", tmp_path)
    by_sim = f", power: {{source: sim, url: '{sim.url}', interval_s: 0.1}}"
    by_dcgm = f", power: {{source: dcgm, url: '{pages.url}', interval_s: 0.05, stale_after_s: 1.0}}"
    config = ("backends:\n" + backend_yaml("h100", sim.url, [MODEL], by_sim)
              + backend_yaml("h100-dcgm", sim.url, [MODEL], by_dcgm) + "ledger: memory://\n" + tenants_yaml())
    proxy = ProxyProc(config, tmp_path)
    admin = httpx.Client(base_url=proxy.url, timeout=10, headers={"Authorization": f"Bearer {ADMIN_KEY}"})

    def views() -> dict[str, dict[str, Any]]:
        return {v["name"]: v for v in admin.get("/v1/energy/backends").json()["data"]}

    try:
        assert httpx.get(f"{sim.url}/v1/power", timeout=5).json()["gpus"][0]["power_limit_w"] == 700.0
        wait_until(lambda: views()["h100"]["power_clock_offset_s"] is not None
                   and views()["h100-dcgm"]["power_sample_gap_s"] is not None, what="both sources' samples")
        view = views()
        assert abs(view["h100"]["power_clock_offset_s"]) < 1.0  # the sim shares our clock
        assert view["h100-dcgm"]["power_clock_offset_s"] is None  # dcgm: no remote clock to correct
        for name in ("h100", "h100-dcgm"):
            assert view[name]["power_samples_discarded"] == 0 and view[name]["power_counter_resets"] == 0
            assert 0.0 < view[name]["power_sample_gap_s"] < 5.0
        exporter.glitch_mj["0"] = 1e9
        wait_until(lambda: views()["h100-dcgm"]["power_samples_discarded"] == 1, what="the glitch discarded")
        exporter.restart("1")
        wait_until(lambda: views()["h100-dcgm"]["power_counter_resets"] == 1, what="the restart seen")
        exporter.glitch_mj["1"] = 1e9
        wait_until(lambda: views()["h100-dcgm"]["power_samples_discarded"] == 2, what="a second glitch")
        text = admin.get("/metrics").text
        assert metric(text, "joulegate_power_samples_discarded_total", "h100-dcgm") == 2.0
        assert metric(text, "joulegate_power_counter_resets_total", "h100-dcgm") == 1.0
        assert metric(text, "joulegate_power_samples_discarded_total", "h100") == 0.0
        assert abs(metric(text, "joulegate_power_clock_offset_seconds", "h100") or 9.0) < 1.0
        assert metric(text, "joulegate_power_clock_offset_seconds", "h100-dcgm") is None
        assert (metric(text, "joulegate_power_sample_gap_seconds", "h100-dcgm") or 0.0) > 0.0
        pages.stop()  # the power source stops: down, and the gap shows it
        wait_until(lambda: views()["h100-dcgm"]["power_source_up"] is False, what="the source down")
        assert views()["h100-dcgm"]["power_sample_gap_s"] > 1.0
        text = admin.get("/metrics").text
        assert (metric(text, "joulegate_power_sample_gap_seconds", "h100-dcgm") or 0.0) > 1.0
        assert metric(text, "joulegate_power_source_up", "h100-dcgm") == 0.0
        # Counters only grow by what is new: a second scrape adds nothing.
        assert metric(admin.get("/metrics").text, "joulegate_power_samples_discarded_total", "h100-dcgm") == 2.0
    finally:
        admin.close()
        proxy.stop()
        pages.stop()
        sim.stop()
    log = proxy.log()
    assert log.count("discarded an implausible reading") == 1, log
    assert "Traceback" not in log
