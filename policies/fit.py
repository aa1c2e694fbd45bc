"""The shapes a GPU under continuous batching has, fitted to an efficiency model's knots.

Pure: no I/O, no clock reads. Power P(n) = P1 + A * log2(n) for n >= 1 (W); decode step
a + c * n (s), so the token rate n / (a + c * n) saturates; TTFT(q) = t0 + k * q (s). Each fit
is a weighted least-squares line, ridged toward the priors below where the data say little.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from policies.curves import ridge_line

#: Priors (docs/routing.md says why).
PRIOR_IDLE_W = 100.0  # until one idle interval has been seen
PRIOR_ACTIVE_RATIO = 2.5  # P(1) / idle: a GPU that starts decoding draws ~2-3x idle
PRIOR_W_PER_DOUBLING = 0.08  # A / P(1): power rises ~8% of P(1) per doubling of the batch
PRIOR_STEP_S = 0.020  # decode step at batch 1 of a 100 W-idle GPU before any token was seen
PRIOR_SLOPE_RATIO = 0.013  # c / a: per-request share of the step (H100, A100, L4 alike)
_SLOPE_SCALE = 100.0  # the slope prior is weighed as if it were a step-time error at batch 100
_MIN_LOG2_SPREAD = 0.5  # below this variance of log2(n) the power slope comes from the prior
PRIOR_CV = 0.3  # spread of TTFT and TPOT around their mean before it has been measured


@dataclass(slots=True)
class Knot:
    """Running means at one knot of the load grid (weights count observations up to the
    model's window)."""

    weight: float = 0.0  # power-sample intervals, keyed by mean decoding count
    x: float = 0.0
    power_w: float = 0.0
    tokens_per_s: float = 0.0
    ttft_weight: float = 0.0  # requests, keyed by awaiting-first-token count at send
    ttft_x: float = 0.0
    ttft_s: float = 0.0
    ttft_sq: float = 0.0  # running mean of TTFT^2, s^2
    tpot_weight: float = 0.0  # requests, keyed by in-flight count at send
    tpot_x: float = 0.0
    tpot_s: float = 0.0
    tpot_sq: float = 0.0


def fit_shapes(knots: Sequence[Knot | None], p0: float, prior_weight: float
               ) -> tuple[float, float, float, float, float, float]:
    """Fit the parametric shapes to the knots (`p0`: idle W; `prior_weight`: observations a
    prior counts as): (P1 W, A W per doubling, a s, c s, t0 s, k s) (priors if no data)."""
    pw = pu = py = puu = puy = 0.0  # power vs log2(decoding)
    s0 = s1 = s2 = st0 = st1 = 0.0  # step time (decoding / rate) vs decoding
    q0 = q1 = q2 = qt0 = qt1 = 0.0  # TTFT vs awaiting-first-token
    for k in knots[1:]:
        if k is None:
            continue
        if k.weight > 0 and k.x >= 1.0:
            w, u = k.weight, math.log2(k.x)
            pw += w
            pu += w * u
            py += w * k.power_w
            puu += w * u * u
            puy += w * u * k.power_w
            if k.tokens_per_s > 0:
                step_s = k.x / k.tokens_per_s
                s0 += w
                s1 += w * k.x
                s2 += w * k.x * k.x
                st0 += w * step_s
                st1 += w * k.x * step_s
        if k.ttft_weight > 0:
            w, x = k.ttft_weight, k.ttft_x
            q0 += w
            q1 += w * x
            q2 += w * x * x
            qt0 += w * k.ttft_s
            qt1 += w * x * k.ttft_s
    if pw > 0:
        ubar, ybar = pu / pw, py / pw
        var = puu / pw - ubar * ubar
        if var >= _MIN_LOG2_SPREAD:
            a_w = (puy / pw - ubar * ybar) / var
            p1 = ybar - a_w * ubar
        else:
            p1 = ybar / (1.0 + PRIOR_W_PER_DOUBLING * ubar)
            a_w = PRIOR_W_PER_DOUBLING * p1
        a_w, p1 = max(a_w, 0.0), max(p1, p0)
    else:
        p1 = PRIOR_ACTIVE_RATIO * p0
        a_w = PRIOR_W_PER_DOUBLING * p1
    if s0 > 0:
        # Ridge toward c = rho * a: a few batches near each other say little about c.
        mu = prior_weight * _SLOPE_SCALE ** 2
        a_s, c_s = ridge_line(s0, s1, s2, st0, st1, mu, PRIOR_SLOPE_RATIO, 0.0)
        a_s = max(a_s, 1e-4)
        c_s = max(c_s, 0.0)
    else:
        # A bigger board (more idle watts) is presumed proportionally faster: before any
        # token, GPUs are presumed equally efficient per watt.
        a_s = PRIOR_STEP_S * PRIOR_IDLE_W / max(p0, 1.0)
        c_s = PRIOR_SLOPE_RATIO * a_s
    if q0 > 0:
        # Ridge toward k = 2 steps per request ahead, weighed as at 4 requests ahead.
        t0, k_q = ridge_line(q0, q1, q2, qt0, qt1, prior_weight * 16.0, 0.0, 2.0 * a_s)
        k_q = max(k_q, 0.0)
    else:
        t0, k_q = 2.0 * a_s, 2.0 * a_s
    return p1, a_w, a_s, c_s, t0, k_q
