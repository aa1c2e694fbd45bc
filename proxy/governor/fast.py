"""The fast raise: between two decisions, a queue forming on a capped backend raises its cap at
once, so the decision can hold burst headroom as clock headroom instead of slack under a fixed cap.

Pure: no I/O, no clock reads; the caller passes the time (seconds) and what it sees now.

decide.py chooses a cap every interval (15 s by default) for the load it expects; with
`GovernorParams.fast` it keeps the SLO at that load with the fast knobs (no burst factor) and also
names the cap the conservative knobs would keep (`Decision.safe_cap_w`: 1.5x burst, 20% margin,
half the trusted load). The live governor (proxy/governor/actuate.py) and the simulator's
(proxy/sim/governed.py) ask `fast_raise_advice` every 100 ms with each backend brought up to date
(`burst.at_now`, the cap in force now). A queue is forming when
- the oldest request awaiting its first token has waited `fast_wait_share` of the TTFT SLO
  (prefill, which a cap slows most, is where a capped GPU falls behind first), or
- the model's upper TPOT at the requests in flight passes `fast_tpot_share` of the TPOT SLO
  (a batch grown past what the capped clock decodes within the SLO).
Then the cap goes to the safe cap, or, if it is there already, to the maximum (at most once per
`fast_dwell_s`, so a raise has a moment to drain the queue before the next). Raising is the safe
direction and is not rate-limited; lowering is left to the next decision and its limits.
Units: watts, seconds, requests.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.governor.decide import BackendInput, GovernorParams

__all__ = ["FAST_RAISE", "FastRaise", "fast_raise_advice", "queue_reason"]

#: The action label of a fast raise (metrics, logs, the governor view).
FAST_RAISE = "fast_raise"


@dataclass(frozen=True, slots=True)
class FastRaise:
    """Raise `name`'s per-GPU cap from `previous_cap_w` to `cap_w` now, because of `reason`."""

    name: str
    cap_w: float
    previous_cap_w: float
    reason: str


def queue_reason(b: BackendInput, p: GovernorParams) -> str | None:
    """Why a queue is forming on `b` (its load now, `burst.at_now`); None: none is."""
    wait_limit_s = p.fast_wait_share * p.slo_ttft_s
    if b.waiting > 0 and b.oldest_wait_s >= wait_limit_s:
        return (f"a request has awaited its first token {b.oldest_wait_s:.2f} s "
                f"(limit {wait_limit_s:.2f} s)")
    if b.in_flight > 0:
        tpot_s = b.model.tpot_upper_s(float(b.in_flight))
        if tpot_s > p.fast_tpot_share * p.slo_tpot_s:
            return (f"TPOT {tpot_s * 1e3:.0f} ms predicted at {b.in_flight} in flight "
                    f"(limit {p.fast_tpot_share * p.slo_tpot_s * 1e3:.0f} ms)")
    return None


def fast_raise_advice(b: BackendInput, p: GovernorParams, safe_cap_w: float | None, now_s: float,
                      last_raise_s: float | None) -> FastRaise | None:
    """The raise `b` needs now (`b.cap_w`: its cap in force), or None. `safe_cap_w`: the last
    decision's safe cap (None: no fast raise for it); `last_raise_s`: when its last fast raise was."""
    if safe_cap_w is None or b.cap_w >= b.max_w:
        return None
    why = queue_reason(b, p)
    if why is None:
        return None
    at_safe = b.cap_w >= min(safe_cap_w, b.max_w) - p.deadband_w
    if at_safe and last_raise_s is not None and now_s - last_raise_s < p.fast_dwell_s:
        return None  # the last raise is still draining the queue
    target_w = b.max_w if at_safe else min(safe_cap_w, b.max_w)
    return FastRaise(b.name, target_w, b.cap_w, f"a queue forms: {why}")

