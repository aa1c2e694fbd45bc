"""One backend's energy as a cumulative function of time.

`EnergyTimeline` turns power-source readings into cumulative joules over time: either readings
of a cumulative energy counter (joules; NVML/DCGM counters, converted from mJ by the caller) or
instantaneous power readings (watts, integrated with the trapezoid rule). Between two samples the
curve is linear, i.e. power is constant inside each sample interval. A gap in sampling (a source
that went silent for a while) is simply a long interval: the energy the counter gained across it
is spread at constant power over the whole gap. A caller that knows the source is down can
bridge the gap with modelled power instead (`add_modelled_power`); readings then carry on from
the bridge.

Pure: no I/O, no clock reads. Times are seconds on the caller's one clock (float).
Memory is bounded: samples older than `max_age_s` behind the newest one are dropped.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from typing import Literal

__all__ = ["EnergyTimeline"]

# Readings closer together than this (s) count as taken at the same time: a shorter interval
# would turn a rounding step in the counter into an absurd power.
_MIN_STEP_S = 1e-9
# Compact the sample lists once this many dropped entries sit at their head: trimming a Python
# list from the front is O(n), so do it rarely and keep the per-sample cost O(1) amortised.
_COMPACT_AT = 1024


class EnergyTimeline:
    """Cumulative joules of one backend (all its GPUs summed) as a function of time in seconds.

    Feed one kind of reading per timeline: the first sample fixes the kind, and readings of the
    other kind are ignored (a source that has the counter should not also add power, which
    would count the same joules twice).
    """

    __slots__ = (
        "max_age_s",
        "_t_s",
        "_e_j",
        "_head",
        "_kind",
        "_raw_j",
        "_deferred_j",
        "_power_w",
        "_rebase",
    )

    def __init__(self, max_age_s: float = 900.0) -> None:
        if not max_age_s > 0:
            raise ValueError("max_age_s must be positive")
        self.max_age_s = max_age_s
        # Sample times (strictly increasing) and the cumulative joules at each; entries before
        # `_head` are dropped ones awaiting compaction. Parallel lists so `bisect` works directly.
        self._t_s: list[float] = []
        self._e_j: list[float] = []
        self._head = 0
        self._kind: Literal["energy", "power"] | None = None
        self._raw_j = 0.0  # last raw counter reading (energy kind)
        # Joules of a same-time, higher counter reading: booked into the next interval, because
        # a sample already handed out (attribution may have finalized it) must never change.
        self._deferred_j = 0.0
        self._power_w = 0.0  # last power reading (power kind), used for extrapolation
        # After a modelled bridge: the next counter reading only re-bases the counter, because
        # its gain since the last real reading overlaps joules the bridge already booked.
        self._rebase = False

    # -- feeding -------------------------------------------------------------------------------

    def add_energy_sample(self, t_s: float, energy_j: float) -> None:
        """Add a cumulative energy-counter reading `energy_j` (joules) taken at `t_s` (seconds).

        A reading lower than the previous one means the counter restarted (driver or backend
        restart, or a wrap): the new value is taken as the joules since the restart, so the
        cumulative curve carries on and never goes backwards. This is a last resort for a single
        counter: sources check each GPU's counter before summing (sources/counters.py), so the
        sums they emit never go down. Readings before the last sample
        time are ignored, and so are same-time ones (within 1 ns) unless higher: a higher one's
        extra joules are booked into the next interval.
        """
        if not (math.isfinite(t_s) and math.isfinite(energy_j)) or energy_j < 0:
            return
        if self._kind is None:
            self._kind = "energy"
        elif self._kind != "energy":
            return
        if not self._t_s:
            self._raw_j = energy_j
            self._append(t_s, 0.0)
            return
        last_s = self._t_s[-1]
        if t_s < last_s:
            return
        if t_s - last_s < _MIN_STEP_S:
            if energy_j > self._raw_j and not self._rebase:
                self._deferred_j += energy_j - self._raw_j
                self._raw_j = energy_j
            return
        if self._rebase:
            # The step from the bridge's end to this reading runs at the bridge's power.
            self._rebase = False
            self._raw_j, self._deferred_j = energy_j, 0.0
            self._append(t_s, self._e_j[-1] + self._power_w * (t_s - last_s))
            return
        delta_j = energy_j - self._raw_j if energy_j >= self._raw_j else energy_j
        self._raw_j = energy_j
        self._append(t_s, self._e_j[-1] + delta_j + self._deferred_j)
        self._deferred_j = 0.0

    def add_power_sample(self, t_s: float, power_w: float) -> None:
        """Add an instantaneous power reading `power_w` (watts) taken at `t_s` (seconds).

        Consecutive readings are integrated with the trapezoid rule. Readings before the last
        sample time are ignored; a same-time one (within 1 ns) that is higher replaces the last
        power (it shapes the next interval and the extrapolation, never a past one).
        """
        if not (math.isfinite(t_s) and math.isfinite(power_w)):
            return
        power_w = max(power_w, 0.0)
        if self._kind is None:
            self._kind = "power"
        elif self._kind != "power":
            return
        if not self._t_s:
            self._power_w = power_w
            self._append(t_s, 0.0)
            return
        last_s = self._t_s[-1]
        if t_s < last_s:
            return
        if t_s - last_s < _MIN_STEP_S:
            self._power_w = max(self._power_w, power_w)
            return
        self._append(t_s, self._e_j[-1] + 0.5 * (self._power_w + power_w) * (t_s - last_s))
        self._power_w = power_w
        self._rebase = False

    def add_modelled_power(self, t_s: float, power_w: float) -> None:
        """Bridge a stretch with no readings: constant `power_w` (watts, a model's guess) from the
        newest sample to `t_s` (seconds). Either kind of timeline takes it, and readings carry
        on from it: the next counter reading re-bases instead of adding its gap's joules twice.
        """
        if not (math.isfinite(t_s) and math.isfinite(power_w)):
            return
        power_w = max(power_w, 0.0)
        if self._t_s:
            last_s = self._t_s[-1]
            if t_s - last_s < _MIN_STEP_S:
                return
            self._append(t_s, self._e_j[-1] + power_w * (t_s - last_s))
        else:
            self._append(t_s, 0.0)
        self._power_w = power_w
        self._rebase = True

    def _append(self, t_s: float, e_j: float) -> None:
        self._t_s.append(t_s)
        self._e_j.append(e_j)
        # Keep one sample at or before the cutoff so times just inside the window interpolate.
        cutoff_s = t_s - self.max_age_s
        t = self._t_s
        head = self._head
        while head + 1 < len(t) and t[head + 1] <= cutoff_s:
            head += 1
        if head >= _COMPACT_AT and head * 2 >= len(t):
            del self._t_s[:head]
            del self._e_j[:head]
            head = 0
        self._head = head

    # -- reading -------------------------------------------------------------------------------

    def __len__(self) -> int:
        """How many samples are kept."""
        return len(self._t_s) - self._head

    @property
    def kind(self) -> Literal["energy", "power"] | None:
        """Which kind of reading this timeline takes (fixed by its first sample)."""
        return self._kind

    @property
    def first_sample_s(self) -> float | None:
        """Time (s) of the oldest kept sample, or None before the first one."""
        return self._t_s[self._head] if self._t_s else None

    @property
    def last_sample_s(self) -> float | None:
        """Time (s) of the newest sample, or None before the first one."""
        return self._t_s[-1] if self._t_s else None

    def covered(self, t_s: float) -> bool:
        """Whether samples reach `t_s` (at or before the newest sample): no extrapolation."""
        return bool(self._t_s) and t_s <= self._t_s[-1]

    def sample_after(self, t_s: float) -> tuple[float, float] | None:
        """The first kept sample strictly after `t_s`: (time s, cumulative joules), or None."""
        i = bisect_right(self._t_s, t_s, self._head)
        if i == len(self._t_s):
            return None
        return self._t_s[i], self._e_j[i]

    def _tail_power_w(self) -> float:
        """Power (W) used past the newest sample: last reading, or the last interval's mean."""
        if self._kind == "power":
            return self._power_w
        t, e, n = self._t_s, self._e_j, len(self._t_s)
        if n - self._head < 2:
            return 0.0
        return (e[-1] - e[-2]) / (t[-1] - t[-2])

    def _head_power_w(self) -> float:
        """Power (W) used before the oldest kept sample: the first kept interval's mean."""
        t, e, h = self._t_s, self._e_j, self._head
        if len(t) - h < 2:
            return self._tail_power_w()
        return (e[h + 1] - e[h]) / (t[h + 1] - t[h])

    def power_w_at(self, t_s: float) -> float:
        """Power (W) at `t_s`: constant inside a sample interval, extrapolated outside."""
        t, e, h = self._t_s, self._e_j, self._head
        if not t:
            return 0.0
        if t_s >= t[-1]:
            return self._tail_power_w()
        if t_s < t[h]:
            return self._head_power_w()
        i = bisect_right(t, t_s, h)
        return (e[i] - e[i - 1]) / (t[i] - t[i - 1])

    def energy_j(self, t_s: float) -> float:
        """Cumulative joules at `t_s` on this timeline's own scale (0 at its first sample).

        Linear between samples; past the newest sample, extrapolated with the last power; before
        the oldest kept one, extrapolated backwards with the first kept interval's power. Only
        differences are meaningful: use `joules_between`.
        """
        t, e, h = self._t_s, self._e_j, self._head
        if not t:
            return 0.0
        if t_s >= t[-1]:
            return e[-1] if t_s == t[-1] else e[-1] + self._tail_power_w() * (t_s - t[-1])
        if t_s <= t[h]:
            return e[h] - self._head_power_w() * (t[h] - t_s)
        i = bisect_right(t, t_s, h)
        t0, t1 = t[i - 1], t[i]
        return e[i - 1] + (e[i] - e[i - 1]) * ((t_s - t0) / (t1 - t0))

    def joules_between(self, a_s: float, b_s: float) -> float:
        """Joules consumed between `a_s` and `b_s` (seconds); negative if `b_s < a_s`."""
        return self.energy_j(b_s) - self.energy_j(a_s)
