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

__all__ = ["StepClock"]


class StepClock:
    """Cumulative decode steps seen against time (s); times are appended in order."""

    __slots__ = ("_t", "_m", "_base", "decoding_n")

    def __init__(self) -> None:
        self._t: list[float] = []
        self._m: list[float] = []  # cumulative steps up to and including _t[i]
        self._base = 0.0  # cumulative steps before _t[0] (arrivals forgotten)
        self.decoding_n = 0  # open streams past their first token

    def arrival(self, t_s: float, count: int) -> None:
        """A decoding stream got `count` tokens at `t_s`."""
        if count <= 0:
            return
        step = count / max(1, self.decoding_n)
        if self._t and t_s <= self._t[-1]:
            self._m[-1] += step  # same instant (or a late report): one entry
        else:
            self._t.append(t_s)
            self._m.append((self._m[-1] if self._m else self._base) + step)

    def steps(self, lo_s: float, hi_s: float) -> float:
        """Steps seen in (lo_s, hi_s]."""
        if hi_s <= lo_s or not self._t:
            return 0.0
        i, j = bisect_right(self._t, lo_s), bisect_right(self._t, hi_s)
        if j <= i:
            return 0.0
        return self._m[j - 1] - (self._m[i - 1] if i > 0 else self._base)

    def forget_before(self, t_s: float) -> None:
        """Drop arrivals at or before `t_s` (no unsettled request can ask about them)."""
        i = bisect_right(self._t, t_s)
        if i > 1024 or (i and i == len(self._t)):
            self._base = self._m[i - 1]
            del self._t[:i]
            del self._m[:i]
