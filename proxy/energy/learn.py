"""Learn a backend's split weights online from its power samples.

The attributor splits each sample interval's joules by weight: a generated token weighs 1, a
prompt `prefill_weight` per token. One fixed `prefill_weight` cannot be right for every GPU and
load (the joules of a decode token fall 6-10x from batch 8 to 512 while a prompt token's stay),
a long prompt costs more per token than a short one (attention is quadratic), and a token
generated over a long context costs more than one over a short context (KV-cache reads).

`SplitLearner` fits, per backend, the joules of fully busy sample intervals (summed into windows
of at least `window_s`) against what the proxy knows happened in them:

    joules ~ a * decode_tokens + c * sum(context of those tokens)
             + p1 * prompt_tokens_prefilled + p2 * sum(prompt_len * prompt_tokens_prefilled)
             + e1 * tokens_embedded + p2 * sum(input_len * tokens_embedded)

with exponentially forgotten normal equations (half-life `half_life_s`), solved as a
non-negative least-squares problem with a ridge pull toward the prior (the configured
`prefill_weight`, no length or context terms). The weights it hands the attributor are the
fit's ratios to a decode token at zero context: prefill `p1 / a` per prompt token plus
`p2 / a` per token per prompt token, decode `1 + (c / a) * context`, embedding `e1 / a` per
token (an encoder pass runs at its own power and skips the LM head, so it is priced apart from a
prefill; its prior is the prefill's fit) plus the prefill's length term: a few embeddings
cannot pin down a length term of their own.

Where each request's work lies in time: a stream's prefill fills [start, first token], its
tokens count at their arrival. A non-streamed request shows no first token, so its prefill is
placed over the time to first token that recent streams of its prompt length saw (a line in
prompt length, fitted online), its tokens spread over the rest; spreading its prompt over its
whole lifetime would smear prefill joules into decode intervals and bias the prefill terms
toward zero. An interval is used once every request overlapping it has closed; intervals where
the backend was partly idle are skipped (their idle joules are not the requests').

Pure: no I/O, no clock reads; times in seconds on one clock, energies in joules.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from proxy.energy.attribution.steps import StepClock
from proxy.energy.attribution.ttft import TtftFit
from proxy.energy.attribution.weights import TokenWeights

__all__ = ["SplitLearner", "SplitWeights"]

# Feature scales, so the normal equations stay well conditioned: contexts and prompt lengths
# in thousands of tokens.
_KTOK = 1000.0
_N = 6  # decode tokens, decode x context, prefill tokens, prompt x length, embedded tokens, steps
_SWEEPS = 30  # coordinate-descent sweeps per solve (150 fit the attribution bench no better)
# Bounds on what a fit may hand out, so a few noisy windows cannot bill one request many times
# its due. The simulated GPUs' physics sit well inside them: a context token adds 4-7e-5 of a
# token's weight, attention doubles a prompt token's weight at ~30k tokens.
_MAX_CONTEXT_WEIGHT = 5e-4  # per context token: a 2000-token context at most doubles a token
_MIN_CROSSOVER_TOKENS = 1000.0  # prefill_weight_sq <= prefill_weight / this
_PRIOR_RANGE = 10.0  # prefill_weight within [prior / 10, prior * 10]
_MAX_STEP_WEIGHT = 64.0  # a token alone in its step weighs at most 65 of a full batch's
_STATE_VERSION = 2  # of `SplitLearner.state()`: a file from another layout is ignored


@dataclass(slots=True, frozen=True)
class SplitWeights(TokenWeights):
    """Learned split weights (see TokenWeights), and how much data is behind them."""

    learned: bool = False  # False: still the prior
    intervals: float = 0.0  # effective number of fit windows behind the fit

    def apply_to(self, attributor: Any) -> None:
        """Make these the attributor's weights (they apply to weights fixed from now on)."""
        attributor.weights = self

    def as_dict(self) -> dict[str, float | bool | None]:
        return {"prefill_weight": self.prefill_weight, "prefill_weight_sq": self.prefill_weight_sq,
                "decode_context_weight": self.decode_context_weight,
                "embed_weight": self.embed_weight, "embed_weight_sq": self.embed_weight_sq,
                "step_weight": self.step_weight,
                "learned": self.learned,
                "intervals": round(self.intervals, 1)}


