"""Queue-following caps: under an attainment target, between two decisions each backend's cap
follows its queue, so the fleet clock can stay deep through the bursts that would otherwise
set it.

The fleet clock (clock.py) moves once an interval, on the latency of requests that already
finished. A burst inside an interval (the traces behind the measurements have arrival CV 1.5)
queues requests under a deep clock before any of them finishes, and a queue that forms there
takes several intervals to drain: attainment falls, the clock rises, and the fleet pays for the
burst for minutes. Looked at every 100 ms, a backend whose queue grows is raised at once and
comes back down once the queue has gone:

- more than `queue` requests awaiting their first token: the cap of the fleet clock plus
  `boost` (a little more clock buys prefill, which a cap slows most);
- its oldest request awaiting its first token for `stand_share` of the TTFT SLO: the board
  maximum (that request is about to miss);
- neither: the last decision's cap.

A lower cap waits `dwell_s` after the last move, so a raise has a moment to drain its queue.
Raising is the safe direction and is never held back.

Pure: no I/O, no clock reads; the caller passes the time (seconds) and what it sees now.
Units: watts, seconds, requests, clock ratios.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.governor.clock import cap_for_clock_w
from proxy.governor.decide import BackendInput

__all__ = ["FOLLOW", "CapMove", "FollowParams", "follow_advice"]

#: The action label of a queue-following move (metrics, logs, the governor view).
FOLLOW = "follow"


@dataclass(frozen=True, slots=True)
class FollowParams:
    """Knobs of `follow_advice`."""

    queue: int = 8  # more requests than this awaiting their first token: the boosted cap
    boost: float = 0.2  # the boosted cap holds the fleet clock plus this
    stand_share: float = 0.8  # oldest wait for its first token / TTFT SLO: the board maximum
    dwell_s: float = 1.0  # a cap comes down no sooner than this after its last move
    deadband_w: float = 1.0  # smaller moves are not made


@dataclass(frozen=True, slots=True)
class CapMove:
    """Set `name`'s per-GPU cap from `previous_cap_w` to `cap_w` now, because of `reason`."""

    name: str
    cap_w: float
    previous_cap_w: float
    reason: str


def follow_advice(b: BackendInput, decided_w: float, clock: float, slo_ttft_s: float, p: FollowParams,
                  now_s: float, last_move_s: float | None) -> CapMove | None:
    """The move `b` needs now (`b`: its load now, `burst.at_now`; `b.cap_w`: the cap in force),
    or None. `decided_w`: the last decision's cap; `clock`: the fleet clock; `last_move_s`: when
    this backend's cap last moved (a decision or a follow), None: never."""
    stand_s = p.stand_share * slo_ttft_s
    if b.waiting > 0 and b.oldest_wait_s >= stand_s:
        want_w = b.max_w
        why = f"a request has awaited its first token {b.oldest_wait_s:.2f} s (limit {stand_s:.2f} s)"
    elif b.waiting > p.queue:
        idle_w = b.model.idle_w / max(b.gpus, 1)
        boosted = min(clock + p.boost, 1.0)
        want_w = max(decided_w, round(cap_for_clock_w(boosted, idle_w, b.min_w, b.max_w), 1))
        why = f"{b.waiting} requests await their first token (more than {p.queue}): clock {boosted:.2f}"
    else:
        want_w, why = decided_w, "the queue has gone: back to the decision's cap"
    want_w = min(max(want_w, b.min_w), b.max_w)
    if abs(want_w - b.cap_w) < p.deadband_w:
        return None
    if want_w < b.cap_w and last_move_s is not None and now_s - last_move_s < p.dwell_s:
        return None
    return CapMove(b.name, want_w, b.cap_w, why)
