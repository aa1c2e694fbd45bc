"""The fleet clock: how deep caps go under an attainment target, from measured latency.

The governor's per-backend checks (decide.py) run on the learned model's upper estimates with
margins, at the load the router gives a backend under its present cap. Under load they hold
caps well above what the SLO needs: the router fills the fastest GPUs up to their SLO guard,
no cap fits that load, though under a cap the router would send less there. With an
attainment target (`governor.slo_target`: the share of requests that must meet the SLO) the
fleet also runs at a common clock ratio (1: uncapped), set by feedback from the requests that
finished: each interval the `target` quantile of their latency over the SLO (per request, the
larger of TTFT / its limit and TPOT / its limit; <= 1 is met) is held near a setpoint. A
common clock slows every backend alike, so the router's split keeps its shape while the caps
fall.

Latency does not grow smoothly as the clock falls: it stays flat, then queues form within an
interval and take several more to drain (what finishes next was queued at the deep clock). So
the feedback remembers where that happened: a quantile over the SLO sets a floor a step above
the lowest clock of the last three intervals (the drain's misses come after the clock has risen
again), and each interval on target lowers the floor by a little, to probe again slowly. TCP's
congestion window does the same with its slow-start threshold. When at the decision no awake
backend passes the router's SLO guard (a queue the finished requests do not show yet) the clock
does not fall, and at two decisions in a row it rises a little (a fleet that stays full is
building a backlog); between decisions each backend's cap follows its own queue (follow.py).

Pure: no I/O, no clock reads. Units: clock ratios (dimensionless), watts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.governor.capmodel import DYNAMIC_POWER_EXPONENT

__all__ = ["ClockParams", "FleetClock", "cap_for_clock_w", "next_clock"]


@dataclass(frozen=True, slots=True)
class ClockParams:
    """Knobs of `next_clock`."""

    target: float  # the share of requests that must meet the SLO
    setpoint: float = 0.9  # the target quantile of latency / SLO is held here
    gain: float = 0.5  # clock x (quantile / setpoint) ^ gain ...
    fall: float = 0.85  # ... but no less than this factor in one interval ...
    rise: float = 1.25  # ... nor more than this one
    saturated_rise: float = 1.1  # saturated at two decisions in a row: the clock x this
    lowest: float = 0.4  # the clock never goes below this (about the GPUs' minimum limits)
    min_finished: int = 20  # fewer requests finished than this: no change; they wait for more ...
    carry_intervals: int = 4  # ... over at most this many intervals (theirs included)
    floor_step: float = 0.05  # a miss sets the floor this far above the lowest recent clock
    floor_decay: float = 0.01  # each interval on target lowers the floor by this


@dataclass(frozen=True, slots=True)
class FleetClock:
    """The clock ratio the fleet's caps hold (1.0: uncapped), the floor it may not go below
    for now, the last interval's quantile of latency / SLO (nan: not measured), the clocks of
    the two intervals before this one (newest last), whether the last decision found the
    fleet saturated, the latencies of recent intervals too few to judge (one tuple an
    interval, newest last), and how many requests the last quantile was taken over."""

    clock: float = 1.0
    floor: float = 0.0
    quantile: float = math.nan
    before: tuple[float, ...] = ()
    saturated: bool = False
    pending: tuple[tuple[float, ...], ...] = ()
    judged: int = 0


def next_clock(state: FleetClock, latency_ratios: Sequence[float], p: ClockParams,
               saturated: bool = False) -> FleetClock:
    """The fleet clock after an interval whose finished requests had these latencies over the
    SLO (inf: a request that never had a first token). Too few finished: unchanged, and they
    are judged with the next intervals' (at most `carry_intervals` in all), so a fleet with
    little traffic still moves its clock, only less often.
    `saturated`: no awake backend takes one more request within the SLO now (the router's
    guard): a queue is forming that the finished requests do not show yet, so the clock does not
    fall; saturated at the decision before too, it rises by `saturated_rise` (this interval's
    latencies unjudged, as the rise does not wait for them; any still waiting go on waiting)."""
    before = (*state.before, state.clock)[-2:]
    if saturated and state.saturated:
        return FleetClock(min(state.clock * p.saturated_rise, 1.0), state.floor, state.quantile, before, True,
                          state.pending, state.judged)
    groups = (*state.pending, tuple(latency_ratios))[-p.carry_intervals:]
    if sum(len(g) for g in groups) < p.min_finished:
        return FleetClock(state.clock, state.floor, state.quantile, before, saturated, groups, state.judged)
    ordered = sorted(x for g in groups for x in g)
    q = ordered[min(int(p.target * len(ordered)), len(ordered) - 1)]
    floor = state.floor
    if q > 1.0:  # the target missed: not this deep again for a while
        floor = min(1.0, max(floor, min((state.clock, *state.before)) + p.floor_step))
    elif q <= p.setpoint:
        floor = max(floor - p.floor_decay, 0.0)
    factor = min(max((q / p.setpoint) ** p.gain, p.fall), p.rise) if math.isfinite(q) else p.rise
    if saturated:
        factor = max(factor, 1.0)
    clock = state.clock * factor
    if factor < 1.0:
        clock = max(clock, floor)
    return FleetClock(min(max(clock, p.lowest), 1.0), floor, q, before, saturated, judged=len(ordered))


def cap_for_clock_w(clock: float, idle_w: float, min_w: float, max_w: float) -> float:
    """The per-GPU cap (W) that holds a GPU with this idle power to `clock` under full load
    (the cap model's inverse at the board maximum), within `[min_w, max_w]`."""
    return float(min(max(idle_w + clock ** DYNAMIC_POWER_EXPONENT * (max_w - idle_w), min_w), max_w))
