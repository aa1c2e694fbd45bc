"""The estimate before samples arrive: learned rates and provisional weights.

A request's value at its close is usually not final yet: samples may not cover its end, and
requests overlapping it may not have known weights. Until they do, the attributor guesses
with what it learned from recent traffic (decode rate, weight per request, prefill weight).
Guesses only ever feed estimates and forced intervals, never a `measured` value.

Pure: no I/O, no clock reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.energy.attribution.request import RequestState
from proxy.energy.attribution.weights import TokenWeights
from proxy.energy.timeline import EnergyTimeline

__all__ = ["LearnedRates", "estimate_rest"]

# Provisional decode rate (tokens/s per request) before this backend has shown one.
DEFAULT_RATE_TOK_PER_S = 10.0
RATE_SMOOTHING = 0.1  # EWMA weight of one new observation


def _ewma(old: float, sample: float) -> float:
    """Moving average; 0 means nothing seen yet, so the first sample is taken as is."""
    return sample if old == 0 else old + RATE_SMOOTHING * (sample - old)


@dataclass(slots=True)
class LearnedRates:
    """Recent weight rates on this backend (moving averages; 0: none seen yet)."""

    tok_per_s: float = 0.0  # decode tokens/s per decoding request
    w_per_req: float = 0.0  # weight/s per request over its lifetime (at closes)
    w_per_flight: float = 0.0  # weight/s per request in flight (W / n over weighed intervals)
    prefill_w: float = 0.0  # prefill weight per streamed request

    def learn_decode(self, tokens_n: int, decode_s: float) -> None:
        if decode_s > 0:
            self.tok_per_s = _ewma(self.tok_per_s, tokens_n / decode_s)

    def learn_request(self, weight: float, life_s: float) -> None:
        if weight > 0 and life_s >= 1e-3:
            self.w_per_req = _ewma(self.w_per_req, weight / life_s)

    def learn_flight(self, weight: float, flight_s: float) -> None:
        if weight > 0 and flight_s > 0:
            self.w_per_flight = _ewma(self.w_per_flight, weight / flight_s)

    def learn_prefill(self, weight: float) -> None:
        self.prefill_w += RATE_SMOOTHING * (weight - self.prefill_w)

    @property
    def density_per_request(self) -> float:
        """Recent weight density of one request (weight/s over its lifetime; a default before)."""
        return self.w_per_req or self.tok_per_s or DEFAULT_RATE_TOK_PER_S

    @property
    def density_in_flight(self) -> float:
        """Recent weight density per request in flight (weight/s; a default before)."""
        return self.w_per_flight or self.density_per_request

    def provisional_density(self, r: RequestState, weights: TokenWeights,
                            horizon_s: float) -> float:
        """A guess at the weight/s of a request whose weights are unknown."""
        rate = self.tok_per_s or DEFAULT_RATE_TOK_PER_S
        if r.stream and r.first_token_s is not None and r.prompt_tokens == 0:
            return rate  # a prefill of unknown size: weigh it like a decoding request
        until_s = r.first_token_s if r.first_token_s is not None else horizon_s
        prefill_w = weights.prompt(r.prompt_tokens, r.embedding) / max(until_s - r.start_s, 1.0)
        return prefill_w if r.stream else prefill_w + rate


def estimate_rest(
    r: RequestState, timeline: EnergyTimeline, *, finalized_until_s: float | None,
    horizon_s: float, pending_w: float, guessed_n: int, unknown_prefills_n: int,
    rates: LearnedRates, foreign_w: float, in_flight_n: int,
) -> float:
    """Guess closed request `r`'s joules after `finalized_until_s`: its share of the weight there.

    O(1): the backend's known unsettled weight `pending_w` (plus the recent average prefill
    weight for the `unknown_prefills_n` streams whose prompt size is not known yet) is taken as
    spread evenly over the unsettled window up to `horizon_s`; each of the `guessed_n` requests
    still in prefill, or non-streamed and open, as weighing what a request recently weighed;
    other replicas' requests at density `foreign_w`. With no weight anywhere, an equal split
    among `in_flight_n` requests (here and elsewhere) and `r`.
    """
    assert r.end_s is not None
    end_s, fin_s = r.end_s, finalized_until_s
    lo_s = r.start_s if fin_s is None else max(fin_s, r.start_s)
    if end_s <= lo_s or timeline.last_sample_s is None:
        return 0.0
    energy_j = timeline.joules_between(lo_s, end_s)
    span_s = end_s - lo_s
    mine = float(r.pending_tokens)
    if r.flat_density is not None:
        mine += r.flat_density * span_s
    elif r.prefill_density is not None and r.first_token_s is not None:
        mine += r.prefill_density * max(0.0, r.first_token_s - lo_s)
    window_s = horizon_s - fin_s if fin_s is not None else 0.0
    fraction = span_s / window_s if window_s > span_s else 1.0
    rate = rates.density_per_request
    known_w = pending_w + unknown_prefills_n * rates.prefill_w
    total = known_w * fraction + guessed_n * rate * span_s + foreign_w * span_s
    if max(total, mine) > 0:
        return energy_j * mine / max(total, mine)
    return energy_j / (in_flight_n + 1)
