"""Host energy: RAPL counters from a fake powercap tree, the agent's `host` field, the agent
source carrying it, and the meter splitting it over requests with the books balanced."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from proxy.config import parse_config
from proxy.energy.attribution import Final
from proxy.energy.meter import BackendMeter
from proxy.energy.rapl import RaplReader
from proxy.energy.sources.agent import AgentSource
from proxy.energy.sources.base import PowerSample
from tests.test_agent import Agent, Collector, config, run, wait_for

MAX_UJ = 262_143_328_850  # a real package's max_energy_range_uj


def make_tree(root: Path, zones: dict[str, tuple[str, int]]) -> None:
    """`{"intel-rapl:0": ("package-0", energy_uj), "intel-rapl:0:1": ("dram", ...)}` as files;
    sub-zones live inside their package's directory, as in sysfs."""
    for zone, (name, energy_uj) in zones.items():
        parts = zone.split(":")
        path = root / zone if len(parts) == 2 else root / ":".join(parts[:2]) / zone
        path.mkdir(parents=True, exist_ok=True)
        (path / "name").write_text(name + "\n")
        (path / "max_energy_range_uj").write_text(f"{MAX_UJ}\n")
        (path / "energy_uj").write_text(f"{energy_uj}\n")


def set_uj(root: Path, zone: str, energy_uj: int) -> None:
    parts = zone.split(":")
    path = root / zone if len(parts) == 2 else root / ":".join(parts[:2]) / zone
    (path / "energy_uj").write_text(f"{energy_uj}\n")


ZONES = {"intel-rapl:0": ("package-0", 1_000_000), "intel-rapl:0:0": ("core", 500_000),
         "intel-rapl:0:1": ("dram", 2_000_000), "intel-rapl:1": ("package-1", MAX_UJ - 1_000_000),
         "intel-rapl:1:0": ("dram", 0)}


def test_rapl_sums_packages_and_dram_and_unrolls_wraps(tmp_path: Path) -> None:
    make_tree(tmp_path, ZONES)
    (tmp_path / "intel-rapl").mkdir()  # the control-type directory sysfs has beside the zones
    reader = RaplReader.open(str(tmp_path))
    assert reader is not None
    assert sorted(z.name for z in reader.zones) == ["dram", "dram", "package-0", "package-1"]
    assert reader.read(100.0) == 0.0 and reader.power_w is None
    set_uj(tmp_path, "intel-rapl:0", 1_000_000 + 30_000_000)  # +30 J
    set_uj(tmp_path, "intel-rapl:0:0", 500_000 + 20_000_000)  # core: inside package-0, not added
    set_uj(tmp_path, "intel-rapl:0:1", 2_000_000 + 5_000_000)  # +5 J
    set_uj(tmp_path, "intel-rapl:1", 4_000_000)  # wrapped: +1 J to the top, +4 J after
    assert reader.read(101.0) == pytest.approx(40.0)
    assert reader.power_w == pytest.approx(40.0)


def test_rapl_absent_or_unreadable_gives_none(tmp_path: Path) -> None:
    assert RaplReader.open(str(tmp_path / "nothing")) is None
    make_tree(tmp_path, {"intel-rapl:0": ("package-0", 1)})
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("permission denied\n")
    assert RaplReader.open(str(tmp_path)) is None


