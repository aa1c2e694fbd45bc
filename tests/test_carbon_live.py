"""Carbon in the live proxy: grid intensity sources, all-in joules and grams on responses and
records, host energy split like GPU energy, and carbon routing, over real sockets."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import orjson
import pytest

from proxy.carbon import CsvIntensity, HttpIntensity, grams, read_intensity_csv
from proxy.cli import load_checked_config
from proxy.config import ConfigError, load_config, parse_config
from proxy.energy.attribution import Attributor, Final
from proxy.energy.timeline import EnergyTimeline
from tests.conftest import (
    ADMIN_KEY,
    KEYS,
    MODEL,
    ProxyProc,
    SimBackend,
    backend_yaml,
    sdk_client,
    stream_chat_raw,
    tenants_yaml,
    wait_until,
)

MESSAGES = [{"role": "user", "content": "How many grams is this sentence?"}]
HOST_W = 120.0


class GridServer:
    """A JSON grid-intensity endpoint on a real socket; `answer` is what it serves next
    (an int: that HTTP status with no body)."""

    def __init__(self) -> None:
        self.answer: object = {"data": [{"carbonIntensity": 123.0}]}
        self.hits = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                owner.hits += 1
                if isinstance(owner.answer, int):
                    self.send_response(owner.answer)
                    self.end_headers()
                    return
                body = json.dumps(owner.answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/intensity"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def grid() -> Iterator[GridServer]:
    server = GridServer()
    yield server
    server.stop()


# -- intensity sources -------------------------------------------------------------------------


def test_csv_schedule_reads_iso_and_epoch_rows(tmp_path: Path) -> None:
    midnight = datetime(2026, 12, 6, tzinfo=UTC).timestamp()
    path = tmp_path / "grid.csv"
    path.write_text("timestamp,gco2e_per_kwh\n2026-12-06T00:00:00Z,300\n"
                    f"{midnight + 3600:.0f},100\n2026-12-06 02:00,50\n")
    times, values = read_intensity_csv(str(path))
    assert times == [midnight, midnight + 3600, midnight + 7200] and values == [300, 100, 50]
    s = CsvIntensity(str(path))
    assert s.at(midnight + 10) == (300, True)
    assert s.at(midnight + 3605) == (100, True)
    assert s.at(midnight - 10) == (300, False)  # before the schedule: an estimate
    assert s.at(midnight + 7200 + 7200) == (50, False)  # an hour past its end: an estimate
    path.write_text("timestamp,gco2e_per_kwh\nyesterday,1\n")
    with pytest.raises(ValueError, match=":2: expected a timestamp"):
        read_intensity_csv(str(path))


def test_http_source_keeps_the_last_good_value_and_goes_stale(grid: GridServer) -> None:
    async def run() -> None:
        source = HttpIntensity(grid.url, "data.0.carbonIntensity", interval_s=60)
        assert source.at(time.time()) == (None, False)
        async with httpx.AsyncClient() as client:
            grid.answer = {"data": [{"carbonIntensity": 210.5}]}
            assert await source.poll_once(client)
            assert source.at(time.time()) == (210.5, True)
            grid.answer = 500
            assert not await source.poll_once(client)
            assert source.value == 210.5 and "500" in (source.last_error or "")
            grid.answer = {"data": [{"carbonIntensity": "high"}]}
            assert not await source.poll_once(client)
            assert source.at(time.time()) == (210.5, True)
            # Three polls' time without a good answer: the value stays, marked stale.
            assert source.at(time.time() + 181) == (210.5, False)
        grid.answer = {"data": [{"carbonIntensity": 123.0}]}

    asyncio.run(run())


def test_config_sites_and_their_errors(tmp_path: Path) -> None:
    base = ("backends:\n  - {name: a, url: 'http://x', site: dc}\n"
            "sites:\n  - {name: dc, pue: 1.2, carbon: {csv: grid.csv}}\n")
    (tmp_path / "grid.csv").write_text("timestamp,gco2e_per_kwh\n0,100\n")
    (tmp_path / "c.yaml").write_text(base + "routing: {objective: carbon}\n")
    config = load_config(tmp_path / "c.yaml")
    assert config.sites[0].carbon.csv == str(tmp_path / "grid.csv")  # read beside the config
    assert config.routing.objective == "carbon"
    (tmp_path / "grid.csv").write_text("when,value\n")
    with pytest.raises(ConfigError, match="sites: dc: .*header"):
        load_checked_config(str(tmp_path / "c.yaml"))
    for text, match in [
        (base.replace("site: dc", "site: nowhere"), "site 'nowhere' is not in sites"),
        (base.replace("{csv: grid.csv}", "{csv: g.csv, gco2e_per_kwh: 3}"), "exactly one"),
        (base.replace("pue: 1.2", "pue: 0.8"), "pue"),
        ("backends:\n  - {name: a, url: 'http://x'}\nrouting: {objective: carbon}\n",
         "objective carbon needs sites"),
        ("backends:\n  - {name: a, url: 'http://x', power: {host_w: -1}}\n", "host_w"),
    ]:
        with pytest.raises(ConfigError, match=match):
            parse_config(text)


# -- host energy: split like the GPU's, conserved ----------------------------------------------


def _run_two_requests(host_w: Callable[[int, float], float]) -> tuple[Attributor, list[Final]]:
    """Two overlapping requests over 2 s of 100 ms samples; GPU power steps up while both run;
    the host's counter (like RAPL's) follows `host_w(i, gpu_w)` in interval i."""
    gpu, host = EnergyTimeline(), EnergyTimeline()
    a = Attributor(gpu, prefill_weight=0.05)
    a.host = host
    a.open("r1", 0.05, True, 100)
    a.open("r2", 0.55, False, 50)
    for k in range(1, 12):
        a.tokens("r1", 0.1 * k + 0.01, 2)
    a.close("r1", 1.25, 100, 22)
    a.close("r2", 1.45, 50, 30)
    finals: list[Final] = []
    gpu_e = host_e = 0.0
    for k in range(0, 21):
        if k:
            gpu_w = 150.0 + 200.0 * (0.3 < 0.1 * k < 1.5)
            gpu_e += 0.1 * gpu_w
            host_e += 0.1 * host_w(k, gpu_w)
        gpu.add_energy_sample(0.1 * k, gpu_e)
        host.add_energy_sample(0.1 * k, host_e)
        finals += a.advance(0.1 * k)
    assert {f.request_id for f in finals} == {"r1", "r2"}
    return a, finals


def test_host_energy_is_split_by_the_gpu_shares_and_conserved() -> None:
    a, finals = _run_two_requests(lambda i, _: 80.0 + 20.0 * (i % 2))
    gpu_j = sum(f.joules for f in finals)
    host_j = sum(f.host_joules for f in finals)
    measured_j = a.books.measured_j
    assert a.host_measured_j == pytest.approx(0.1 * sum(80.0 + 20.0 * (i % 2) for i in range(1, 21)))
    host_idle_j = a.host_measured_j - host_j
    assert 0 < host_idle_j < a.host_measured_j  # nothing in flight at the start and the end
    # GPU + host + idle (both) == measured (both), within 0.1%.
    total_j = gpu_j + host_j + a.books.idle_j + host_idle_j
    assert total_j == pytest.approx(measured_j + a.host_measured_j, rel=1e-3)
    assert host_j == pytest.approx(a.host_attributed_j, rel=1e-9)
    # A host drawing a fixed fraction of the GPU's power: every request's host joules are that
    # fraction of its GPU joules (the shares of each interval are the GPU's).
    _, finals = _run_two_requests(lambda _, gpu_w: 0.25 * gpu_w)
    for f in finals:
        assert f.host_joules == pytest.approx(0.25 * f.joules, rel=1e-9)


# -- the live proxy ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def carbon_proxy(session_tmp: Path, grid: GridServer) -> Iterator[tuple[ProxyProc, dict[str, SimBackend]]]:
    sims = {"dirty": SimBackend("h100-llama3.1-8b", session_tmp, seed=1),
            "clean": SimBackend("h100-llama3.1-8b", session_tmp, seed=2)}
    grid.answer = {"data": [{"carbonIntensity": 123.0}]}
    power = ", power: {{source: sim, url: '{url}', interval_s: 0.05, host_w: {host}}}, site: {site}"
    config = "backends:\n"
    config += backend_yaml("dirty", sims["dirty"].url, [MODEL],
                           power.format(url=sims["dirty"].url, host=HOST_W, site="steady"))
    config += backend_yaml("clean", sims["clean"].url, [MODEL],
                           power.format(url=sims["clean"].url, host=HOST_W, site="windy"))
    config += ("sites:\n  - {name: steady, pue: 1.3, carbon: {gco2e_per_kwh: 450}}\n"
               f"  - {{name: windy, pue: 1.1, carbon: {{url: '{grid.url}', "
               "field: data.0.carbonIntensity, interval_s: 60}}\n"
               "routing: {policy: efficiency, objective: carbon}\nledger: memory://\n"
               + tenants_yaml())
    proc = ProxyProc(config, session_tmp)
    wait_until(lambda: grid.hits > 0, 10, "the proxy to poll the grid endpoint")
    yield proc, sims
    proc.stop()
    for sim in sims.values():
        sim.stop()
    assert "Traceback" not in proc.log()


def _final(proxy: ProxyProc, request_id: str) -> dict:
    result: dict = {}

    def measured() -> bool:
        nonlocal result
        result = httpx.get(f"{proxy.url}/v1/energy/requests/{request_id}",
                           headers={"Authorization": f"Bearer {KEYS['acme']}"}, timeout=10).json()
        return result.get("method") == "measured"

    wait_until(measured, 20, f"request {request_id} to be measured")
    return result


def test_all_in_joules_and_grams_on_the_response_and_the_record(carbon_proxy) -> None:
    proxy, _ = carbon_proxy
    c = sdk_client(proxy)
    raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=40)
    backend = raw.headers["x-energy-backend"]
    assert backend == "clean"  # 123 g/kWh x 1.1 beats 450 x 1.3 on the same GPU
    gpu_j = float(raw.headers["x-energy-joules"])
    all_in_j = float(raw.headers["x-energy-joules-all-in"])
    assert all_in_j >= 1.1 * gpu_j
    assert float(raw.headers["x-energy-gco2e"]) == pytest.approx(grams(all_in_j, 123.0), rel=1e-9)
    final = _final(proxy, raw.headers["x-request-id"])
    assert final["site"] == "windy" and final["host_joules"] > 0
    assert final["joules_all_in"] == pytest.approx(1.1 * (final["joules"] + final["host_joules"]),
                                                   rel=1e-9)
    assert final["gco2e"] == pytest.approx(final["joules_all_in"] / 3.6e6 * 123.0, rel=1e-9)
    # The host drew HOST_W all along; this request's share is at most that over its life
    # (a 40-token answer takes well under 30 s).
    assert final["host_joules"] < HOST_W * 30


def test_streamed_energy_object_has_all_in_and_grams(carbon_proxy) -> None:
    proxy, _ = carbon_proxy
    _, body = stream_chat_raw(proxy, {"model": MODEL, "messages": MESSAGES, "max_tokens": 8,
                                      "stream": True, "stream_options": {"include_usage": True}})
    events = [e for e in body.split(b"\n\n") if e.startswith(b"data: {")]
    energy = orjson.loads(events[-1][6:])["usage"]["energy"]
    assert energy["joules_all_in"] > energy["joules"] > 0
    assert energy["gco2e"] == pytest.approx(grams(energy["joules_all_in"], 123.0), rel=1e-9)


def test_grams_reach_the_metrics(carbon_proxy) -> None:
    proxy, _ = carbon_proxy
    sdk_client(proxy).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    text = httpx.get(proxy.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                     timeout=10).text
    lines = [ln for ln in text.splitlines() if ln.startswith("joulegate_energy_gco2e_total{")]
    assert any('backend="clean"' in ln and float(ln.split()[-1]) > 0 for ln in lines), lines
    assert "joulegate_energy_joules_all_in_total{" in text


def test_usage_groups_by_site_with_grams(carbon_proxy) -> None:
    proxy, _ = carbon_proxy
    c = sdk_client(proxy)
    raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=6)
    _final(proxy, raw.headers["x-request-id"])  # booked with its final figures

    def usage() -> dict:
        return httpx.get(proxy.url + "/v1/energy/usage", params={"group_by": "site,tenant"},
                         headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10).json()

    body = usage()
    rows = {(r["site"], r["tenant"]): r for r in body["data"]}
    windy = rows[("windy", "acme")]
    assert windy["gco2e"] > 0 and windy["joules_all_in"] > windy["joules"] > 0
    assert body["total"]["gco2e"] == pytest.approx(sum(r["gco2e"] for r in body["data"]), abs=1e-6)


def test_fill_marks_stale_final_figures_estimated() -> None:
    from proxy.carbon import CarbonBook, ConstantIntensity, Site
    from proxy.records import RequestRecord

    stale = HttpIntensity("http://127.0.0.1:9/x", "v", interval_s=60)
    stale.value, stale.fetched_s = 200.0, time.time() - 3600  # an hour without a good poll
    book = CarbonBook({"s": Site("s", 1.5, stale), "c": Site("c", 1.0, ConstantIntensity(100))},
                      {"a": "s", "b": "c"})

    def record(backend: str | None) -> RequestRecord:
        rec = RequestRecord("r", "t", MODEL, "chat", False, time.time() - 1, backend=backend,
                            end_s=time.time(), joules=10.0, energy_method="measured")
        return rec

    early = record("a")
    book.fill(early, 2.0)  # the response's estimate: left as the relay set it
    assert early.energy_method == "measured" and early.joules_all_in == pytest.approx(18.0)
    final = record("a")
    book.fill(final, 2.0, final=True)
    assert final.energy_method == "estimated" and final.gco2e == pytest.approx(grams(18.0, 200.0))
    fresh = record("b")
    book.fill(fresh, 2.0, final=True)
    assert fresh.energy_method == "measured" and fresh.gco2e == pytest.approx(grams(12.0, 100.0))
    nowhere = record("z")  # no site: PUE 1, no grams
    book.fill(nowhere, 2.0, final=True)
    assert nowhere.joules_all_in == 12.0 and nowhere.gco2e is None and nowhere.site is None


def test_usage_cli_groups_by_site(tmp_path: Path) -> None:
    import subprocess
    import sys

    from proxy.ledger import LedgerRecord, open_ledger

    db = tmp_path / "ledger.db"
    config = tmp_path / "c.yaml"
    config.write_text("backends:\n  - {name: a, url: 'http://x', site: east}\n"
                      "  - {name: b, url: 'http://y', site: west}\n  - {name: c, url: 'http://z'}\n"
                      "sites:\n  - {name: east, carbon: {gco2e_per_kwh: 100}}\n"
                      "  - {name: west, carbon: {gco2e_per_kwh: 300}}\n"
                      f"ledger: sqlite:///{db}\n")

    async def write() -> None:
        ledger = open_ledger(f"sqlite:///{db}")
        await ledger.start()
        for i, (backend, g) in enumerate([("a", 0.5), ("a", 0.25), ("b", 2.0), ("c", 0.0)]):
            ledger.record(LedgerRecord(f"r{i}", "acme", MODEL, backend, 3, 4, 10.0, "measured",
                                       1e9, 1e9 + 1, joules_all_in=12.0, gco2e=g))
        await ledger.close()

    asyncio.run(write())
    done = subprocess.run([sys.executable, "-m", "proxy", "usage", "-c", str(config), "--group-by",
                           "site", "--format", "json"], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    by_site = {r["site"]: r for r in body["data"]}
    assert by_site["east"]["gco2e"] == 0.75 and by_site["east"]["requests"] == 2
    assert by_site["west"]["gco2e"] == 2.0 and by_site[""]["joules_all_in"] == 12.0
    assert body["total"]["gco2e"] == 2.75 and body["total"]["joules_all_in"] == 48.0
