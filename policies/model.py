"""The learned efficiency model of one backend: power, token rate and latency vs load.

Pure: no I/O, no clock reads; every call carries its time (seconds, one clock).

It learns from what a proxy measures and nothing else (no GPU profile). The proxy reports its
requests' events (`sent`, `first_token`, `tokens`, `finished`) and each power sample
(`power_sample`); the model keeps the backend's live load from them (requests in flight,
awaiting their first token, decoding) and turns them into observations:

- per power-sample interval: board power (W) and output tokens/s against the time-averaged
  number of requests decoding. Keyed by the decoding count because that sets the batch; keyed
  by requests in flight, a burst waiting for its prefill would look like a big batch emitting
  few tokens;
- per request: TTFT against the requests awaiting their first token when it was sent (itself
  included): the prefill work queued ahead of it is what its TTFT waits for; and TPOT against
  the requests in flight when it was sent (the batch it decodes in).

Curves. Observations land in bins ("knots") on the load axis: one per integer up to 16, then
eight per octave. Each knot keeps a running mean that becomes an exponential moving average
after `window` observations, so the model follows a backend that drifts. A rebuild fits the
shapes a GPU under continuous batching has to all knots:

- power P(0) = idle; P(n) = P1 + A * log2(n) for n >= 1; linear on [0, 1] (a busy fraction).
  Concave, as measured (shared/reference/gpu-energy.md);
- rate R(n) = n / (a + c * n): the decode step grows linearly with the batch, so the rate
  saturates; c is held near 0.013 a (`PRIOR_SLOPE_RATIO` in fit.py) unless data over a wide range of
  batches says otherwise (ridge regression). Once the batch has stopped growing at a level
  where requests queued behind it (the engine's max batch), power and rate stay flat above;
- TPOT(n) = a + c * n, the step time, times a learned stall factor (prefills of newcomers
  stall the batch); TTFT(q) = t0 + k * q, a line fitted to the TTFT knots.

Each knot's value is that fit plus the knot's own residual shrunk by count / (count +
`prior_weight`), residuals interpolated between observed knots and held beyond them. Before
any data the fits start from generic constants (fit.py's `PRIOR_*`, scaled by the idle power, which
is learned in the first idle second): unseen load levels follow the prior, often seen ones
the data.
"""

from __future__ import annotations

import bisect
import math
from collections import deque

from policies.curves import (
    KNOTS,
    SATURATED,
    RoutePlan,
    crossing,
    interp,
    knot_of,
    residuals,
    shrunk_cv,
)
from policies.fit import PRIOR_ACTIVE_RATIO, PRIOR_CV, PRIOR_IDLE_W, Knot, fit_shapes
from policies.load import LoadTracker

__all__ = ["EfficiencyModel", "LoadTracker", "RoutePlan", "Ticket"]

_MIN_REACH = 512.0  # tables reach at least this load (further as observations go further)
_INF = math.inf

#: What `sent` returns and `first_token` / `finished` take back: (requests in flight,
#: requests awaiting their first token, both counting this request, and the send time in s).
Ticket = tuple[int, int, float]


