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

__all__ = ["StepClock", "clip"]

_BURST_S = 0.002  # arrivals this close together are one moment (one step, several streams)
_RATE_RATIO = 2.0  # stretches whose step rates differ less than this merge


class StepClock:
    """Cumulative decode steps seen against time (s); times are appended in order."""

    __slots__ = ("_t", "_m", "_q", "_base", "_base_q", "decoding_n", "others_n")

    def __init__(self) -> None:
        self._t: list[float] = []
        self._m: list[float] = []  # cumulative steps up to and including _t[i]
        self._q: list[float] = []  # cumulative per-request step shares (sum of 1 / batch)
        self._base = 0.0  # cumulative steps before _t[0] (arrivals forgotten)
        self._base_q = 0.0  # cumulative shares before _t[0]
        self.decoding_n = 0  # open streams past their first token
        self.others_n = 0  # open non-streamed generations (decoding, as far as anyone knows)

    def batch(self) -> int:
        """Requests in this replica's decode batch now (at least 1)."""
        return max(1, self.decoding_n + self.others_n)

    def arrival(self, t_s: float, count: int) -> None:
        """A decoding stream got `count` tokens at `t_s`."""
        if count <= 0:
            return
        step = count / max(1, self.decoding_n)
        share = step / self.batch()
        if self._t and t_s <= self._t[-1]:
            self._m[-1] += step  # same instant (or a late report): one entry
            self._q[-1] += share
        else:
            self._t.append(t_s)
            self._m.append((self._m[-1] if self._m else self._base) + step)
            self._q.append((self._q[-1] if self._q else self._base_q) + share)

    def moment_before(self, t_s: float) -> float | None:
        """The newest arrival before `t_s` and its burst (where the step that ends at `t_s`
        began); None if none."""
        i = bisect_right(self._t, t_s - _BURST_S)
        return self._t[i - 1] if i > 0 else None

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

    def pieces(self, lo_s: float, hi_s: float) -> list[tuple[float, float, float]]:
        """[lo_s, hi_s] as stretches of about constant step rate: (from s, to s, steps). A step
        spans the time since the clock's previous arrival (a stall: a long step, a low rate);
        one cut by lo_s or hi_s counts in part; past the newest arrival the last rate holds.
        Stretches whose rates are within `_RATE_RATIO` of each other merge, and chunks closer
        than `_BURST_S` count as one moment (one step's tokens reach the proxy from its streams
        one after the other). Empty where no arrival falls inside."""
        ts, ms = self._t, self._m
        i, j = bisect_right(ts, lo_s), bisect_right(ts, hi_s)
        out: list[list[float]] = []  # [from s, to s, steps]
        if j <= i:
            return []

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

        prev_s = ts[i - 1] if i > 0 else lo_s
        prev_m = ms[i - 1] if i > 0 else self._base
        for k in range(i, j):
            t_s, steps = ts[k], ms[k] - prev_m
            if t_s - prev_s < _BURST_S and k + 1 < j:
                continue  # part of the same moment: carried to the next arrival
            if prev_s < lo_s:  # the step began before lo_s: only its part from lo_s on
                steps *= (t_s - lo_s) / (t_s - prev_s)
            add(max(prev_s, lo_s), t_s, steps)
            prev_s, prev_m = t_s, ms[k]
        if prev_s < hi_s and out:  # the step in progress at hi_s: its part before hi_s
            if j < len(ts):
                rate = (ms[j] - prev_m) / (ts[j] - prev_s)
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
