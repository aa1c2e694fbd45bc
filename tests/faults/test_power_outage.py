"""The power source gone for 30 s and back, under streamed load.

While it is silent the backend's energy is modelled from its learned efficiency model: requests
keep flowing, settle `estimated` at once (not after the 120 s fallback), and the proxy says so in
/v1/energy/backends and /metrics. When readings return, energy is measured again.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    ADMIN_KEY,
    KEYS,
    MODEL,
    ProxyProc,
    SimBackend,
    backend_yaml,
    tenants_yaml,
    wait_until,
)
from tests.faults.tcp_relay import TcpRelay

OUTAGE_S = 30.0
CONCURRENCY = 4


@dataclass
class Outcome:
    request_id: str
    start_s: float
    end_s: float
    ok: bool
    error: str = ""


@dataclass
class Load:
    """Streamed chats at a fixed concurrency from a background thread until `stop` is set."""

    url: str
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    async def _worker(self, client: httpx.AsyncClient, worker: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            request_id = f"outage-{worker}-{n}"
            start_s = time.time()
            body = {"model": MODEL, "stream": True, "max_tokens": 24,
                    "messages": [{"role": "user", "content": f"request {request_id}"}]}
            try:
                async with client.stream("POST", "/v1/chat/completions", json=body,
                                         headers={"x-request-id": request_id}) as resp:
                    data = await resp.aread()
                ok = resp.status_code == 200 and data.rstrip().endswith(b"data: [DONE]") and b'"error"' not in data
                self.outcomes.append(Outcome(request_id, start_s, time.time(), ok, "" if ok else data[-200:].decode()))
            except httpx.HTTPError as exc:
                self.outcomes.append(Outcome(request_id, start_s, time.time(), False, repr(exc)))

    def run(self) -> None:
        async def main() -> None:
            async with httpx.AsyncClient(base_url=self.url, timeout=20,
                                         headers={"Authorization": f"Bearer {KEYS['acme']}"}) as client:
                await asyncio.gather(*(self._worker(client, w) for w in range(CONCURRENCY)))

        asyncio.run(main())


@pytest.fixture
def outage_setup(tmp_path: Path) -> Iterator[tuple[SimBackend, TcpRelay, ProxyProc]]:
    sim = SimBackend("h100-llama3.1-8b", tmp_path)
    relay = TcpRelay(sim.port)
    power = f", power: {{source: sim, url: '{relay.url}', interval_s: 0.1, stale_after_s: 1.0}}"
    config = ("backends:\n" + backend_yaml("h100", sim.url, [MODEL], power)
              + "ledger: memory://\n" + tenants_yaml())
    proxy = ProxyProc(config, tmp_path)
    try:
        yield sim, relay, proxy
    finally:
        proxy.stop()
        relay.close()
        sim.stop()
        assert "Traceback" not in proxy.log()


def _admin(proxy: ProxyProc, path: str) -> httpx.Response:
    return httpx.get(proxy.url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)


def _source_up(proxy: ProxyProc) -> bool:
    return _admin(proxy, "/v1/energy/backends").json()["data"][0]["power_source_up"]


def _metric(proxy: ProxyProc, name: str) -> float:
    for line in httpx.get(proxy.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _final(proxy: ProxyProc, request_id: str) -> dict:
    return _admin(proxy, f"/v1/energy/requests/{request_id}").json()


def test_power_source_gone_30_s_is_modelled_then_measured_again(
    outage_setup: tuple[SimBackend, TcpRelay, ProxyProc], fault_report: object,
) -> None:
    sim, relay, proxy = outage_setup
    load = Load(proxy.url)
    thread = threading.Thread(target=load.run, name="load")
    thread.start()
    try:
        wait_until(lambda: sum(o.ok for o in load.outcomes) >= 20, 30, "load before the outage")
        cut_s = time.time()
        relay.cut()
        wait_until(lambda: not _source_up(proxy), 10, "the source to count as down")
        assert _metric(proxy, 'joulegate_power_source_up{backend="h100"}') == 0.0
        # Requests wholly inside the outage are booked `estimated` while it lasts.
        wait_until(lambda: time.time() - cut_s >= OUTAGE_S - 8
                   and sum(o.ok and o.start_s > cut_s + 2 for o in load.outcomes) >= 10, OUTAGE_S, "load in the outage")
        inside = [o for o in load.outcomes if o.ok and o.start_s > cut_s + 2]
        wait_until(lambda: all(_final(proxy, o.request_id).get("method") == "estimated" for o in inside), 5,
                   "requests inside the outage to be booked as estimated")
        wait_until(lambda: time.time() - cut_s >= OUTAGE_S, OUTAGE_S, "the end of the outage")
        restore_s = time.time()
        relay.restore()
        wait_until(lambda: _source_up(proxy), 15, "the source to count as up again")
        back_s = time.time()
        wait_until(lambda: sum(o.ok and o.start_s > back_s + 1 for o in load.outcomes) >= 20, 30, "load after")
    finally:
        load.stop.set()
        thread.join(30)
    assert not thread.is_alive(), "a request hung"

    outcomes = load.outcomes
    failed = [o for o in outcomes if not o.ok]
    assert not failed, failed[:3]
    assert max(o.end_s - o.start_s for o in outcomes) < 10, "a request was held up by the dead source"
    assert _metric(proxy, 'joulegate_power_source_up{backend="h100"}') == 1.0
    assert _metric(proxy, 'joulegate_energy_estimated_requests_total{backend="h100"}') >= len(inside)

    # Every answered request is booked once; inside the outage as estimated, after it measured.
    after = [o for o in outcomes if o.start_s > back_s + 1]
    wait_until(lambda: all(_final(proxy, o.request_id).get("method") == "measured" for o in after), 20,
               "requests after the outage to be measured")
    wait_until(lambda: _admin(proxy, "/v1/energy/usage").json()["total"]["requests"] == len(outcomes), 20,
               "every answered request in the ledger")
    # The modelled joules are in the right range: the sim's own split is the truth.
    est_j = sum(_final(proxy, o.request_id)["joules"] for o in inside)
    true_j = sum(sim.truth(o.request_id)["joules"] for o in inside)
    error = est_j / true_j - 1
    print(f"\npower outage {restore_s - cut_s:.0f} s: {len(outcomes)} requests, {len(inside)} inside, "
          f"modelled energy {est_j:.1f} J vs true {true_j:.1f} J ({error:+.1%})")
    assert abs(error) < 0.5
    fault_report.add(  # type: ignore[attr-defined]
        "power source gone 30 s", sent=len(outcomes), succeeded=len(outcomes) - len(failed),
        failed_clean=len(failed), hung=0, answered=len(outcomes),
        ledger=_admin(proxy, "/v1/energy/usage").json()["total"]["requests"],
        note=f"{len(inside)} modelled, energy {error:+.1%} vs truth",
    )
