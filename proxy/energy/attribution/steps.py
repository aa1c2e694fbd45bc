"""The backend's decode step clock, read off its streams' token arrivals.

A continuously batching backend gives every running request one token per step, streamed or
not; a step stalls while a prompt is prefilled. The streams show when steps happened: each
arrival of `count` tokens while `n` streams decode counts `count / n` steps. A non-streamed
request's tokens are then placed in proportion to the steps seen over its decode time, not
evenly over its lifetime: through a long prefill (few steps) it weighs little, as it did.

Pure: no I/O, no clock reads.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque

__all__ = ["StepClock", "clip"]

_BURST_S = 0.002  # arrivals this close together are one moment (one step, several streams)
# ... or closer than this share of a typical step: one step's tokens reach the proxy from its
# streams spread by however long the event loop takes to read them all (5 ms of spread made the
# fixed 2 ms split one step into several moments and put prefills in a sliver of their step).
_BURST_STEP_SHARE = 0.8
# A stream's chunk this close (share of a typical step) before another's first token is of the
# same step: tighter than a moment, so that a short step before is not taken for the same one.
_SAME_STEP_SHARE = 0.5
# Recent per-token gaps of streams; a typical step is their median. A stall (a long prefill)
# gives every decoding stream one long gap at once, so the window spans many steps.
_GAPS_KEPT = 256
_GAPS_EVERY = 32  # the median is recomputed after this many new gaps
_RATE_RATIO = 2.0  # stretches whose step rates differ less than this merge


class StepClock:
    """Cumulative decode steps seen against time (s); times are appended in order."""

    __slots__ = ("_t", "_m", "_q", "_since", "_base", "_base_q", "decoding_n", "others_n", "_gaps",
                 "_gaps_new", "burst_s", "step_s")

    def __init__(self) -> None:
        self._t: list[float] = []
        self._m: list[float] = []  # cumulative steps up to and including _t[i]
        self._q: list[float] = []  # cumulative per-request step shares (sum of 1 / batch)
        self._since: list[float] = []  # when the stream behind _t[i] had its previous tokens
        self._base = 0.0  # cumulative steps before _t[0] (arrivals forgotten)
        self._base_q = 0.0  # cumulative shares before _t[0]
        self.decoding_n = 0  # open streams past their first token
        self.others_n = 0  # open non-streamed generations (decoding, as far as anyone knows)
        self._gaps: deque[float] = deque(maxlen=_GAPS_KEPT)
        self._gaps_new = 0
        self.burst_s = _BURST_S  # arrivals closer than this are one moment (s)
        self.step_s = 0.0  # a typical decode step (s), 0 before enough streams were seen

    def batch(self) -> int:
        """Requests in this replica's decode batch now (at least 1)."""
        return max(1, self.decoding_n + self.others_n)

    def arrival(self, t_s: float, count: int, since_s: float | None = None) -> None:
        """A decoding stream got `count` tokens at `t_s`, its previous ones at `since_s`."""
        if count <= 0:
            return
        if since_s is not None and t_s > since_s:
            self._gaps.append((t_s - since_s) / count)
            self._gaps_new += 1
            if self._gaps_new >= _GAPS_EVERY:
                self._gaps_new = 0
                self.step_s = sorted(self._gaps)[len(self._gaps) // 2]
                self.burst_s = max(_BURST_S, _BURST_STEP_SHARE * self.step_s)
        step = count / max(1, self.decoding_n)
        share = step / self.batch()
        if self._t and t_s <= self._t[-1]:
            self._m[-1] += step  # same instant (or a late report): one entry
            self._q[-1] += share
        else:
            self._t.append(t_s)
            self._since.append(since_s if since_s is not None and since_s < t_s else t_s)
            self._m.append((self._m[-1] if self._m else self._base) + step)
            self._q.append((self._q[-1] if self._q else self._base_q) + share)

    def moment_before(self, t_s: float) -> float | None:
        """Where the step that ends at `t_s` began: the previous step's end; None if no
        arrival came before."""
        i = bisect_right(self._t, t_s)
        if i == 0:
            return None
        last_s = self._t[i - 1]
        # A chunk just before is of the same step, read first: its stream's previous tokens
        # ended the step before.
        if t_s - last_s < max(_BURST_S, _SAME_STEP_SHARE * self.step_s):
            return self._since[i - 1]
        return last_s

    def steps(self, lo_s: float, hi_s: float) -> float:
        """Steps seen in (lo_s, hi_s]."""
        if hi_s <= lo_s or not self._t:
            return 0.0
        i, j = bisect_right(self._t, lo_s), bisect_right(self._t, hi_s)
        if j <= i:
            return 0.0
        return self._m[j - 1] - (self._m[i - 1] if i > 0 else self._base)

    def mean_share(self, lo_s: float, hi_s: float) -> float | None:
        """One request's mean share of a step in (lo_s, hi_s] (1 / the batch it decoded in);
        None where no step was seen."""
        if hi_s <= lo_s or not self._t:
            return None
        i, j = bisect_right(self._t, lo_s), bisect_right(self._t, hi_s)
        if j <= i:
            return None
        steps = self._m[j - 1] - (self._m[i - 1] if i > 0 else self._base)
        shares = self._q[j - 1] - (self._q[i - 1] if i > 0 else self._base_q)
        return shares / steps if steps > 0 else None

    def forget_before(self, t_s: float) -> None:
        """Drop arrivals at or before `t_s` (no unsettled request can ask about them)."""
        i = bisect_right(self._t, t_s)
        if i > 1024 or (i and i == len(self._t)):
            self._base, self._base_q = self._m[i - 1], self._q[i - 1]
            del self._t[:i]
            del self._m[:i]
            del self._q[:i]
            del self._since[:i]

    def pieces(self, lo_s: float, hi_s: float) -> list[tuple[float, float, float]]:
        """[lo_s, hi_s] as stretches of about constant step rate: (from s, to s, steps).

        Arrivals within `burst_s` of a moment's first arrival are that moment: one step's
        tokens, read from its streams one after the other. The step they end spans the time
        since the previous moment (a stall: a long step, a low rate). A step cut by lo_s or
        hi_s counts in part; past the newest moment the next one's rate holds, or the last.
        Stretches whose rates are within `_RATE_RATIO` of each other merge. Empty where no
        moment begins inside."""
        ts, ms, burst_s, n = self._t, self._m, self.burst_s, len(self._t)
        i, j = bisect_right(ts, lo_s), bisect_right(ts, hi_s)
        if j <= i:
            return []
        out: list[list[float]] = []  # [from s, to s, steps]

        def add(a_s: float, b_s: float, steps: float) -> None:
            if b_s - a_s <= 0 or steps <= 0:
                return
            if out:
                run = out[-1]
                rate, run_rate = steps / (b_s - a_s), run[2] / (run[1] - run[0])
                if max(rate, run_rate) <= _RATE_RATIO * min(rate, run_rate):
                    run[1], run[2] = b_s, run[2] + steps
                    return
            out.append([a_s, b_s, steps])

        def moment_end(k: int) -> int:
            """Index of the last arrival of the moment that begins at ts[k]."""
            e = k
            while e + 1 < n and ts[e + 1] - ts[k] < burst_s:
                e += 1
            return e

        # The moment in progress at lo_s: its late arrivals after lo_s are its, not a new one.
        k, prev_s, prev_m = i, lo_s, self._base
        if i > 0:
            x = i - 1
            while x > 0 and ts[i - 1] - ts[x - 1] < burst_s:
                x -= 1
            prev_s = ts[x]
            while k < n and ts[k] - prev_s < burst_s:
                k += 1
            prev_m = ms[k - 1]
        while k < j:
            e = moment_end(k)
            t_s, steps = ts[k], ms[e] - prev_m
            if prev_s < lo_s:  # the step began before lo_s: only its part from lo_s on
                steps *= (t_s - lo_s) / (t_s - prev_s)
            add(max(prev_s, lo_s), t_s, steps)
            prev_s, prev_m, k = t_s, ms[e], e + 1
        if prev_s < hi_s and out:  # the step in progress at hi_s: its part before hi_s
            if k < n:
                rate = (ms[moment_end(k)] - prev_m) / (ts[k] - prev_s)
            else:
                rate = out[-1][2] / (out[-1][1] - out[-1][0])
            add(prev_s, hi_s, rate * (hi_s - prev_s))
        return [(a_s, b_s, steps) for a_s, b_s, steps in out]


def clip(pieces: list[tuple[float, float, float]], lo_s: float,
         hi_s: float) -> list[tuple[float, float, float]]:
    """The parts of `pieces` inside [lo_s, hi_s], steps in proportion to the overlap."""
    out = []
    for t0, t1, steps in pieces:
        a, b = max(t0, lo_s), min(t1, hi_s)
        if b > a:
            out.append((a, b, steps * (b - a) / (t1 - t0)))
    return out