class EfficiencyModel:
    """One backend's live load and learned curves.

    Rebuilding the curves costs ~100-200 us, so it happens at most once per `refresh_s` of
    observation time (and on `refresh()`); `version` changes with each rebuild.
    """

    __slots__ = (
        "window", "latency_window", "prior_weight", "refresh_s", "version", "tracker",
        "waiting", "_knots", "_idle_w", "_idle_weight", "_built_s", "_top", "_top_x",
        "_top_q", "_sat_x", "_last_power_s", "_unstarted", "_started", "_power", "_rate", "_ttft", "_tpot", "_ttft_hi", "_tpot_hi",
        "_plans", "spread_z", "slo_limits_s", "slo_ratios",
    )

    def __init__(self, *, window: int = 200, latency_window: int = 64, prior_weight: float = 10.0,
                 refresh_s: float = 0.5, spread_z: float = 2.0) -> None:
        self.spread_z = spread_z
        self.window = float(window)
        self.latency_window = float(latency_window)
        self.prior_weight = prior_weight
        self.refresh_s = refresh_s
        self.version = 0
        self.tracker = LoadTracker()
        self.waiting = 0  # requests sent that have not had their first token
        self._knots: list[Knot | None] = [None] * len(KNOTS)
        self._idle_w = PRIOR_IDLE_W
        self._idle_weight = 0.0
        self._built_s = -_INF
        self._top = 0  # highest knot with any observation
        self._top_x = 0.0  # highest mean decoding count observed
        self._top_q = 0.0  # highest awaiting-first-token count with a TTFT
        self._sat_x = 0.0  # highest decoding count seen with a queue behind it
        self._last_power_s: float | None = None
        # The SLO tally (the governor's attainment target reads and clears it): with (TTFT s,
        # TPOT s) limits set, each streamed request that finishes adds its latency over the
        # SLO, the larger of TTFT / limit and TPOT / limit (<= 1: met; inf: no first token).
        self.slo_limits_s: tuple[float, float] | None = None
        self.slo_ratios: list[float] = []
        # Send times of requests awaiting their first token, in send order; those that got
        # it since are counted in `_started` and dropped lazily from the front.
        self._unstarted: deque[float] = deque()
        self._started: dict[float, int] = {}
        self._plans: dict[tuple[float, float], RoutePlan] = {}
        self._rebuild()

    # -- the proxy's events -------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests sent and not finished (this caller's)."""
        return self.tracker.in_flight

    def sent(self, t_s: float, stream: bool = True) -> Ticket:
        """A request was sent to the backend at `t_s`; keep the ticket for its later events.

        A non-streamed request shows no first token: it counts as decoding from the start
        and teaches no TTFT (its ticket's waiting count is 0)."""
        if not stream:
            self.tracker.change(t_s, in_flight=+1, decoding=+1)
            return (self.tracker.in_flight, 0, t_s)
        self.tracker.change(t_s, in_flight=+1)
        self.waiting += 1
        self._unstarted.append(t_s)
        return (self.tracker.in_flight, self.waiting, t_s)

    def first_token(self, t_s: float, ticket: Ticket) -> None:
        """The request's first token arrived at `t_s` (learns its TTFT)."""
        self._start(ticket[2])
        self.tracker.change(t_s, decoding=+1)
        self.observe_request(ticket[0], t_s, ttft_s=t_s - ticket[2], waiting=ticket[1])

    def oldest_wait_s(self, now_s: float) -> float:
        """How long the oldest request still awaiting its first token has waited, in s (0 if
        none). A saturated engine shows here at once, long before any TTFT is measured."""
        unstarted, started = self._unstarted, self._started
        while unstarted:
            t_s = unstarted[0]
            left = started.get(t_s)
            if not left:
                return now_s - t_s
            unstarted.popleft()
            if left == 1:
                del started[t_s]
            else:
                started[t_s] = left - 1
        return 0.0

    def _start(self, sent_s: float) -> None:
        self.waiting -= 1
        self._started[sent_s] = self._started.get(sent_s, 0) + 1

    def tokens(self, count: int) -> None:
        """`count` output tokens arrived (any request of this backend)."""
        self.tracker.tokens(count)

    def finished(self, t_s: float, ticket: Ticket, first_token_s: float | None,
                 output_tokens: int) -> None:
        """The request ended at `t_s` (completed, failed or aborted); learns its TPOT.
        `first_token_s`: None if it never had a first token."""
        if ticket[1] == 0:  # non-streamed: decoding since it was sent
            self.tracker.change(t_s, in_flight=-1, decoding=-1)
            return
        limits = self.slo_limits_s
        if first_token_s is None:
            self._start(ticket[2])
            self.tracker.change(t_s, in_flight=-1)
            if limits is not None:
                self.slo_ratios.append(_INF)
            return
        self.tracker.change(t_s, in_flight=-1, decoding=-1)
        tpot_s = (t_s - first_token_s) / (output_tokens - 1) if output_tokens > 1 else 0.0
        if output_tokens > 1:
            self.observe_request(ticket[0], t_s, tpot_s=tpot_s)
        if limits is not None:
            self.slo_ratios.append(max((first_token_s - ticket[2]) / limits[0], tpot_s / limits[1]))

    def power_sample(self, t_s: float, power_w: float) -> None:
        """The backend's mean power over the interval since the previous sample, in W."""
        reading = self.tracker.close(t_s)
        if reading is not None and self._last_power_s is not None:
            in_flight, decoding, tokens_per_s = reading
            self.observe_interval(decoding, power_w, tokens_per_s, t_s, in_flight=in_flight)
        self._last_power_s = t_s

    def modelled_power_w(self, t_s: float) -> float:
        """The mean power (W) the model predicts since the last sample, for a stretch with no
        readings (the power source is down); ends the load interval at `t_s` and learns nothing,
        not even from the first real interval after it, which starts inside the stretch."""
        reading = self.tracker.close(t_s)
        self._last_power_s = None
        if reading is None or reading[0] <= 0:
            return self.idle_w
        in_flight, decoding, _ = reading
        # Requests in prefill draw power too: count the batch as at least one decoding.
        return self.power_w(max(decoding, min(in_flight, 1.0)))

    # -- observations ---------------------------------------------------------------------------

    def observe_interval(self, decoding: float, power_w: float, tokens_per_s: float,
                         t_s: float, in_flight: float | None = None) -> None:
        """One power-sample interval ending at `t_s`: board power in W, output tokens/s, the
        mean number of requests decoding and (if known) in flight. Nothing in flight: the
        idle power. Requests in flight but none decoding (all in prefill or queued) teach
        nothing here; their energy shows in the intervals around them."""
        if decoding < 0 or not power_w >= 0 or not tokens_per_s >= 0:
            return
        if (in_flight if in_flight is not None else decoding) <= 0:
            self._idle_weight = min(self._idle_weight + 1.0, self.window)
            self._idle_w += (power_w - self._idle_w) / self._idle_weight
        elif decoding > 0:
            k = self._knot(knot_of(decoding))
            k.weight = min(k.weight + 1.0, self.window)
            alpha = 1.0 / k.weight
            k.x += (decoding - k.x) * alpha
            k.power_w += (power_w - k.power_w) * alpha
            k.tokens_per_s += (tokens_per_s - k.tokens_per_s) * alpha
            self._top_x = max(self._top_x, decoding)
            if in_flight is not None and in_flight - decoding >= max(2.0, 0.25 * decoding):
                self._sat_x = max(self._sat_x, decoding)
        self._touch(t_s)

    def observe_request(self, in_flight: int, t_s: float, *, ttft_s: float | None = None,
                        tpot_s: float | None = None, waiting: int | None = None) -> None:
        """Latency of one request sent when `in_flight` requests (itself included) were in
        flight and `waiting` of them (itself included) awaited their first token: TTFT
        keyed by `waiting` (by `in_flight` if not given), TPOT keyed by `in_flight`."""
        if ttft_s is not None and ttft_s >= 0:
            q = max(waiting if waiting is not None else in_flight, 1)
            k = self._knot(knot_of(q))
            k.ttft_weight = min(k.ttft_weight + 1.0, self.latency_window)
            alpha = 1.0 / k.ttft_weight
            k.ttft_x += (q - k.ttft_x) * alpha
            k.ttft_s += (ttft_s - k.ttft_s) * alpha
            k.ttft_sq += (ttft_s * ttft_s - k.ttft_sq) * alpha
            self._top_q = max(self._top_q, q)
        if tpot_s is not None and tpot_s >= 0:
            n = max(in_flight, 1)
            k = self._knot(knot_of(n))
            k.tpot_weight = min(k.tpot_weight + 1.0, self.latency_window)
            alpha = 1.0 / k.tpot_weight
            k.tpot_x += (n - k.tpot_x) * alpha
            k.tpot_s += (tpot_s - k.tpot_s) * alpha
            k.tpot_sq += (tpot_s * tpot_s - k.tpot_sq) * alpha
        self._touch(t_s)

    def refresh(self) -> None:
        """Rebuild the curves from the observations now."""
        self._rebuild()

    # -- predictions ----------------------------------------------------------------------------

    @property
    def idle_w(self) -> float:
        """Idle power in W: learned, or the prior until an idle interval has been seen."""
        return self._power[0]

    def power_w(self, decoding: float) -> float:
        """Predicted board power in W with `decoding` requests in the batch."""
        return interp(self._power, decoding)

    def tokens_per_s(self, decoding: float) -> float:
        """Predicted output tokens/s of the backend with `decoding` requests in the batch."""
        return interp(self._rate, decoding)

    def ttft_s(self, waiting: float) -> float:
        """Predicted mean TTFT in s of a request sent with `waiting` requests (itself
        included) awaiting their first token."""
        return interp(self._ttft, max(waiting, 1.0))

    def tpot_s(self, in_flight: float) -> float:
        """Predicted mean TPOT in s of a request sent at `in_flight` (itself included)."""
        return interp(self._tpot, max(in_flight, 1.0))

    def ttft_upper_s(self, waiting: float) -> float:
        """Mean + `spread_z` standard deviations of the TTFT at `waiting` (what the guard
        holds against the SLO)."""
        return interp(self._ttft_hi, max(waiting, 1.0))

    def tpot_upper_s(self, in_flight: float) -> float:
        """Mean + `spread_z` standard deviations of the TPOT at `in_flight`."""
        return interp(self._tpot_hi, max(in_flight, 1.0))

    def marginal_j_per_token(self, n: float) -> float:
        """J per extra output token if the backend goes from `n` to `n + 1` requests."""
        return self.fill_j_per_token(n, n + 1.0)

    def fill_j_per_token(self, n: float, target: float) -> float:
        """J per extra output token of taking the backend from `n` requests to `target`
        (at least n + 1): (P(target) - P(n)) / (R(target) - R(n)).

        With target n + 1 this is the one-request marginal cost; the policy uses the same
        quantity over a wider step on the knot tables (`RoutePlan.cost`). Where the rate no
        longer rises (a saturated engine queues the work) the average P / R at the target
        is returned: that work is done later at that cost. Interpolated between knots, for
        inspection and tests.
        """
        m = max(target, n + 1.0)
        p_n, p_m = interp(self._power, n), interp(self._power, m)
        r_n, r_m = interp(self._rate, n), interp(self._rate, m)
        d_r = r_m - r_n
        if d_r > SATURATED * (r_m / m) * (m - n):
            return max(p_m - p_n, 0.0) / d_r
        return p_m / r_m if r_m > 0 else _INF

    def explore_limit(self) -> float:
        """Requests in flight the guard trusts: twice the largest batch observed, plus 8.

        Beyond observed loads the TPOT curve is an extrapolation of the step time; doubling
        at a time lets measurements catch a batch that slows down. (Queueing needs no such
        limit: a saturated engine's queue shows at once in the requests awaiting their first
        token, which the TTFT guard watches.)"""
        return 2.0 * self._top_x + 8.0

    def explore_wait_limit(self) -> float:
        """Requests awaiting their first token the guard trusts (2x observed, plus 4)."""
        return 2.0 * self._top_q + 4.0

    def plan(self, ttft_limit_s: float, tpot_limit_s: float) -> RoutePlan:
        """The routing plan for these limits; cached until the next rebuild (the hot path
        asks for it per backend per request)."""
        key = (ttft_limit_s, tpot_limit_s)
        plan = self._plans.get(key)
        if plan is None:
            slo_cap = crossing(self._tpot_hi, tpot_limit_s)
            wait_cap = min(crossing(self._ttft_hi, ttft_limit_s), self.explore_wait_limit())
            plan = RoutePlan(min(slo_cap, self.explore_limit()), wait_cap, slo_cap,
                             self._power, self._rate)
            self._plans[key] = plan
        return plan

    # -- internals ------------------------------------------------------------------------------

    def _knot(self, i: int) -> Knot:
        k = self._knots[i]
        if k is None:
            k = self._knots[i] = Knot()
            self._top = max(self._top, i)
        return k

    def _touch(self, t_s: float) -> None:
        if t_s - self._built_s >= self.refresh_s:
            self._built_s = t_s
            self._rebuild()

    def _rebuild(self) -> None:
        self.version += 1
        self._plans = {}
        knots = self._knots
        p0 = self._idle_w
        if self._idle_weight == 0:
            # Busy since it was first seen: the idle prior must not sit above what it draws
            # at its lightest load.
            lightest = [k.power_w for k in knots[1:] if k is not None and k.weight > 0]
            if lightest:
                p0 = min(p0, lightest[0] / PRIOR_ACTIVE_RATIO)
        p1, a_w, a_s, c_s, t0, k_q = fit_shapes(self._knots, p0, self.prior_weight)
        reach = max(KNOTS[self._top] * 2.0, self.explore_limit(), _MIN_REACH)
        size = min(bisect.bisect_right(KNOTS, reach) + 1, len(KNOTS))

        def fit_p(x: float) -> float:
            return p0 + x * (p1 - p0) if x < 1.0 else p1 + a_w * math.log2(x)

        def fit_r(x: float) -> float:
            return x / (a_s + c_s) if x < 1.0 else x / (a_s + c_s * x)

        def fit_step(x: float) -> float:
            return a_s + c_s * max(x, 1.0)

        w0, w_lat = self.prior_weight, self.prior_weight / 4
        res_p: list[tuple[int, float]] = []
        res_r: list[tuple[int, float]] = []
        res_ttft: list[tuple[int, float]] = []
        res_tpot: list[tuple[int, float]] = []  # multiplicative: the stall factor
        cv_ttft: list[tuple[int, float]] = []  # coefficients of variation, shrunk to the prior
        cv_tpot: list[tuple[int, float]] = []
        for i in range(1, size):
            k = knots[i]
            if k is None:
                continue
            if k.weight > 0:
                f = k.weight / (k.weight + w0)
                res_p.append((i, f * (k.power_w - fit_p(k.x))))
                res_r.append((i, f * (k.tokens_per_s - fit_r(k.x))))
            if k.ttft_weight > 0:
                f = k.ttft_weight / (k.ttft_weight + w_lat)
                res_ttft.append((i, f * (k.ttft_s - (t0 + k_q * k.ttft_x))))
                cv_ttft.append((i, shrunk_cv(k.ttft_s, k.ttft_sq, k.ttft_weight, w_lat, PRIOR_CV)))
            if k.tpot_weight > 0:
                f = k.tpot_weight / (k.tpot_weight + w_lat)
                res_tpot.append((i, f * (k.tpot_s / fit_step(k.tpot_x) - 1.0)))
                cv_tpot.append((i, shrunk_cv(k.tpot_s, k.tpot_sq, k.tpot_weight, w_lat, PRIOR_CV)))
        rp, rr = residuals(res_p, size), residuals(res_r, size)
        rt, ro = residuals(res_ttft, size), residuals(res_tpot, size)
        vt = residuals(cv_ttft, size, PRIOR_CV)
        vo = residuals(cv_tpot, size, PRIOR_CV)
        z = self.spread_z
        power, rate = [p0], [0.0]
        ttft, tpot = [0.0], [0.0]
        ttft_hi, tpot_hi = [0.0], [0.0]
        # Saturated: the batch never grew past the level where requests queued behind it
        # (the engine's max batch): more requests in flight add neither power nor tokens.
        ceiling_x = self._top_x if self._sat_x >= 0.9 * self._top_x > 0 else _INF
        for i in range(1, size):
            x = KNOTS[i]
            # Monotone: more requests never draw less power, emit fewer tokens or wait less;
            # noise in two neighbouring means must not make a negative marginal cost.
            if x > ceiling_x and KNOTS[i - 1] >= ceiling_x:
                power.append(power[-1])
                rate.append(rate[-1])
            else:
                power.append(max(fit_p(x) + rp[i], power[-1]))
                rate.append(max(fit_r(x) + rr[i], rate[-1]))
            ttft.append(max(t0 + k_q * x + rt[i], ttft[-1], 0.0))
            tpot.append(max(fit_step(x) * (1.0 + ro[i]), tpot[-1], 0.0))
            ttft_hi.append(max(ttft[-1] * (1.0 + z * vt[i]), ttft_hi[-1]))
            tpot_hi.append(max(tpot[-1] * (1.0 + z * vo[i]), tpot_hi[-1]))
        ttft[0], tpot[0], ttft_hi[0], tpot_hi[0] = ttft[1], tpot[1], ttft_hi[1], tpot_hi[1]
        self._power, self._rate, self._ttft, self._tpot = power, rate, ttft, tpot
        self._ttft_hi, self._tpot_hi = ttft_hi, tpot_hi
