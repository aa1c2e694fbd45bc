"""Wake-ups between two decisions (proxy/governor/burst.py): a burst that leaves the router no
awake backend within the SLO wakes a parked backend at once, in the pure advice, the live
governor's watch and the simulator's governor; at most one such wake-up per `rewake_s`."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from policies.model import EfficiencyModel
from proxy.backends import BackendPool
from proxy.config import parse_config
from proxy.governor.actuate import Governor
from proxy.governor.burst import at_now, burst_wake_advice
from proxy.governor.decide import BackendInput, GovernorParams
from proxy.metrics import Metrics
from proxy.sim.fleet import parse_fleet, simulate
from proxy.sim.traces import TraceRequest

PARAMS = GovernorParams(slo_ttft_s=2.0, slo_tpot_s=0.2)


def awake(in_flight: int = 1, rate: float = 0.5, name: str = "h100") -> BackendInput:
    return BackendInput(name=name, model=EfficiencyModel(), in_flight=in_flight, arrival_rate_per_s=rate,
                        mean_request_s=2.0, gpus=1, min_w=200.0, max_w=700.0, cap_w=700.0)


def test_advice_wakes_when_no_awake_backend_passes_the_routers_guard() -> None:
    plan = EfficiencyModel().plan(PARAMS.slo_ttft_s, PARAMS.slo_tpot_s)  # a fresh model's caps
    full = int(plan.cap)  # one more would pass its learnt cap
    roomy, stuck = awake(name="a"), awake(name="b")
    queued = at_now(stuck, in_flight=2, waiting=1, oldest_wait_s=0.7)  # past 0.3 x the TTFT SLO
    assert queued.arrival_rate_per_s == stuck.arrival_rate_per_s  # the interval's rate is kept
    # One backend with room is enough: the router sends the burst there.
    assert burst_wake_advice([at_now(roomy, 3, 0, 0.0), queued], PARAMS, 100.0, last_wake_s=None) is None
    assert burst_wake_advice([at_now(roomy, 3, 1, 0.5), queued], PARAMS, 100.0, None) is None
    # None has: a long first-token wait on one, its learnt cap reached on the other.
    crowded = at_now(roomy, full, 0, 0.0)
    why = burst_wake_advice([crowded, queued], PARAMS, 100.0, None)
    assert why is not None and "none of the 2 awake" in why and "0.70 s" in why
    # As many awaiting their first token as its wait cap trusts counts as full too.
    assert burst_wake_advice([at_now(roomy, 3, int(plan.wait_cap), 0.1), queued], PARAMS, 100.0, None) is not None
    assert burst_wake_advice([], PARAMS, 100.0, None) is not None
    # At most one per rewake_s.
    assert burst_wake_advice([crowded, queued], PARAMS, 100.0, last_wake_s=100.0 - PARAMS.rewake_s / 2) is None
    assert burst_wake_advice([crowded, queued], PARAMS, 100.0, last_wake_s=100.0 - PARAMS.rewake_s) is not None


def _live(interval_s: float) -> tuple[Governor, Any, Any, list[tuple[str, str]]]:
    """A governor in apply mode over two parkable backends (nothing listens at their URLs) whose
    wake-ups are only recorded: (governor, a, b, [(woken, why)])."""
    park = "park: {via: vllm}"
    config = parse_config(f"backends:\n  - {{name: a, url: 'http://127.0.0.1:9/v1', models: [m], {park}}}\n"
                          f"  - {{name: b, url: 'http://127.0.0.1:9/v1', models: [m], {park}}}\n"
                          f"governor: {{mode: apply, interval_s: {interval_s}}}\n")
    pool = BackendPool(config)
    gov = Governor(config, pool, Metrics())
    assert gov.parking is not None
    woken: list[tuple[str, str]] = []

    def wake(backend: Any, why: str) -> None:
        woken.append((backend.name, why))

    gov.parking.wake = wake  # type: ignore[assignment,method-assign]
    a, b = pool.backends
    return gov, a, b, woken


def test_the_live_watch_wakes_a_parked_backend_between_two_ticks() -> None:
    gov, a, b, woken = _live(3600)
    assert gov.watch() is None  # nothing parked
    b.parked = True
    assert gov.watch() is None  # a is idle
    a.in_flight = 1
    a.efficiency.sent(time.time() - 1.0)  # a request on a has awaited its first token for 1 s
    assert gov.watch() is b and woken[0][0] == "b" and "a burst" in woken[0][1]
    assert gov.watch() is None and len(woken) == 1  # at most one per rewake_s


def test_the_governors_loop_watches_between_its_ticks() -> None:
    async def go() -> None:
        gov, a, b, woken = _live(3600)  # no tick for an hour after the first
        b.parked = True
        a.in_flight = 1
        a.efficiency.sent(time.time() - 1.0)
        await gov.start()
        try:
            loop = asyncio.get_running_loop()
            deadline_s = loop.time() + 10
            while not woken:  # the watch runs every WATCH_S
                assert loop.time() < deadline_s, "no wake-up between two ticks"
                await asyncio.sleep(0.01)
            assert woken[0][0] == "b"
        finally:
            b.parked = False  # close() would wake it through the recorded stub
            await gov.close()

    asyncio.run(asyncio.wait_for(go(), 30))


def test_a_burst_between_two_decisions_wakes_a_parked_backend_before_the_next() -> None:
    fleet = parse_fleet({"backends": [{"name": "h100", "profile": "h100-llama3.1-8b"},
                                      {"name": "a100", "profile": "a100-llama3.1-8b"}]})
    # A request every 2 s lets the governor park the a100 at 15 s; 40 at 20.5 s are more than
    # the router trusts the h100 with (its model has seen one or two in flight): the a100 wakes
    # at once, not at the decision at 30 s, and takes the next wave while the h100 is queued.
    trace = ([TraceRequest(float(t), 200, 50) for t in range(0, 40, 2)]
             + [TraceRequest(20.5, 1000, 300)] * 40 + [TraceRequest(22.8, 1000, 300)] * 20)
    trace.sort(key=lambda r: r.arrival_s)
    r = simulate(fleet, trace, "efficiency+governor", record_requests=True)
    assert r.governor is not None and r.request_log is not None
    a100 = r.governor["a100"]
    assert a100["burst_wakes"] == 1 and a100["on_demand_wakes"] == 0
    (parked_s, woken_s), *_ = a100["parked_intervals_s"]
    assert parked_s == 15.0 and 20.5 <= woken_s < 21.0
    assert any(b == "a100" and s == 22.8 for b, s, _ in r.request_log)