def test_agent_reports_host_energy_and_the_source_carries_it(tmp_path: Path) -> None:
    make_tree(tmp_path / "powercap", ZONES)
    agent = Agent(tmp_path, extra=("--rapl-root", str(tmp_path / "powercap")))
    try:
        first = httpx.get(f"{agent.url}/v1/power", timeout=5).json()
        assert set(first["host"]) == {"energy_mj", "power_w"}
        set_uj(tmp_path / "powercap", "intel-rapl:0", 1_000_000 + 12_500_000)  # +12.5 J
        second = httpx.get(f"{agent.url}/v1/power", timeout=5).json()
        assert second["host"]["energy_mj"] - first["host"]["energy_mj"] == pytest.approx(12_500)

        async def body() -> None:
            got = Collector()
            source = AgentSource(config(agent.url, [0]), got)
            try:
                await source.start()
                await wait_for(lambda: len(got.samples) >= 3, what="samples with host energy")
                before = got.samples[-1].host_energy_j
                assert before is not None and before >= 12.5
                set_uj(tmp_path / "powercap", "intel-rapl:0:1", 2_000_000 + 3_000_000)  # +3 J DRAM
                await wait_for(lambda: (got.samples[-1].host_energy_j or 0) >= before + 3 - 1e-6,
                               what="the DRAM joules to arrive")
            finally:
                await source.close()

        run(body)
    finally:
        agent.stop()
    # Without a readable tree the agent leaves `host` out (the proxy's power.host_w stands in).
    plain = Agent(tmp_path, extra=("--rapl-root", str(tmp_path / "missing")))
    try:
        assert "host" not in httpx.get(f"{plain.url}/v1/power", timeout=5).json()
    finally:
        plain.stop()


def test_meter_splits_rapl_host_energy_and_conserves_it(tmp_path: Path) -> None:
    """GPU + host + idle == measured (both counters) within 0.1%, host read through RaplReader
    from a fake powercap tree whose package counter wraps during the run."""
    make_tree(tmp_path, ZONES)
    rapl = RaplReader.open(str(tmp_path))
    assert rapl is not None
    # The attributor is driven directly here, past the meter's cold-start record: no hold.
    cfg = parse_config("backends:\n  - {name: b, url: 'http://127.0.0.1:9'}\nenergy: {cold_start_hold_s: 0}\n")
    finals: list[Final] = []
    meter = BackendMeter("b", cfg.backends[0].power, cfg, lambda _, f: finals.append(f))
    t0 = time.time() - 3.0  # the meter settles against the wall clock
    a = meter.attributor
    a.open("r1", t0 + 0.12, True, 200)
    a.open("r2", t0 + 0.43, False, 80)
    for k in range(1, 15):
        a.tokens("r1", t0 + 0.1 * k + 0.05, 3)
    a.close("r1", t0 + 1.52, 200, 42)
    a.close("r2", t0 + 1.81, 80, 25)
    gpu_j, host_measured_j = 0.0, 0.0
    pkg_uj, dram_uj, pkg1_uj = 1_000_000, 2_000_000, MAX_UJ - 1_000_000
    for k in range(0, 31):
        if k:
            busy = 0.1 < 0.1 * k < 1.9
            gpu_j += 0.1 * (110.0 + 300.0 * busy)
            host_measured_j += 0.1 * (60.0 + 40.0 * busy + 8.0 + 50.0)
            pkg_uj += round(0.1 * (60.0 + 40.0 * busy) * 1e6)
            dram_uj += round(0.1 * 8.0 * 1e6)
            pkg1_uj = (pkg1_uj + round(0.1 * 50.0 * 1e6)) % MAX_UJ  # wraps at k = 3
            for zone, uj in (("intel-rapl:0", pkg_uj), ("intel-rapl:0:1", dram_uj), ("intel-rapl:1", pkg1_uj)):
                set_uj(tmp_path, zone, uj)
        t_s = t0 + 0.1 * k
        meter._on_sample(PowerSample(t_s, gpu_j, None, host_energy_j=rapl.read(t_s)))
        a.advance(t_s)
    meter.settle(t0 + 3.0)
    assert sorted(f.request_id for f in finals) == ["r1", "r2"]
    assert all(f.host_joules > 0 for f in finals)
    assert a.host_measured_j == pytest.approx(host_measured_j, rel=1e-6)
    gpu_attr = sum(f.joules for f in finals)
    host_attr = sum(f.host_joules for f in finals)
    host_idle = a.host_measured_j - host_attr
    assert host_idle > 0
    assert gpu_attr + host_attr + a.books.idle_j + host_idle == pytest.approx(
        a.books.measured_j + host_measured_j, rel=1e-3)
    assert a.books.measured_j == pytest.approx(gpu_j, rel=1e-6)
