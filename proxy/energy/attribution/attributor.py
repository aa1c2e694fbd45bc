"""The live attributor of one backend: requests and samples in, settled finals out.

It holds the unsettled requests and drives settling interval by interval, oldest first:
weighing (weighing.py), then splitting once the other replicas' weights cover the interval
(split.py), then booking (books.py). See the package docstring for the method.

Pure: no I/O, no clock reads; times are seconds on one clock, passed in.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import replace
from typing import Literal

from proxy.energy.attribution.books import Books
from proxy.energy.attribution.foreign import ForeignWeights, LocalWeights, Step
from proxy.energy.attribution.provisional import LearnedRates, estimate_rest
from proxy.energy.attribution.request import Estimate, Final, Method, RequestState
from proxy.energy.attribution.split import split_interval
from proxy.energy.attribution.unsettled import UnsettledRequests
from proxy.energy.attribution.weighing import WeighedInterval, weigh_interval
from proxy.energy.attribution.weights import TokenWeights
from proxy.energy.timeline import EnergyTimeline

__all__ = ["Attributor", "IdleMode"]

IdleMode = Literal["separate", "share"]

_INF = math.inf
_IDLE_SMOOTHING = 0.2  # EWMA weight of one wholly idle interval's power


class Attributor:
    """Per-request attribution for one backend, fed as requests and samples come.

    The live relay calls `open`, `tokens` and `close`; the power source feeds `timeline` and then
    calls `advance`. A request id must be unique among unsettled requests (use the proxy's own
    id), and every opened request must be closed, errors and disconnects included.

    Books (joules), readable any time: `finalized_joules_attributed` (settled onto requests),
    `finalized_joules_idle`, `carried_joules` (share mode's idle waiting for the next busy
    moment), `finalized_joules_foreign` (other replicas' share), over the settled span
    [`first_finalized_s`, `finalized_until_s`]; invariant: attributed + idle + carried +
    foreign == `finalized_joules_measured`, to float rounding.

    Other replicas (see the package docstring): `set_foreign` and `foreign_until_s` take their
    weights in; `publish_local = True` makes `take_local` hand out this replica's own.
    `prefill_weight` and `weights` (its length and context terms too, see weights.py) may be
    changed at any time: they apply to weights fixed from then on.
    """

    __slots__ = (
        "timeline", "weights", "idle", "learn_idle_power", "max_pending_s", "share_max_s",
        "books", "idle_w", "rates", "foreign", "foreign_until_s", "foreign_max_wait_s",
        "foreign_estimate_density", "publish_local", "local", "weighed_until_s", "_weighed_e_j",
        "_weighed", "unsettled", "_ready", "_horizon_s", "_modelled", "host", "host_measured_j",
        "host_attributed_j", "samples_until_s",
    )

    def __init__(
        self,
        timeline: EnergyTimeline | None = None,
        *,
        prefill_weight: float = 0.1,
        idle: IdleMode = "separate",
        max_pending_s: float = 900.0,
        share_max_s: float = 60.0,
        foreign_max_wait_s: float = 30.0,
        learn_idle_power: bool = True,
    ) -> None:
        if idle not in ("separate", "share"):
            raise ValueError(f"idle must be 'separate' or 'share', not {idle!r}")
        if prefill_weight < 0 or not max_pending_s > 0 or not share_max_s > 0:
            raise ValueError("prefill_weight must be >= 0, max_pending_s and share_max_s > 0")
        if not foreign_max_wait_s >= 0:
            raise ValueError("foreign_max_wait_s must be >= 0")
        self.timeline = timeline if timeline is not None else EnergyTimeline(max_pending_s + 60.0)
        self.weights = TokenWeights(prefill_weight)
        self.idle: IdleMode = idle
        # Book the idle part of partly idle intervals at the learned idle power (see split.py).
        self.learn_idle_power = learn_idle_power
        self.max_pending_s = max_pending_s
        self.share_max_s = share_max_s
        self.books = Books()
        #: Learned power while nothing is in flight (W), from wholly idle intervals; None until seen.
        self.idle_w: float | None = None
        self.rates = LearnedRates()
        # Other replicas' weights: known before `foreign_until_s` (infinite: none are expected,
        # a lone proxy); an interval ending later waits for them, `foreign_max_wait_s` at most.
        self.foreign = ForeignWeights()
        self.foreign_until_s = _INF
        self.foreign_max_wait_s = foreign_max_wait_s
        # For estimates only: the others' weight density now, open requests included (their
        # settled steps lag behind); None: use the newest settled step.
        self.foreign_estimate_density: float | None = None
        # With `publish_local`, weighed intervals' local steps collect in `local`.
        self.publish_local = False
        self.local = LocalWeights()
        # Phase one: intervals before `weighed_until_s` have fixed local weights; those not yet
        # split wait in `_weighed`. `_weighed_e_j`: the timeline's cumulative joules there.
        self.weighed_until_s: float | None = None
        self._weighed_e_j = 0.0
        self._weighed: deque[WeighedInterval] = deque()
        self.unsettled = UnsettledRequests(self.rates, self.books)
        self._ready: list[Final] = []  # settled, not yet handed out by `advance`
        self._horizon_s = -_INF  # latest time seen: events before it count as reported
        # Spans (a_s, b_s) whose joules a model guessed (the power source was down), oldest first.
        self._modelled: deque[tuple[float, float]] = deque()
        # The host's (CPU + DRAM) energy, sampled at the GPU's sample times: each interval's host
        # joules go to its requests in the proportions its GPU joules went, the rest (idle,
        # other replicas) stays off the requests. Books: measured and attributed host joules.
        self.host: EnergyTimeline | None = None
        self.host_measured_j = 0.0
        self.host_attributed_j = 0.0
        # Settle with the timeline's samples up to here only: a replay (restate.py) runs on a
        # timeline that already holds later samples than the moment it replays.
        self.samples_until_s = _INF

    @property
    def prefill_weight(self) -> float:
        """One prompt token's weight relative to one generated token (the flat term)."""
        return self.weights.prefill_weight

    @prefill_weight.setter
    def prefill_weight(self, value: float) -> None:
        self.weights = replace(self.weights, prefill_weight=value)

    @property
    def place_by_steps(self) -> bool:
        """Place decode work where this replica's streams saw the backend's steps (default):
        within an interval, decode tokens where steps were (few through a stall), a non-streamed
        request's prefill over the streams' TTFT and its tokens over the steps after it. False:
        tokens evenly over each interval, non-streamed work flat over its lifetime. The step
        clock is local: replicas sharing a backend agree exactly only with it off."""
        return self.unsettled.place

    @place_by_steps.setter
    def place_by_steps(self, value: bool) -> None:
        self.unsettled.place = value

    # -- the relay's calls ---------------------------------------------------------------------

    def open(self, request_id: str, start_s: float, stream: bool, prompt_tokens: int = 0,
             embedding: bool = False) -> None:
        """A request was sent upstream at `start_s`. `prompt_tokens`: a best guess, 0 if none;
        `embedding`: an embedding request (its prompt weighs `weights.embed_weight`).

        For a streamed request the guess fixes its prefill weight at its first token; with 0 the
        prefill weight (and every interval it overlaps) waits for `close`'s exact count.
        """
        r = self.unsettled.open(request_id, start_s, stream, prompt_tokens, embedding)
        if r.start_s > self._horizon_s:
            self._horizon_s = r.start_s

    def tokens(self, request_id: str, t_s: float, count: int) -> None:
        """`count` generated tokens of a streamed request arrived at `t_s` (first call: TTFT)."""
        r = self.unsettled.find_open(request_id)
        if r is None or not r.stream:
            return
        if t_s < r.start_s:
            t_s = r.start_s
        if t_s > self._horizon_s:
            self._horizon_s = t_s
        self.unsettled.tokens(r, t_s, count, self.weights)

    def close(
        self, request_id: str, end_s: float, prompt_tokens: int, completion_tokens: int
    ) -> Estimate:
        """The request ended at `end_s` with these exact token counts: its joules right now.

        `measured` if samples already cover `end_s` and every request overlapping it had known
        weights (then it is also its final value); otherwise `estimated`, with power extrapolated
        past the last sample and provisional weights for requests still unknown. The final value
        comes later from `advance`.
        """
        r = self._close(request_id, end_s, prompt_tokens, completion_tokens)
        self._settle_ready()
        if r.final is not None:  # settled just now: its final value
            return Estimate(r.final.joules, r.final.method)
        return Estimate(r.joules + self._estimate_rest(r), "estimated")

    def advance(self, now_s: float | None = None) -> list[Final]:
        """Settle what can be settled (call after each sample, and after new foreign data);
        returns the newly final requests.

        `now_s`: the caller's clock now, if known; it lets requests whose samples never come
        (a dead power source) be given up on after `max_pending_s`, and intervals whose foreign
        data is late be split `foreign_max_wait_s` after their end.
        """
        if now_s is not None and now_s > self._horizon_s:
            self._horizon_s = now_s
        self._settle_ready()
        ready, self._ready = self._ready, []
        return ready

    def mark_modelled(self, a_s: float, b_s: float) -> None:
        """The timeline's joules over [a_s, b_s] (s) are a model's guess, not readings: every
        request in flight there settles `estimated`. Mark spans in time order."""
        if b_s > a_s:
            self._modelled.append((a_s, b_s))

    # -- the books -----------------------------------------------------------------------------

    @property
    def finalized_joules_attributed(self) -> float:
        """Joules settled onto this replica's requests."""
        return self.books.attributed_j

    @property
    def finalized_joules_idle(self) -> float:
        return self.books.idle_j

    @property
    def carried_joules(self) -> float:
        """Share mode's idle joules waiting for the next busy moment."""
        return self.books.carried_j

    @property
    def finalized_joules_foreign(self) -> float:
        """Joules other replicas' requests took (billed there)."""
        return self.books.foreign_j

    @property
    def finalized_joules_measured(self) -> float:
        """Joules the timeline measured over [first_finalized_s, finalized_until_s]."""
        return self.books.measured_j

    @property
    def first_finalized_s(self) -> float | None:
        """The first sample's time (s); None before it."""
        return self.books.first_s

    @property
    def finalized_until_s(self) -> float | None:
        """Everything before this time (s) is settled; None before the first sample."""
        return self.books.until_s

    @property
    def open_requests(self) -> int:
        """How many requests are in flight (opened, not closed)."""
        return self.unsettled.open_n

    # -- other replicas ------------------------------------------------------------------------

    def set_foreign(self, t_s: float, density: float, count: int = 0) -> None:
        """From `t_s` on, other replicas have `density` weight/s and `count` requests in flight.

        Same units as this replica's own densities (generated tokens/s plus prefill_weight x
        prompt tokens/s). Times never go back: a `t_s` at or before the newest step changes
        that step's value. Call `advance` afterwards to settle what the new data allows.
        """
        self.foreign.set(t_s, density, count)

    @property
    def foreign_density(self) -> float:
        """Other replicas' newest known weight density (weight/s); 0 when none is known."""
        return self.foreign.newest_density

    @property
    def foreign_count(self) -> int:
        """Other replicas' newest known in-flight count on this backend."""
        return self.foreign.newest_count

    @property
    def load_density(self) -> float:
        """A rough weight density of this replica's requests now (weight/s): each one in
        flight at the recent weight rate per request. What the other replicas' estimates use."""
        return self.unsettled.open_n * self.rates.density_per_request

    @property
    def density_per_request(self) -> float:
        """Recent weight density of one request (weight/s over its lifetime; a default before)."""
        return self.rates.density_per_request

    @property
    def density_in_flight(self) -> float:
        """Recent weight density per request in flight here (weight/s; a default before)."""
        return self.rates.density_in_flight

    def take_local(self) -> tuple[float, float, list[Step]] | None:
        """This replica's weights fixed since the last call, for the other replicas.

        Returns (from_s, until_s, steps): over [from_s, until_s) the local weight density and
        in-flight count are the step function `steps` = [(t_s, density, count), ...] (its
        first step at from_s when not empty; empty: unchanged since the previous call's last
        step). None before the first sample. Collected only while `publish_local` is set.
        """
        if self.weighed_until_s is None:
            return None
        return self.local.take(self.weighed_until_s)

    # -- the requests' weights -----------------------------------------------------------------

    def _close(
        self, request_id: str, end_s: float, prompt_tokens: int, completion_tokens: int
    ) -> RequestState:
        r = self.unsettled.find_open(request_id)
        if r is None:
            raise KeyError(f"no request {request_id!r} in flight")
        end_s = max(end_s, r.start_s, r.arrivals[-1][0] if r.arrivals else r.start_s)
        if end_s > self._horizon_s:
            self._horizon_s = end_s
        self.unsettled.close(r, end_s, prompt_tokens, completion_tokens, self.weights)
        return r

    # The unsettled requests' tables, as tests read them.
    @property
    def _requests(self) -> dict[str, RequestState]:
        return self.unsettled.by_key

    @property
    def _unknown(self) -> dict[str, RequestState]:
        return self.unsettled.unknown

    @property
    def _alias(self) -> dict[str, str]:
        return self.unsettled.alias

    def _provisional_density(self, r: RequestState) -> float:
        return self.rates.provisional_density(r, self.weights, self._horizon_s)

    def _estimate_rest(self, r: RequestState) -> float:
        """Guess `r`'s joules after `finalized_until_s` (see provisional.estimate_rest)."""
        foreign_w = self.foreign_estimate_density
        if foreign_w is None:
            foreign_w = self.foreign.newest_density
        u = self.unsettled
        return estimate_rest(
            r, self.timeline, finalized_until_s=self.books.until_s, horizon_s=self._horizon_s,
            pending_w=u.pending_w, guessed_n=len(u.unknown) - u.unknown_prefills_n,
            unknown_prefills_n=u.unknown_prefills_n, rates=self.rates, foreign_w=foreign_w,
            in_flight_n=u.open_n + self.foreign.newest_count)

    # -- settling ------------------------------------------------------------------------------

    def _settle_ready(self) -> None:
        """Settle every interval that can be settled, oldest first."""
        tl, books = self.timeline, self.books
        last_s = tl.last_sample_s
        if last_s is not None and last_s > self.samples_until_s:
            last_s = self.samples_until_s
        if last_s is not None and last_s > self._horizon_s:
            self._horizon_s = last_s
        force_before_s = self._horizon_s - self.max_pending_s
        if books.until_s is None or self.weighed_until_s is None:
            first_s = tl.first_sample_s
            if first_s is None or first_s > self.samples_until_s:
                self._give_up(force_before_s)
                return
            books.begin(first_s, tl.energy_j(first_s))
            self.weighed_until_s, self._weighed_e_j = first_s, books.first_e_j
        # Phase one: fix the local weights of every interval whose requests are all known.
        while (nxt := tl.sample_after(self.weighed_until_s)) is not None \
                and nxt[0] <= self.samples_until_s:
            a_s, (b_s, b_e_j) = self.weighed_until_s, nxt
            # Work pending too long goes through with provisional weights.
            if a_s >= force_before_s and self.unsettled.blocked(a_s, b_s):
                break
            self._weighed.append(self._weigh(a_s, b_s, b_e_j, b_e_j - self._weighed_e_j))
            self.weighed_until_s, self._weighed_e_j = b_s, b_e_j
        # Phase two: split those the other replicas' weights cover (or that waited too long).
        weighed = self._weighed
        while weighed:
            iv = weighed[0]
            if (iv.b_s > self.foreign_until_s and iv.a_s >= force_before_s
                    and self._horizon_s - iv.b_s < self.foreign_max_wait_s):
                break
            weighed.popleft()
            self._split(iv)
        assert books.until_s is not None
        if books.until_s < force_before_s:
            self._give_up(force_before_s)

    def _give_up(self, before_s: float) -> None:
        """Samples stopped: closed requests that ended before `before_s` leave as estimates."""
        gone = []
        for r in self.unsettled.by_key.values():
            if r.start_s >= before_s:
                break  # start order: no later one ended before `before_s`
            if r.end_s is not None and r.end_s < before_s and not r.leaving:
                gone.append(r)
        for r in gone:
            self.unsettled.pending_w -= r.pending_tokens  # (its other unsettled weight lingers a while)
            self._settled(r, r.joules + self._estimate_rest(r), "estimated")

    def _weigh(self, a_s: float, b_s: float, b_e_j: float, energy_j: float) -> WeighedInterval:
        """Phase one for sample interval [a_s, b_s]: fix the densities of the requests in it."""
        iv, tokens_n, decode_s = weigh_interval(
            self.unsettled.by_key.values(), a_s, b_s, b_e_j, energy_j, self.books.first_s,
            self._provisional_density, self.unsettled.clock if self.unsettled.place else None)
        self.rates.learn_decode(tokens_n, decode_s)
        self.rates.learn_flight(*iv.weight_and_flight_s())
        if self.publish_local:
            self.local.append(a_s, iv.w0, iv.n0, iv.times, iv.w_after, iv.n_after)
        if self._modelled and self._overlaps_modelled(a_s, b_s):
            iv.modelled = True
            for r in iv.reqs:
                r.guessed = True
        return iv

    def _overlaps_modelled(self, a_s: float, b_s: float) -> bool:
        """Whether [a_s, b_s] overlaps a modelled span (spans wholly before a_s are dropped:
        intervals are weighed in time order)."""
        spans = self._modelled
        while spans and spans[0][1] <= a_s:
            spans.popleft()
        return any(lo < b_s for lo, _ in spans)

    def _split(self, iv: WeighedInterval) -> None:
        """Phase two: split the interval's joules, book them, and settle who ends in it."""
        books = self.books
        foreign_at_a, foreign_steps = self.foreign.within(iv.a_s, iv.b_s)
        split = split_interval(
            iv, foreign_at_a, foreign_steps, share_idle=self.idle == "share",
            carried_j=books.carried_j, carry_since_s=books.carry_since_s,
            share_max_s=self.share_max_s, idle_w=self.idle_w if self.learn_idle_power else None)
        if split.wholly_idle and not iv.modelled:
            self._learn_idle_power(iv.energy_j, iv.b_s - iv.a_s)
        for r, share_j in zip(iv.reqs, split.shares, strict=False):
            r.joules += share_j
        if self.host is not None:
            host_j = self.host.joules_between(iv.a_s, iv.b_s)
            ratio = host_j / iv.energy_j if iv.energy_j > 0 else 0.0
            self.host_measured_j += host_j
            for r, share_j in zip(iv.reqs, split.shares, strict=False):
                r.host_joules += share_j * ratio
            self.host_attributed_j += split.attributed_j * ratio
        books.book(split, iv.b_s, iv.b_e_j)
        for r, count in iv.counts:
            r.pending_tokens -= count
        u = self.unsettled
        u.pending_w = max(u.pending_w - iv.settled_w, 0.0)
        for r in iv.done:
            self._settled(r, r.joules, "estimated" if r.guessed else "measured")
        if not u.by_key:
            u.pending_w = 0.0  # exactly, so rounding cannot pile up
        self.foreign.prune(iv.b_s)

    def _learn_idle_power(self, energy_j: float, span_s: float) -> None:
        """Moving average of the power of wholly idle intervals (W)."""
        if span_s <= 0:
            return
        power_w = energy_j / span_s
        old = self.idle_w
        self.idle_w = power_w if old is None else old + _IDLE_SMOOTHING * (power_w - old)

    def _settled(self, r: RequestState, joules: float, method: Method) -> None:
        """`r` is done: forget it and hand out its final value."""
        self.unsettled.forget(r)
        r.final = Final(r.request_id, joules, r.prompt_tokens, r.completion_tokens, r.start_s,
                        r.first_token_s, r.end_s if r.end_s is not None else r.start_s, method,
                        r.host_joules)
        self._ready.append(r.final)
