"""What a GPU power cap does to an inference step's time and power: the governor's prior.

Pure functions, no state. The governor predicts with it (proxy/governor/decide.py), and the
simulator applies it to its steps (proxy/sim/capping.py), so the simulator cannot show the
governor a cap behaving otherwise than predicted: bench/governor's savings are an upper bound. The shape follows what published measurements agree on; the exact
numbers below are this module's own choices (derived, not measured), picked to match that shape:

- Under a cap the GPU lowers its clocks until the board draws no more than the cap (NVIDIA's
  power-capping loop; Zeus, NSDI 2023, and Perseus, SOSP 2024, treat the power limit as a clock
  knob with this effect). Dynamic power (board power above idle) scales with roughly the square
  of the clock ratio r once voltage scaling has run out (`DYNAMIC_POWER_EXPONENT` = 2, derived:
  between the linear f and the cubic f*V^2 of textbook DVFS). Idle power is not capped away.
- Prefill is compute-bound: its time stretches by the whole clock ratio, 1/r
  (`PREFILL_CLOCK_SENSITIVITY` = 1.0). Decode is memory-bound: only part of a decode step waits on
  the SMs, so it loses much less speed (DynamoLLM, HPCA 2025: decode TBT barely moves at lower
  frequency while prefill TTFT does; throttLL'eM, HPCA 2025: throughput falls far less than
  power as the clock drops, which is where its >= 1.71x tokens/J comes from). Here 35% of a
  decode step scales with 1/r (`DECODE_CLOCK_SENSITIVITY` = 0.35, derived).
- A cap above what the step draws changes nothing. A cap is never below `min_limit_w` (H100 SXM
  allows 200-700 W, 29% of its board limit: `MIN_LIMIT_FRACTION`, from the driver's constraints).

Units: seconds, watts.
"""

from __future__ import annotations

import math

DYNAMIC_POWER_EXPONENT = 2.0
PREFILL_CLOCK_SENSITIVITY = 1.0
DECODE_CLOCK_SENSITIVITY = 0.35
MIN_LIMIT_FRACTION = 200.0 / 700.0
#: Clock ratios below this are not reachable (the GPU's lowest clock); the cap then binds no further.
MIN_CLOCK_RATIO = 0.2


def min_limit_w(board_limit_w: float) -> float:
    """The lowest power limit the (simulated) driver accepts, W."""
    return round(board_limit_w * MIN_LIMIT_FRACTION, 1)


def clock_ratio(power_w: float, cap_w: float | None, idle_w: float) -> float:
    """The clock ratio (0..1] at which a step drawing `power_w` uncapped fits under `cap_w`."""
    if cap_w is None or cap_w >= power_w or power_w <= idle_w:
        return 1.0
    headroom = max(cap_w - idle_w, 0.0) / (power_w - idle_w)
    return max(MIN_CLOCK_RATIO, float(headroom ** (1.0 / DYNAMIC_POWER_EXPONENT)))


def stretch(ratio: float, sensitivity: float) -> float:
    """Time factor (>= 1) of work whose `sensitivity` share scales with 1/clock, at `ratio`."""
    return (1.0 - sensitivity) + sensitivity / ratio


def capped(seconds: float, power_w: float, cap_w: float | None, idle_w: float,
           sensitivity: float) -> tuple[float, float]:
    """(seconds, W) of work that takes `seconds` at `power_w` uncapped, under `cap_w`."""
    ratio = clock_ratio(power_w, cap_w, idle_w)
    if ratio >= 1.0:
        return seconds, power_w
    new_power_w = idle_w + (power_w - idle_w) * ratio ** DYNAMIC_POWER_EXPONENT
    return seconds * stretch(ratio, sensitivity), new_power_w


def capped_step(prefill_s: float, prefill_w: float, decode_s: float, decode_w: float,
                cap_w: float | None, idle_w: float) -> tuple[float, float, float, float]:
    """(prefill_s, prefill_w, decode_s, decode_w) of one engine step under `cap_w` (None: no cap)."""
    if cap_w is None or not math.isfinite(cap_w):
        return prefill_s, prefill_w, decode_s, decode_w
    prefill_s, prefill_w = capped(prefill_s, prefill_w, cap_w, idle_w, PREFILL_CLOCK_SENSITIVITY)
    decode_s, decode_w = capped(decode_s, decode_w, cap_w, idle_w, DECODE_CLOCK_SENSITIVITY)
    return prefill_s, prefill_w, decode_s, decode_w
