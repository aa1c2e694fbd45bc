"""7. The power source gone for 30 s and back, under streamed load.

While it is silent the backend's energy is modelled from its learned efficiency model: requests
keep flowing, settle `estimated` at once (not after the 120 s fallback), and the proxy says so in
/v1/energy/backends and /metrics. When readings return, energy is measured again.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN_KEY, MODEL, ProxyProc, SimBackend, backend_yaml, tenants_yaml
from tests.faults.conftest import Figures
from tests.faults.load import StreamLoad, tally
from tests.faults.tcp_relay import TcpRelay

OUTAGE_S = 30.0
DEADLINE_S = 10.0  # a request held up by the dead source would blow this


@pytest.fixture
def outage_setup(tmp_path: Path) -> Iterator[tuple[SimBackend, TcpRelay, ProxyProc]]:
    """A sim whose power API is reached through a TCP relay that can be cut, and a proxy."""
    sim = SimBackend("h100-llama3.1-8b", tmp_path)
    relay = TcpRelay(sim.port)
    power = f", power: {{source: sim, url: '{relay.url}', interval_s: 0.1, stale_after_s: 1.0}}"
    config = "backends:\n" + backend_yaml("h100", sim.url, [MODEL], power) + "ledger: memory://\n" + tenants_yaml()
    proxy = ProxyProc(config, tmp_path)
    try:
        yield sim, relay, proxy
    finally:
        proxy.stop()
        relay.close()
        sim.stop()
        assert "Traceback" not in proxy.log()


async def _until(check: Callable[[], bool | Awaitable[bool]], timeout_s: float, what: str) -> None:
    """Poll `check` (plain or async) every 50 ms until it is true; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not await _value(check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)


class AdminApi:
    """The proxy's energy API and metrics, read with the admin key (one per event loop)."""

    def __init__(self, proxy: ProxyProc) -> None:
        self.http = httpx.AsyncClient(base_url=proxy.url, timeout=10,
                                      headers={"Authorization": f"Bearer {ADMIN_KEY}"})

    async def source_up(self) -> bool:
        return (await self.http.get("/v1/energy/backends")).json()["data"][0]["power_source_up"]

    async def metric(self, name: str) -> float:
        for line in (await self.http.get("/metrics")).text.splitlines():
            if line.startswith(name):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    async def finals(self, ids: list[str]) -> list[dict]:
        answers = await asyncio.gather(*(self.http.get(f"/v1/energy/requests/{i}") for i in ids))
        return [a.json() for a in answers]

    async def source_down(self) -> bool:
        return not await self.source_up()

    async def all_booked(self, ids: list[str], method: str) -> bool:
        """Every request in `ids` is booked, with `method`."""
        return {f.get("method") for f in await self.finals(ids)} == {method}


def test_power_source_gone_30_s_is_modelled_then_measured_again(
    outage_setup: tuple[SimBackend, TcpRelay, ProxyProc], figures: Figures,
) -> None:
    figures.scenario = "power_gone_30s"
    sim, relay, proxy = outage_setup
    marks: dict[str, float] = {}
    inside: list[str] = []  # ids sent and answered wholly inside the outage

    def ok_after(t: float) -> list[str]:
        return [o.request_id for o in load.outcomes if o.result == "ok" and o.start_s > t]

    async def script(load: StreamLoad) -> None:
        api = AdminApi(proxy)
        try:
            await load.until(20)
            marks["cut"] = time.monotonic()
            relay.cut()
            await _until(api.source_down, 10, "the source to count as down")
            assert await api.metric('joulegate_power_source_up{backend="h100"}') == 0.0
            settle_s = marks["cut"] + 2
            await _until(lambda: time.monotonic() > marks["cut"] + OUTAGE_S - 8 and len(ok_after(settle_s)) >= 10,
                         OUTAGE_S, "load inside the outage")
            inside.extend(ok_after(settle_s))
            # Booked `estimated` while the source is still gone: nothing waits for it.
            await _until(lambda: api.all_booked(inside, "estimated"), 5, "requests inside to be estimated")
            await _until(lambda: time.monotonic() > marks["cut"] + OUTAGE_S, OUTAGE_S, "the outage's end")
            marks["restore"] = time.monotonic()
            relay.restore()
            await _until(api.source_up, 15, "the source to count as up again")
            marks["back"] = time.monotonic() + 1
            await _until(lambda: len(ok_after(marks["back"])) >= 20, 30, "load after the outage")
        finally:
            await api.http.aclose()

    load = StreamLoad(proxy, "power", 4, DEADLINE_S, max_tokens=lambda i: 24)
    outcomes = load.run(script, timeout_s=OUTAGE_S + 90)

    async def books() -> tuple[float, int, float, float]:
        api = AdminApi(proxy)
        try:
            after = ok_after(marks["back"])
            await _until(lambda: api.all_booked(after, "measured"), 20, "requests after to be measured")
            est_j = sum(f["joules"] for f in await api.finals(inside))
            booked = (await api.http.get("/v1/energy/usage")).json()["total"]["requests"]
            return (est_j, booked, await api.metric('joulegate_energy_estimated_requests_total{backend="h100"}'),
                    await api.metric('joulegate_power_source_up{backend="h100"}'))
        finally:
            await api.http.aclose()

    est_j, booked, estimated_n, up = asyncio.run(books())
    # The memory ledger is read through the API: every answered request, each once.
    tally(figures, outcomes, ledger_ids={o.request_id for o in outcomes} if booked == len(outcomes) else set())
    true_j = sum(sim.truth(i)["joules"] for i in inside)
    error = est_j / true_j - 1
    figures.notes.append(f"{len(inside)} modelled, energy {error:+.1%} vs truth")
    print(f"\npower gone {marks['restore'] - marks['cut']:.0f} s: {len(outcomes)} requests, {len(inside)} inside, "
          f"modelled {est_j:.1f} J vs true {true_j:.1f} J ({error:+.1%})")
    figures.check()
    assert up == 1.0 and estimated_n >= len(inside)
    assert abs(error) < 0.5


async def _value(result: bool | Awaitable[bool]) -> bool:
    return await result if inspect.isawaitable(result) else result
