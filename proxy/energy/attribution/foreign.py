"""The weights crossing between replicas: the others' step function in, this one's out.

Both are step functions of (weight density per s, requests in flight) over time: the other
replicas' total (`ForeignWeights`, fed by proxy/energy/shares/), which counts in the split like
a request of nobody's here, and this replica's own local one as it is weighed
(`LocalWeights`), collected for the others.

Pure: no I/O, no clock reads.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right

__all__ = ["ForeignWeights", "LocalWeights", "Step"]

Step = tuple[float, float, int]  # (t_s, weight density per s, requests in flight)

# Compact the foreign step function's lists once this many dropped entries sit at their head.
_COMPACT_AT = 1024
# Local weight points kept for `take_local` when nobody drains them (a stalled exchange).
_MAX_LOCAL_POINTS = 100_000


class ForeignWeights:
    """The other replicas' weight density and in-flight count as a step function of time.

    Value i holds from `t_s[i]` on; entries before `head` are dropped ones (kept until enough
    pile up to be worth compacting).
    """

    __slots__ = ("t_s", "density", "count", "head")

    def __init__(self) -> None:
        self.t_s: list[float] = []
        self.density: list[float] = []
        self.count: list[int] = []
        self.head = 0

    def set(self, t_s: float, density: float, count: int) -> None:
        """From `t_s` on: `density` weight/s, `count` in flight; at or before the newest step's
        time it changes that step's value (times never go back)."""
        if not math.isfinite(t_s):
            return
        density = density if density > 0 and math.isfinite(density) else 0.0
        count = max(int(count), 0)
        ts = self.t_s
        if len(ts) > self.head and t_s <= ts[-1]:
            self.density[-1], self.count[-1] = density, count
            return
        ts.append(t_s)
        self.density.append(density)
        self.count.append(count)

    @property
    def newest_density(self) -> float:
        """The newest known density (weight/s); 0 when none is known."""
        return self.density[-1] if len(self.density) > self.head else 0.0

    @property
    def newest_count(self) -> int:
        """The newest known in-flight count; 0 when none is known."""
        return self.count[-1] if len(self.count) > self.head else 0

    def within(self, a_s: float, b_s: float) -> tuple[tuple[float, int], list[Step]]:
        """(density, count) in force at a_s, and the steps inside (a_s, b_s)."""
        ts, h = self.t_s, self.head
        if len(ts) == h:
            return (0.0, 0), []
        i = bisect_right(ts, a_s, h)
        at_a = (self.density[i - 1], self.count[i - 1]) if i > h else (0.0, 0)
        j = bisect_left(ts, b_s, i)
        return at_a, [(ts[k], self.density[k], self.count[k]) for k in range(i, j)]

    def prune(self, until_s: float) -> None:
        """Drop the steps before the one in force at `until_s`."""
        ts = self.t_s
        if not ts:
            return
        h = bisect_right(ts, until_s, self.head) - 1
        if h <= self.head:
            return
        if h >= _COMPACT_AT and h * 2 >= len(ts):
            del ts[:h], self.density[:h], self.count[:h]
            h = 0
        self.head = h


class LocalWeights:
    """This replica's weighed (density, in-flight count) steps, from `from_s` on, until taken."""

    __slots__ = ("steps", "from_s")

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.from_s: float | None = None

    def append(self, a_s: float, w0: float, n0: int, times: list[float],
               w_after: list[float], n_after: list[int]) -> None:
        """Add an interval's steps: (w0, n0) from a_s, then `w_after`/`n_after` at `times`."""
        out = self.steps
        if len(out) >= _MAX_LOCAL_POINTS:  # nobody drains them: start over
            out.clear()
            self.from_s = None
        if self.from_s is None:
            self.from_s = a_s
        if not out or out[-1][1] != w0 or out[-1][2] != n0:
            out.append((a_s, w0, n0))
        for t_s, w, n in zip(times, w_after, n_after, strict=True):
            last = out[-1]
            if last[1] != w or last[2] != n:
                out.append((t_s, w, n))

    def take(self, until_s: float) -> tuple[float, float, list[Step]]:
        """(from_s, until_s, steps) collected since the last take; the next starts at until_s."""
        from_s = self.from_s if self.from_s is not None else until_s
        steps, self.steps = self.steps, []
        self.from_s = until_s
        return from_s, until_s, steps
