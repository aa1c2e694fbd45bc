"""The split rule: divide one weighed interval's joules among requests, other replicas, idle.

Inside one sample interval [a, b] power P is constant. A request's joules there are the
integral of P * rho_r / W, rho_r its weight density and W the sum of every density (the other
replicas' included), which one sweep over the interval's boundaries computes with a running
integral of P / W. Where requests are in flight but W is zero (between token arrivals) they
split that energy equally. The shares are then scaled to the interval's busy joules exactly,
so `attributed + idle (+ carried) + foreign == measured` holds to rounding.

Idle energy (nothing in flight, here or at another replica): in `separate` mode it is idle;
in `share` mode it is carried to the next moment something is in flight, unless the idle
stretch lasts longer than `share_max_s`.

Pure: no I/O, no clock reads; the caller books the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from proxy.energy.attribution.foreign import Step
from proxy.energy.attribution.sums import ZERO, neumaier, span
from proxy.energy.attribution.weighing import WeighedInterval

__all__ = ["Split", "split_interval"]


@dataclass(slots=True, frozen=True)
class Split:
    """One interval's joules, divided. `shares[k]` goes to the interval's k-th request."""

    shares: list[float]
    attributed_j: float  # sum of `shares`
    foreign_j: float  # the other replicas' share
    idle_j: float
    carried_j: float  # share mode's idle waiting for the next busy moment, after this interval
    carry_since_s: float  # where that carried idle stretch began
    wholly_idle: bool  # nothing was in flight at all (its power is the idle power)


def split_interval(
    iv: WeighedInterval, foreign_at_a: tuple[float, int], foreign_steps: list[Step], *,
    share_idle: bool, carried_j: float, carry_since_s: float, share_max_s: float,
    idle_w: float | None,
) -> Split:
    """Split `iv` with the other replicas' (density, count) at a_s and their steps inside it.

    `share_idle`: share mode, carrying `carried_j` idle joules since `carry_since_s` in.
    `idle_w`: the learned idle power (W) to book a partly idle interval's idle part at, or None.
    """
    a_s, b_s, energy_j = iv.a_s, iv.b_s, iv.energy_j
    power_w = energy_j / (b_s - a_s)
    reqs, owner, rho, events = iv.reqs, iv.owner, iv.rho, iv.events
    times, ends, w_after, n_after = iv.times, iv.ends, iv.w_after, iv.n_after
    nseg = len(rho)
    # Running integral at each segment's start and end (None: at b_s).
    g_from: list[tuple[float, float]] = [ZERO] * nseg
    g_to: list[tuple[float, float] | None] = [None] * nseg
    local_w, nf = iv.w0, iv.n0
    fw, fn = foreign_at_a

    # Sweep the local and the foreign step functions together: G = integral of P/W where
    # weighted, H = integral of P/n where in flight but weightless, W and n counting the
    # other replicas' too; F: the joules of the other replicas' share. Compensated sums, so
    # a large running integral never swallows a tiny slice's increment.
    share = share_idle
    carry_in_j = carry_j = carried_j
    idle_j = idle_s = 0.0
    g = g_c = h = h_c = f = f_c = 0.0
    busy = False
    t_prev = a_s
    gi, ng = 0, len(times)
    fi, nfs = 0, len(foreign_steps)
    start = 0
    while True:
        if gi < ng and (fi >= nfs or times[gi] <= foreign_steps[fi][0]):
            t_s, kind = times[gi], 0
        elif fi < nfs:
            t_s, kind = foreign_steps[fi][0], 1
        else:
            t_s, kind = b_s, 2
        if t_s > t_prev:
            part_j = power_w * (t_s - t_prev)
            if nf == 0 and fn == 0 and fw == 0:
                if not share:
                    idle_j += part_j
                    idle_s += t_s - t_prev
                elif carry_j == 0:
                    carry_j, carry_since_s = part_j, t_prev
                else:
                    carry_j += part_j
            else:
                busy = True
                part_j, carry_j = part_j + carry_j, 0.0
                if local_w > 0 or fw > 0:
                    total_w = local_w + fw
                    if local_w > 0:
                        g, g_c = neumaier(g, g_c, part_j / total_w)
                    if fw > 0:
                        f, f_c = neumaier(f, f_c, part_j * (fw / total_w))
                else:
                    total_n = nf + fn
                    if nf:
                        h, h_c = neumaier(h, h_c, part_j / total_n)
                    if fn:
                        f, f_c = neumaier(f, f_c, part_j * (fn / total_n))
            t_prev = t_s
        if kind == 0:
            snap_g, snap_h = (g, g_c), (h, h_c)
            end = ends[gi]
            for e in range(start, end):
                i = events[e][1]
                if i >= 0:
                    g_from[i] = snap_g if rho[i] > 0 else snap_h
                else:
                    g_to[~i] = snap_g if rho[~i] > 0 else snap_h
            start = end
            local_w, nf = w_after[gi], n_after[gi]
            gi += 1
        elif kind == 1:
            _, fw, fn = foreign_steps[fi]
            fi += 1
        else:
            break

    # Exact books for this interval: what is neither idle nor carried on is busy, split
    # between this replica's requests and the others', so the rounding of the sub-slice
    # sums never leaks out of the invariant.
    busy_j = 0.0
    if not busy:
        if share:
            carry_j = carry_in_j + energy_j
        else:
            idle_j = energy_j
    else:
        if idle_s > 0 and idle_w is not None:
            # The interval was partly idle. Its power was not uniform: the GPU drew about its
            # idle power while nothing ran and more while it worked. Book the idle part at the
            # learned idle power (never more than the uniform split gave it), the rest is busy.
            idle_j = min(idle_j, idle_w * idle_s)
        busy_j = energy_j + carry_in_j - idle_j - carry_j
        if busy_j < 0:  # rounding in a nearly idle interval
            if share:
                carry_j += busy_j
            else:
                idle_j += busy_j
            busy_j = 0.0
    if share and carry_j > 0 and b_s - carry_since_s > share_max_s:
        idle_j, carry_j = idle_j + carry_j, 0.0  # a long idle stretch is idle even in share

    shares: list[float] = []
    attributed_j = foreign_j = 0.0
    if busy_j > 0:
        raw = [0.0] * len(reqs)
        g_end, h_end = (g, g_c), (h, h_c)
        for i, rho_i in enumerate(rho):
            end = g_to[i] or (g_end if rho_i > 0 else h_end)
            raw[owner[i]] += (rho_i or 1.0) * span(g_from[i], end)
        raw_sum = math.fsum(raw)
        foreign_raw = f + f_c
        if not reqs:
            local_j = 0.0
        elif foreign_raw > 0:
            local_j = busy_j * (raw_sum / (raw_sum + foreign_raw))
        else:
            local_j = busy_j
        if local_j > 0:
            if raw_sum > 0:
                shares = [x * (local_j / raw_sum) for x in raw]
            else:  # every share underflowed: split evenly rather than lose energy
                shares = [local_j / len(reqs)] * len(reqs)
            attributed_j = math.fsum(shares)
        foreign_j = busy_j - local_j
    return Split(shares, attributed_j, foreign_j, idle_j, carry_j, carry_since_s,
                 not busy and not share)
