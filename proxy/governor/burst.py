"""Wake-ups between two decisions: when a burst leaves the router no awake backend within the
SLO, a parked backend wakes at once instead of at the next `governor.interval_s`.

Pure: no I/O, no clock reads; the caller passes the time (seconds) and what it sees now.

decide.py judges the load every interval (15 s by default); a load that rises between two
decisions lands on the backends left awake. The live governor (proxy/governor/actuate.py) and
the simulator's (proxy/sim/governed.py) ask `burst_wake_advice` every 100 ms between decisions
with each awake backend brought up to date (`at_now`). It says wake when no awake backend
would pass the efficiency router's SLO guard for one more request (`policies.efficiency.
takes_more`: requests in flight under its learnt cap, requests awaiting their first token under
its wait cap, and the oldest of them waiting less than `wake_wait_share` of the TTFT SLO): the
router then has nowhere within the SLO to send the next request and spills onto the awake
backend with the most headroom. A backend woken then is one the router will use.

What was measured and left out (docs/governor.md): waking as soon as one awake backend's
oldest request waited a share of the TTFT SLO (others may have room), and the interval's test
(`wake_advice`: spare capacity under 1.5x the load) on the load now; both woke backends the
router then left idle, or kept busy, at a cost in joules and grams.

Hysteresis: at most one such wake-up per `rewake_s`, none while a wake-up is under way (the
caller checks), and parking still waits for a backend idle for a whole interval. Units:
seconds, requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from policies.efficiency import takes_more
from proxy.governor.decide import BackendInput, GovernorParams

__all__ = ["at_now", "burst_wake_advice"]


def at_now(decided: BackendInput, in_flight: int, waiting: int, oldest_wait_s: float) -> BackendInput:
    """`decided` (a backend's input to the last decision) with what it carries now: requests in
    flight, those awaiting their first token, and the wait in s of the oldest of them."""
    return replace(decided, in_flight=in_flight, waiting=waiting, oldest_wait_s=oldest_wait_s)


def burst_wake_advice(up: Sequence[BackendInput], p: GovernorParams, now_s: float,
                      last_wake_s: float | None) -> str | None:
    """Why a parked backend should wake now, between two decisions; None: not now. `up`: the
    awake backends that take requests (`at_now`), draining ones left out; `last_wake_s`: when
    the last wake-up this advice asked for started (None: never)."""
    if last_wake_s is not None and now_s - last_wake_s < p.rewake_s:
        return None
    max_wait_s = p.wake_wait_share * p.slo_ttft_s
    for b in up:
        if takes_more(b.model.plan(p.slo_ttft_s, p.slo_tpot_s), b.in_flight, b.waiting, b.oldest_wait_s, max_wait_s):
            return None
    if not up:
        return "a burst: no awake backend takes requests"
    busiest = max(up, key=lambda b: b.oldest_wait_s)
    return (f"a burst: none of the {len(up)} awake takes one more request within the SLO "
            f"({sum(b.in_flight for b in up)} in flight; on {busiest.name} a request has awaited its "
            f"first token {busiest.oldest_wait_s:.2f} s)")