@dataclass(slots=True)
class _Req:
    start_s: float
    stream: bool
    prompt: int
    embedding: bool = False
    first_s: float | None = None
    prefill_from_s: float = 0.0  # streams: the prompt went through after this (>= start_s)
    end_s: float | None = None
    completion: int = 0
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # streams: (t_s, count)


class SplitLearner:
    """Per-backend online fit of the split weights (see the module docstring)."""

    def __init__(self, prior_prefill_weight: float, *, half_life_s: float = 120.0,
                 min_intervals: float = 10.0, ridge: float = 0.05, max_pending_s: float = 120.0,
                 window_s: float = 1.0) -> None:
        if prior_prefill_weight < 0 or not half_life_s > 0 or not max_pending_s > 0:
            raise ValueError("prior_prefill_weight >= 0, half_life_s and max_pending_s > 0")
        self.prior = SplitWeights(prior_prefill_weight)
        self.half_life_s = half_life_s
        self.min_intervals = min_intervals
        self.ridge = ridge  # pull toward the prior, relative to each feature's own evidence
        self.max_pending_s = max_pending_s
        # Contiguous busy intervals are summed into windows of at least this long before they
        # enter the fit: where in a window a request's work lay matters less than in which.
        self.window_s = window_s
        self._acc: list[float] | None = None  # [a_s, b_s, joules, *features] of the open window
        self._reqs: dict[str, _Req] = {}
        self._intervals: deque[tuple[float, float, float]] = deque()  # (a_s, b_s, joules)
        self._gram = [[0.0] * _N for _ in range(_N)]
        self._xy = [0.0] * _N
        self._n_eff = 0.0
        self._t_s: float | None = None  # time of the newest interval in the fit
        self._ttft = TtftFit()  # streams' TTFT against prompt length
        self._clock = StepClock()  # decode steps the streams show (as the attributor places)
        self.weights = self.prior

    # -- what the relay reports (same calls as the attributor's) -----------------------------

    def open(self, request_id: str, start_s: float, stream: bool, prompt_tokens: int,
             embedding: bool = False) -> None:
        self._reqs[request_id] = _Req(start_s, stream, max(prompt_tokens, 0), embedding)

    def tokens(self, request_id: str, t_s: float, count: int) -> None:
        r = self._reqs.get(request_id)
        if r is None or not r.stream or r.end_s is not None or count <= 0:
            return  # like the attributor, only streams' arrivals place tokens in time
        if r.first_s is None:
            r.first_s = t_s
            # Its prompt went through in the step that ended with its first token, not while
            # it queued: placing it over the wait would smear it into others' windows.
            before_s = self._clock.moment_before(t_s)
            r.prefill_from_s = max(r.start_s, before_s if before_s is not None else r.start_s)
            self._clock.decoding_n += 1
        else:
            # As in the attributor (attribution/unsettled.py): a later chunk is decode steps
            # and proves the first chunk was a first token.
            self._clock.arrival(t_s, count, r.arrivals[-1][0] if r.arrivals else None)
            if len(r.arrivals) == 1:
                self._ttft.observe(r.prompt, r.first_s - r.start_s)
        r.arrivals.append((t_s, count))

    def close(self, request_id: str, end_s: float, prompt_tokens: int, completion_tokens: int) -> None:
        r = self._reqs.get(request_id)
        if r is None or r.end_s is not None:
            return
        if r.stream and r.first_s is not None:
            self._clock.decoding_n -= 1
        r.end_s = max(end_s, r.start_s)
        r.prompt = max(prompt_tokens, 0)
        r.completion = max(completion_tokens, 0)
        if r.stream and r.first_s is None:
            r.stream = False  # no token came while streaming: place its work like a non-stream

    # -- samples -----------------------------------------------------------------------------

    def interval(self, a_s: float, b_s: float, joules: float) -> SplitWeights:
        """One sample interval [a_s, b_s] and its joules; learns from every interval that has
        become usable and returns the current weights."""
        if b_s > a_s and joules >= 0 and math.isfinite(joules):
            self._intervals.append((a_s, b_s, joules))
        changed = False
        while self._intervals:
            a, b, e = self._intervals[0]
            if b_s - b > self.max_pending_s:
                # A request that never closed (its close was lost): give the interval up, and
                # the request too, so it blocks no later interval.
                self._intervals.popleft()
                for k in [k for k, r in self._reqs.items() if r.end_s is None and r.start_s < b]:
                    del self._reqs[k]
                continue
            if any(r.start_s < b and r.end_s is None for r in self._reqs.values()):
                break
            self._intervals.popleft()
            x = self._features(a, b)
            acc = self._acc
            if x is None:
                self._acc = None  # an idle or empty interval ends the window; a short one is lost
            elif acc is not None and abs(acc[1] - a) < 1e-6:
                acc[1] = b
                acc[2] += e
                for i in range(_N):
                    acc[3 + i] += x[i]
            else:
                self._acc = acc = [a, b, e, *x]
            if acc is not None and acc is self._acc and acc[1] - acc[0] >= self.window_s - 1e-9:
                self._add(acc[1], acc[3:], acc[2])
                self._acc = None
                changed = True
            self._forget_before(b)
        if changed:
            self.weights = self._solve()
        return self.weights

    def _features(self, a_s: float, b_s: float) -> list[float] | None:
        """What the requests did in [a_s, b_s]; None if the backend was idle at some point."""
        spans = sorted((max(r.start_s, a_s), min(r.end_s, b_s)) for r in self._reqs.values()
                       if r.end_s is not None and r.start_s < b_s and r.end_s > a_s)
        covered_s = a_s
        for lo, hi in spans:
            if lo > covered_s + 1e-6:
                return None
            covered_s = max(covered_s, hi)
        if not spans or covered_s < b_s - 1e-6:
            return None
        x = [0.0] * _N
        for r in self._reqs.values():
            end_s = r.end_s
            if end_s is None or r.start_s >= b_s or end_s <= a_s:
                continue
            length = r.prompt / _KTOK
            if r.stream:
                first_s = r.first_s if r.first_s is not None else end_s
                frac = _overlap(max(r.start_s, min(r.prefill_from_s, first_s)), first_s, a_s, b_s)
                x[2] += frac * r.prompt
                x[3] += frac * r.prompt * length
                done = 0
                for t_s, n in r.arrivals:
                    if a_s < t_s <= b_s:
                        x[0] += n
                        x[1] += n * (r.prompt + done + (n - 1) / 2.0) / _KTOK
                    done += n
            else:
                first_s = end_s
                if r.completion > 0:
                    first_s = min(end_s, r.start_s + self.ttft_s(r.prompt))
                frac = _overlap(r.start_s, first_s, a_s, b_s)
                x[4 if r.embedding else 2] += frac * r.prompt
                x[3] += frac * r.prompt * length
                frac = _overlap(first_s, end_s, a_s, b_s) if end_s > first_s else 0.0
                steps = self._clock.steps(first_s, end_s) if end_s > first_s else 0.0
                if steps > 0:  # its tokens where the streams saw steps
                    frac = self._clock.steps(max(first_s, a_s), min(end_s, b_s)) / steps
                x[0] += frac * r.completion
                x[1] += frac * r.completion * (r.prompt + r.completion / 2.0) / _KTOK
        if x[0] > 0:
            x[5] = self._clock.steps(a_s, b_s)
        return x if any(x) else None

    def ttft_s(self, prompt_tokens: int) -> float:
        """Expected time to first token (s) for a prompt this long, from recent streams;
        0 before any stream was seen."""
        return self._ttft.ttft_s(prompt_tokens)

    def _forget_before(self, t_s: float) -> None:
        """Drop closed requests that no waiting interval can overlap any more."""
        until_s = self._intervals[0][0] if self._intervals else t_s
        gone = [k for k, r in self._reqs.items() if r.end_s is not None and r.end_s <= until_s]
        for k in gone:
            del self._reqs[k]
        self._clock.forget_before(min((r.start_s for r in self._reqs.values()), default=until_s))

    def _add(self, t_s: float, x: list[float], y: float) -> None:
        if self._t_s is not None and t_s > self._t_s:
            decay = 0.5 ** ((t_s - self._t_s) / self.half_life_s)
            for i in range(_N):
                self._xy[i] *= decay
                row = self._gram[i]
                for j in range(_N):
                    row[j] *= decay
            self._n_eff *= decay
        self._t_s = t_s if self._t_s is None else max(self._t_s, t_s)
        for i in range(_N):
            self._xy[i] += x[i] * y
            row = self._gram[i]
            for j in range(_N):
                row[j] += x[i] * x[j]
        self._n_eff += 1.0

    def early_weights(self, min_windows: float) -> SplitWeights | None:
        """The fit from as few as `min_windows` windows (below `min_intervals`, so noisier than
        `weights`), for a caller that must settle now; None where even that cannot tell."""
        if self.weights.learned:
            return self.weights
        weights = self._solve(min_windows)
        return weights if weights.learned else None

    def _solve(self, min_windows: float | None = None) -> SplitWeights:
        """Non-negative ridge least squares by coordinate descent; the prior where the data
        cannot tell (fewer than `min_windows` windows, by default `min_intervals`; no decode
        tokens, or a feature never seen)."""
        g, xy = self._gram, self._xy
        if min_windows is None:
            min_windows = self.min_intervals
        if self._n_eff < min_windows or g[0][0] <= 0 or g[2][2] <= 0:
            return SplitWeights(self.prior.prefill_weight, intervals=self._n_eff)
        theta = [max(0.0, xy[i] / g[i][i]) if g[i][i] > 0 else 0.0 for i in range(_N)]
        for _ in range(_SWEEPS):
            # The prior in joules: prefill_weight decode tokens per prompt token, no length or
            # context terms; it scales with the current joules per decode token.
            prior = [theta[0], 0.0, self.prior.prefill_weight * theta[0], 0.0, theta[4], 0.0]
            for i in range(_N):
                rho = self.ridge * g[i][i]
                if g[i][i] <= 0:
                    theta[i] = prior[i]
                    continue
                rest = math.fsum(g[i][j] * theta[j] for j in range(_N) if j != i)
                theta[i] = max(0.0, (xy[i] - rest + rho * prior[i]) / (g[i][i] + rho))
        a = theta[0]
        if a <= 0:
            return SplitWeights(self.prior.prefill_weight, intervals=self._n_eff)
        prior_w = self.prior.prefill_weight
        w1 = min(max(theta[2] / a, prior_w / _PRIOR_RANGE), prior_w * _PRIOR_RANGE)
        w2 = min(theta[3] / a / _KTOK, w1 / _MIN_CROSSOVER_TOKENS)
        e1: float | None = None
        if g[4][4] > 0:  # embeddings seen: their own term, bounded like the prefill's
            e1 = min(max(theta[4] / a, prior_w / _PRIOR_RANGE), prior_w * _PRIOR_RANGE)
        return SplitWeights(w1, w2, min(theta[1] / a / _KTOK, _MAX_CONTEXT_WEIGHT), e1, w2,
                            min(theta[5] / a, _MAX_STEP_WEIGHT), learned=True, intervals=self._n_eff)

    # -- across restarts ----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What the fit has learned, JSON-ready; `restore` takes it back after a restart."""
        return {"version": _STATE_VERSION, "t_s": self._t_s, "n_eff": self._n_eff,
                "gram": [list(row) for row in self._gram], "xy": list(self._xy), "ttft": self._ttft.sums}

    def restore(self, state: dict[str, Any], now_s: float) -> SplitWeights:
        """Resume from `state()`, its evidence aged by the `half_life_s` forgetting from its
        newest window to `now_s` (a long stop leaves the prior). ValueError if it is malformed."""
        try:
            if state.get("version") != _STATE_VERSION:
                raise ValueError(f"version {state.get('version')!r}")
            t_s, n_eff = float(state["t_s"]), float(state["n_eff"])
            gram = [[float(v) for v in row] for row in state["gram"]]
            xy = [float(v) for v in state["xy"]]
            ttft = [float(v) for v in state["ttft"]]
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed split-weight state: {exc!r}") from None
        values = [t_s, n_eff, *xy, *ttft, *(v for row in gram for v in row)]
        if len(gram) != _N or any(len(row) != _N for row in gram) or len(xy) != _N \
                or not all(math.isfinite(v) for v in values) or n_eff < 0:
            raise ValueError("malformed split-weight state: shapes or values")
        self._ttft.sums = ttft
        decay = 0.5 ** (max(0.0, now_s - t_s) / self.half_life_s)
        self._gram = [[v * decay for v in row] for row in gram]
        self._xy = [v * decay for v in xy]
        self._n_eff = n_eff * decay
        self._t_s = t_s
        self.weights = self._solve()
        return self.weights

    @property
    def pending(self) -> int:
        """Intervals waiting for their requests to close."""
        return len(self._intervals)


def _overlap(lo_s: float, hi_s: float, a_s: float, b_s: float) -> float:
    """The fraction of [lo_s, hi_s] inside [a_s, b_s] (1 for an instant inside it)."""
    if hi_s <= lo_s:
        return 1.0 if a_s < lo_s <= b_s else 0.0
    return max(0.0, min(hi_s, b_s) - max(lo_s, a_s)) / (hi_s - lo_s)
