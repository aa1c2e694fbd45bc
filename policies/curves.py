"""The load grid and the curve arithmetic under `policies.model`; pure, no state.

Load (requests) is binned on "knots": one per integer up to 16, then eight per octave up to
16384. Curves are tables of values at the knots, linear in between.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

__all__ = ["KNOTS", "RoutePlan", "knot_of", "segment_of", "crossing", "interp", "residuals",
           "ridge_line", "shrunk_cv"]

#: A segment whose rate gain per request is under this share of the average per-request
#: rate is saturated: the engine queues the work instead of batching it.
SATURATED = 0.05
_INF = math.inf

# -- the grid -------------------------------------------------------------------------

_LINEAR_TOP = 16  # knots 0..16 are the integers
_PER_OCTAVE = 8
KNOTS: tuple[float, ...] = tuple(float(i) for i in range(_LINEAR_TOP + 1)) + tuple(
    _LINEAR_TOP * 2.0 ** (j / _PER_OCTAVE) for j in range(1, _PER_OCTAVE * 10 + 1)
)  # up to 16 * 2**10 = 16384
# segment_of(n) for integer n, precomputed: the routing hot path does one list index.
_SEG_TABLE: list[int] = [max(0, bisect.bisect_right(KNOTS, n) - 1) for n in range(int(KNOTS[-1]))]
_LAST_SEG = len(KNOTS) - 2


def knot_of(load: float) -> int:
    """The knot an observation at `load` belongs to (nearest; in log space above 16)."""
    if load < _LINEAR_TOP + 0.5:
        return int(load + 0.5) if load > 0 else 0
    return min(_LINEAR_TOP + round(_PER_OCTAVE * math.log2(load / _LINEAR_TOP)), len(KNOTS) - 1)


def segment_of(n: int) -> int:
    """The knot segment [KNOTS[k], KNOTS[k+1]) that holds integer load `n`."""
    if n < len(_SEG_TABLE):
        return _SEG_TABLE[n] if n >= 0 else 0
    return len(KNOTS) - 2



@dataclass(frozen=True, slots=True)
class RoutePlan:
    """What the routing hot path needs from one model for one pair of latency limits.

    `cap`: most requests in flight (the new one included) whose predicted TPOT meets its
    limit, and no further than `explore_limit`; `wait_cap`: the same for requests awaiting
    their first token against TTFT. `slo_cap`: the TPOT cap without the exploration limit.
    `power_w` / `tokens_per_s`: the model's curves at the knots (`KNOTS`).
    """

    cap: float
    wait_cap: float
    slo_cap: float
    power_w: list[float]
    tokens_per_s: list[float]

    def cost(self, n: int, delta: float) -> float:
        """J per output token of this backend taking `delta` more requests from `n` in flight
        (no further than its SLO cap, at least one): (P(m) - P(n)) / (R(m) - R(n)) between
        the knots at or below n and m. Where the rate no longer rises (a saturated engine
        queues the work) the average P / R at m: the work is done later at that cost."""
        table = _SEG_TABLE
        top = len(table)
        i = table[n] if n < top else _LAST_SEG
        m = n + delta
        if m > self.slo_cap:
            m = self.slo_cap
        j = table[int(m)] if m < top else _LAST_SEG
        last = len(self.power_w) - 1
        if j <= i:
            j = i + 1
        if j > last:
            j = last
            if i >= j:
                i = j - 1
        r_i, r_j = self.tokens_per_s[i], self.tokens_per_s[j]
        d_r = r_j - r_i
        x_j = KNOTS[j]
        if d_r > SATURATED * (r_j / x_j) * (x_j - KNOTS[i]):
            return (self.power_w[j] - self.power_w[i]) / d_r
        return self.power_w[j] / r_j if r_j > 0 else _INF



def ridge_line(s0: float, s1: float, s2: float, t0: float, t1: float, mu: float, rho: float,
                beta0: float) -> tuple[float, float]:
    """Weighted least squares y = alpha + beta * x with the penalty
    mu * (beta - rho * alpha - beta0)^2, from the sums s0 = sum(w), s1 = sum(w x),
    s2 = sum(w x^2), t0 = sum(w y), t1 = sum(w x y)."""
    a11, a12 = s0 + mu * rho * rho, s1 - mu * rho
    a22 = s2 + mu
    b1, b2 = t0 - mu * rho * beta0, t1 + mu * beta0
    det = a11 * a22 - a12 * a12
    if abs(det) < 1e-12:
        return (t0 / s0 if s0 else 0.0), beta0
    return (b1 * a22 - a12 * b2) / det, (a11 * b2 - a12 * b1) / det


def shrunk_cv(mean: float, mean_sq: float, weight: float, prior_weight: float,
              prior_cv: float) -> float:
    """Coefficient of variation from running means of x and x^2, shrunk toward `prior_cv`
    by `weight / (weight + prior_weight)`."""
    if mean <= 0:
        return prior_cv
    cv = math.sqrt(max(mean_sq - mean * mean, 0.0)) / mean
    f = weight / (weight + prior_weight)
    return f * cv + (1.0 - f) * prior_cv


def residuals(points: list[tuple[int, float]], size: int, default: float = 0.0) -> list[float]:
    """Values at every knot below `size` from the observed knots': linear in between, held
    beyond; `default` everywhere if none was observed."""
    out = [default] * size
    if not points:
        return out
    i0, r0 = points[0]
    for i in range(min(i0 + 1, size)):
        out[i] = r0
    for (ia, ra), (ib, rb) in zip(points, points[1:], strict=False):
        for i in range(ia, ib + 1):
            out[i] = ra + (rb - ra) * (i - ia) / (ib - ia)
    i_last, r_last = points[-1]
    for i in range(i_last, size):
        out[i] = r_last
    return out


def interp(table: list[float], x: float) -> float:
    """Linear interpolation of a per-knot table at load `x` (held past its end)."""
    if x <= 0:
        return table[0]
    i = bisect.bisect_right(KNOTS, x) - 1
    if i >= len(table) - 1:
        return table[-1]
    x0, x1 = KNOTS[i], KNOTS[i + 1]
    return table[i] + (table[i + 1] - table[i]) * (x - x0) / (x1 - x0)


def crossing(table: list[float], limit: float) -> float:
    """The load where a non-decreasing per-knot table first exceeds `limit` (interpolated);
    0 if it starts above; the table's end if it never does."""
    if table[1] > limit:
        return 0.0
    for i in range(2, len(table)):
        if table[i] > limit:
            lo, hi = table[i - 1], table[i]
            return KNOTS[i - 1] + (KNOTS[i] - KNOTS[i - 1]) * (limit - lo) / (hi - lo)
    return KNOTS[len(table) - 1]
