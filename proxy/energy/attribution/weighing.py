"""Phase one of settling a sample interval: fix the local requests' weight densities in it.

A request's weight density (weight per second) is piecewise constant: its prefill weight
(`prefill_weight` x prompt tokens) spread over [start, first token], the decode tokens that
arrived in the interval spread over its decode time there, or for a non-streamed request its
whole weight spread over [start, end]. Weighing an interval turns the requests overlapping it
into segments of constant density and the local step function of their sum (what a replica
publishes to the others), ready for the split (split.py).

Pure: no I/O, no clock reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from operator import itemgetter

from proxy.energy.attribution.request import RequestState
from proxy.energy.attribution.steps import StepClock, clip
from proxy.energy.attribution.sums import neumaier

__all__ = ["MIN_SPAN_S", "WeighedInterval", "density", "weigh_interval"]

_INF = math.inf
# Spans shorter than this (s) carry no density: weight / span would overflow to infinity.
MIN_SPAN_S = 1e-9


def density(weight: float, span_s: float) -> float:
    """Weight per second spread over `span_s` seconds (0 for a vanishing span)."""
    return weight / span_s if span_s >= MIN_SPAN_S and weight > 0 else 0.0


@dataclass(slots=True)
class WeighedInterval:
    """A sample interval whose local weights are fixed, waiting for foreign data to be split.

    Segments of constant density: owner (index into `reqs`), density (weight/s; 0 marks the
    owner's in-flight range); `events` (sorted by time): (t_s, i) segment i starts, (t_s, ~i)
    it ends. The local step function: total density `w0` (0 where nothing weighs) and
    in-flight count `n0` at a_s; at `times[k]` (the distinct event times) they become
    `w_after[k]`, `n_after[k]`, after the events before index `ends[k]`.
    """

    a_s: float
    b_s: float
    b_e_j: float  # the timeline's cumulative joules at b_s
    energy_j: float
    reqs: list[RequestState]
    done: list[RequestState]  # those that end by b_s (or ended before a_s)
    owner: list[int]
    rho: list[float]
    events: list[tuple[float, int]]
    w0: float
    n0: int
    times: list[float]
    ends: list[int]
    w_after: list[float]
    n_after: list[int]
    counts: list[tuple[RequestState, int]]  # decode tokens each request settles here
    settled_w: float  # known weight this interval settles (leaves the pending weight when split)
    modelled: bool = False  # its joules are a model's guess: nothing is learned from it

    def weight_and_flight_s(self) -> tuple[float, float]:
        """Integral of the local density (weight) and of the in-flight count (request-s)."""
        weight = count_s = 0.0
        t_prev, w_now, n_now = self.a_s, self.w0, self.n0
        for t_s, w_next, n_next in zip(self.times, self.w_after, self.n_after, strict=True):
            weight += w_now * (t_s - t_prev)
            count_s += n_now * (t_s - t_prev)
            t_prev, w_now, n_now = t_s, w_next, n_next
        weight += w_now * (self.b_s - t_prev)
        count_s += n_now * (self.b_s - t_prev)
        return weight, count_s


def weigh_interval(
    requests: Iterable[RequestState], a_s: float, b_s: float, b_e_j: float, energy_j: float,
    first_finalized_s: float | None, provisional: Callable[[RequestState], float],
    clock: StepClock | None = None,
) -> tuple[WeighedInterval, int, float]:
    """Weigh sample interval [a_s, b_s] (`energy_j` joules, `b_e_j` cumulative at b_s).

    `requests`: the unsettled ones in start order; `provisional` guesses the density of one
    whose weights are unknown (only in a forced interval); `clock`: the decode steps seen
    (steps.py), where decode tokens lie within the interval (None: evenly). Takes the decode tokens that arrived
    by b_s off each request and marks the requests that end here `leaving`. Returns the interval
    and the decode tokens and decode seconds it saw (for the recent decode rate).
    """
    reqs: list[RequestState] = []  # the requests in flight during the interval
    done: list[RequestState] = []  # those that end by b_s
    owner: list[int] = []
    rho: list[float] = []
    events: list[tuple[float, int]] = []
    counts: list[tuple[RequestState, int]] = []
    # State at a_s: total density W (Neumaier pair), weighted and in-flight counts.
    w = w_c = 0.0
    nw = nf = 0
    tokens_n, decode_s, settled_w = 0, 0.0, 0.0

    # Decode tokens lie where the backend stepped: stalls (another prompt's prefill) get few.
    pieces = clock.pieces(a_s, b_s) if clock is not None else []

    def decode(k: int, lo_s: float, hi_s: float, weight: float) -> None:
        """`weight` of decode work over [lo_s, hi_s], in proportion to the steps seen."""
        mine = [p for p in clip(pieces, lo_s, hi_s) if p[1] - p[0] >= MIN_SPAN_S]
        steps_n = math.fsum(p[2] for p in mine)
        if steps_n <= 0:
            segment(k, lo_s, hi_s, weight / (hi_s - lo_s))
            return
        for p_lo_s, p_hi_s, steps in mine:
            segment(k, p_lo_s, p_hi_s, weight * (steps / steps_n) / (p_hi_s - p_lo_s))

    def segment(k: int, lo_s: float, hi_s: float, density: float) -> None:
        nonlocal w, w_c, nw, nf
        i = len(rho)
        owner.append(k)
        rho.append(density)
        if lo_s > a_s:
            events.append((lo_s, i))
        elif density > 0:
            w, w_c = neumaier(w, w_c, density)
            nw += 1
        else:
            nf += 1
        if hi_s < b_s:
            events.append((hi_s, ~i))

    for r in requests:
        if r.leaving:
            continue  # ended in an interval weighed before; settles when that is split
        s_s = r.start_s
        if s_s >= b_s:
            break  # start order: the rest start later too
        e_s = r.end_s if r.end_s is not None else _INF
        if e_s <= a_s:  # ended before the interval: a late close, or before any sample
            r.guessed = r.guessed or e_s <= (a_s if first_finalized_s is None else first_finalized_s)
            done.append(r)
            continue
        k = len(reqs)
        reqs.append(r)
        lo_s, hi_s = max(s_s, a_s), min(e_s, b_s)
        segment(k, lo_s, hi_s, 0.0)
        first_s = r.first_token_s if r.first_token_s is not None else _INF
        placed = r.placed if not r.stream else None
        if placed is not None:
            # Prefill over [start, from_s], tokens over the steps seen after it.
            from_s, prefill_w, decode_w, steps_n = placed
            if from_s > lo_s and prefill_w > 0:
                rho_r = prefill_w / (from_s - s_s)
                p_hi_s = min(from_s, hi_s)
                settled_w += rho_r * (p_hi_s - lo_s)
                segment(k, lo_s, p_hi_s, rho_r)
            d_lo_s = max(from_s, lo_s)
            if hi_s > d_lo_s:
                w_r = decode_w * clock.steps(d_lo_s, hi_s) / steps_n if clock is not None else 0.0
                settled_w += w_r
                if w_r > 0 and hi_s - d_lo_s >= MIN_SPAN_S:
                    decode(k, d_lo_s, hi_s, w_r)
        elif not r.stream or s_s < first_s and first_s > a_s:
            end_s = hi_s if not r.stream else min(first_s, b_s)
            rho_r = r.flat_density if not r.stream else r.prefill_density
            p_lo_s = lo_s
            if rho_r is None:  # only in a forced interval
                r.guessed = True
                rho_r = provisional(r)
            else:
                if r.stream:  # its prefill: the step that ended with its first token
                    p_lo_s = min(max(lo_s, r.prefill_from_s), end_s)
                settled_w += rho_r * (end_s - p_lo_s)
            if rho_r > 0 and end_s > p_lo_s:
                segment(k, p_lo_s, end_s, rho_r)
        dlo_s = max(first_s, a_s)
        if r.stream and hi_s - dlo_s >= MIN_SPAN_S:  # else tokens wait for a next window
            count = 0
            arrivals = r.arrivals
            while arrivals and arrivals[0][0] <= b_s:
                count += arrivals.popleft()[1]
            if count:
                counts.append((r, count))
                tokens_n += count
                settled_w += count
                decode_s += hi_s - dlo_s
                decode(k, dlo_s, hi_s, count)

    done.extend(r for r in reqs if r.end_s is not None and r.end_s <= b_s)
    for r in done:
        r.leaving = True
    # The local step function. W is a compensated sum: a huge short density (a quick
    # prefill) leaving must not wipe out the small ones left.
    events.sort(key=itemgetter(0))
    w0 = w + w_c if nw > 0 and w + w_c > 0 else 0.0
    n0 = nf
    times: list[float] = []
    ends: list[int] = []
    w_after: list[float] = []
    n_after: list[int] = []
    k, n = 0, len(events)
    while k < n:
        t_s = events[k][0]
        while k < n and events[k][0] == t_s:
            i = events[k][1]
            rho_i = rho[i if i >= 0 else ~i]
            if rho_i == 0:
                nf += 1 if i >= 0 else -1
            elif i >= 0:
                w, w_c = neumaier(w, w_c, rho_i)
                nw += 1
            else:
                nw -= 1
                w, w_c = (0.0, 0.0) if nw == 0 else neumaier(w, w_c, -rho_i)
            k += 1
        times.append(t_s)
        ends.append(k)
        w_after.append(w + w_c if nw > 0 and w + w_c > 0 else 0.0)
        n_after.append(nf)
    iv = WeighedInterval(a_s, b_s, b_e_j, energy_j, reqs, done, owner, rho, events, w0, n0,
                         times, ends, w_after, n_after, counts, settled_w)
    return iv, tokens_n, decode_s
