"""Per-GPU energy counters -> one continuous summed cumulative, with implausible steps dropped.

Every source reads several GPUs and emits their sum. Summing first and checking after is wrong:
one GPU's counter restarting (a driver reload) turns the sum of two day-old counters into a
drop of ~half, which a reset check on the sum books as the whole remaining counter again. So
`GpuCounters` keeps each GPU's last value and checks each GPU's step on its own:
  - a decrease is a reset of that GPU only (or a wrap, when a modulus is known and the wrapped
    step is plausible): it counts on from its new value, and its step gets the joules since the
    restart (the new value) or, when more, its last power over the step (then `gap_before`:
    the time before the restart was never counted);
  - a step implying more than `LIMIT_FACTOR` x the GPU's power limit (`DEFAULT_MAX_W` per GPU
    when the limit is unknown) is a glitch: the whole reading is discarded, never a sum with a
    hole, and the next good reading's step spans the gap (the timeline spreads it evenly, i.e.
    interpolates between the good neighbours); that step is flagged `gap_before`;
  - a GPU whose counter stays implausibly far ahead for `MAX_DISCARDS` readings in a row has
    really jumped: it is re-based at its new value and the gap gets its last known power.
Power-only readings (no counters) are checked the same way against the limit.

Pure: no I/O, no clock reads. Units: energy mJ in, J out; power W; times s.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["DEFAULT_MAX_W", "GpuCounters", "GpuRead", "Step", "sum_or_none"]

#: A step may imply at most this multiple of the GPU's enforced power limit.
LIMIT_FACTOR = 1.5
#: Ceiling per GPU (W) when the power limit is unknown.
DEFAULT_MAX_W = 2000.0
#: Readings in a row one GPU may be discarded for before its counter is re-based.
MAX_DISCARDS = 3


@dataclass(frozen=True, slots=True)
class GpuRead:
    """One GPU at one moment: key (UUID or index, stable per GPU), counter mJ, power W, limit W."""

    key: str
    energy_mj: float | None
    power_w: float | None = None
    limit_w: float | None = None


@dataclass(frozen=True, slots=True)
class Step:
    """What to emit for one reading.

    energy_j: the continuous summed cumulative (J), None for power-only readings or a discard.
    power_w: summed power (W), None when unknown. discarded: drop this reading (see `reason`).
    gap_before: the energy since the previous emitted reading is partly interpolated or modelled.
    resets: GPUs whose counter restarted (or was re-based) in this step.
    """

    energy_j: float | None
    power_w: float | None
    discarded: bool = False
    gap_before: bool = False
    resets: int = 0
    reason: str | None = None


def max_power_w(limit_w: float | None) -> float:
    """The highest power (W) a reading of this GPU may imply."""
    if limit_w is None or not limit_w > 0:
        return DEFAULT_MAX_W
    return LIMIT_FACTOR * limit_w


class GpuCounters:
    """Per-GPU counter state of one source; `step()` each reading in time order.

    wrap_mj: the counters' modulus where one is known (they then wrap to 0 past it), else None.
    slack_s: added to each step's duration before the power check, because a counter read just
        after it updated and one read just before can be a whole update period apart in energy.
    """

    def __init__(self, wrap_mj: float | None = None, slack_s: float = 0.25) -> None:
        self.wrap_mj = wrap_mj
        self.slack_s = slack_s
        self.resets = 0  # counter restarts (and re-bases) seen, all GPUs
        self.discarded = 0  # readings dropped as implausible
        self._last_mj: dict[str, float] = {}
        self._last_w: dict[str, float] = {}  # per GPU power over its last accepted step
        self._bad_runs: dict[str, int] = {}
        self._t_s: float | None = None
        self._total_j = 0.0
        self._gap = False  # a reading was discarded since the last emitted one

    def step(self, t_s: float, reads: Sequence[GpuRead]) -> Step:
        """Check one reading of all the source's GPUs taken at `t_s` (s)."""
        power_w = sum_or_none(r.power_w for r in reads)
        if reads and all(r.energy_mj is not None for r in reads):
            return self._counter_step(t_s, reads, power_w)
        return self._power_step(reads, power_w)

    def _power_step(self, reads: Sequence[GpuRead], power_w: float | None) -> Step:
        bad = [r for r in reads if r.power_w is not None and r.power_w > max_power_w(r.limit_w)]
        if bad:
            self.discarded += 1
            self._gap = True
            r = bad[0]
            return Step(None, None, discarded=True, reason=(
                f"GPU {r.key} reads {r.power_w:.0f} W, over {max_power_w(r.limit_w):.0f} W"))
        gap, self._gap = self._gap, False
        return Step(None, power_w, gap_before=gap)

    def _counter_step(self, t_s: float, reads: Sequence[GpuRead], power_w: float | None) -> Step:
        if self._t_s is None or t_s <= self._t_s:
            if self._t_s is None:
                self._total_j = sum(r.energy_mj or 0.0 for r in reads) / 1000.0
                self._t_s = t_s
                self._last_mj = {r.key: float(r.energy_mj or 0.0) for r in reads}
                return Step(self._total_j, power_w)
            return Step(None, None)  # not after the previous reading: nothing to emit
        dt_s = t_s - self._t_s
        deltas: dict[str, float] = {}
        bad: list[tuple[GpuRead, float]] = []
        resets = 0
        gap = self._gap
        for r in reads:
            value_mj = float(r.energy_mj or 0.0)
            prev_mj = self._last_mj.get(r.key)
            if prev_mj is None:  # a GPU new to the selection: it starts counting now
                deltas[r.key] = 0.0
                continue
            max_j = max_power_w(r.limit_w) * (dt_s + self.slack_s)
            if value_mj >= prev_mj:
                delta_j = (value_mj - prev_mj) / 1000.0
                if delta_j > max_j:
                    bad.append((r, delta_j))
                    continue
            elif self.wrap_mj is not None and (value_mj + self.wrap_mj - prev_mj) / 1000.0 <= max_j:
                delta_j = (value_mj + self.wrap_mj - prev_mj) / 1000.0
            else:
                # Restarted: the new value is the joules since the restart; the part of the
                # step before the restart was never counted, so where the GPU's last power
                # says more, that (modelled) figure stands for the step. A "restart" to a value
                # no restart could have reached by now is a bad read: the last power again.
                resets += 1
                delta_j = value_mj / 1000.0
                modelled_j = self._last_w.get(r.key, 0.0) * dt_s
                if delta_j > max_j or modelled_j > delta_j:
                    delta_j = modelled_j
                    gap = True
            deltas[r.key] = delta_j
        if bad:
            for r, _ in bad:
                self._bad_runs[r.key] = self._bad_runs.get(r.key, 0) + 1
            if any(self._bad_runs[r.key] < MAX_DISCARDS for r, _ in bad):
                self.discarded += 1
                self._gap = True
                r, delta_j = bad[0]
                return Step(None, None, discarded=True, reason=(
                    f"GPU {r.key}'s counter rose {delta_j:.0f} J in {dt_s:.3f} s, over "
                    f"{max_power_w(r.limit_w):.0f} W"))
            for r, _ in bad:  # still far ahead after MAX_DISCARDS readings: it jumped; re-base
                deltas[r.key] = self._last_w.get(r.key, 0.0) * dt_s
                resets += 1
                gap = True
        for r in reads:
            self._bad_runs.pop(r.key, None)
            delta_j = deltas.get(r.key, 0.0)
            if r.key in self._last_mj:
                self._last_w[r.key] = delta_j / dt_s
            self._last_mj[r.key] = float(r.energy_mj or 0.0)
        for key in [k for k in self._last_mj if k not in deltas]:  # GPUs no longer read
            del self._last_mj[key]
            self._last_w.pop(key, None)
        self._total_j += sum(deltas.values())
        self._t_s = t_s
        self._gap = False
        self.resets += resets
        return Step(self._total_j, power_w, gap_before=gap, resets=resets)


def sum_or_none(values: Iterable[float | None]) -> float | None:
    """The sum when every value is known, else None (never a sum with a hole)."""
    total = 0.0
    for value in values:
        if value is None:
            return None
        total += value
    return total
