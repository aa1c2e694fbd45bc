"""Per-request energy attribution for one backend, incremental and conserving.

The method (shared/reference/gpu-energy.md, "Attribution"): cut the backend's energy timeline at
every sample, request start, first token and request end; split each slice's joules among the
requests in flight by weight; slices with nothing in flight are idle energy.

How it is computed. Inside one sample interval [a, b] power P is constant. Each request gets a
piecewise-constant weight density (weight per second):
  - streamed, prefill:  prefill_weight * prompt / (first - start)   on [start, first]
  - streamed, decode:   tokens that arrived in (a, b] / decode time  on [first, end] within [a, b]
  - non-streamed:       (prefill_weight * prompt + completion) / (end - start) on [start, end]
A request's joules in [a, b] are the integral of P * rho_r / W (W = sum of densities), which one
sweep over the interval's boundaries computes with a running integral of P / W, in
O(k log k) for k requests overlapping the interval. Where requests are in flight but W is zero
(between token arrivals) they split that energy equally. Each interval's shares are then scaled
to its busy joules exactly, so `attributed + idle (+ carried) == measured` holds to rounding.

An interval stays pending until its end sample has arrived and every request overlapping it has
known weights (a non-streamed request's tokens are known only at its end; a streamed request's
prefill density needs its first token time and its prompt size). Intervals are finalized oldest
first. Pending work older than `max_pending_s` is forced through with provisional weights, so
memory stays bounded whatever the callers do.

Events reported late (a start or token whose time is already settled) count in the next open
interval; energy before the first sample is unknown and billed to no one.

Other replicas. When several proxies (or workers) send requests to the same backend, each one
sees only its own requests. The others' total weight density arrives as a step function of time
(`set_foreign`, fed by proxy/energy/shares.py) and counts in W like a request of nobody's here:
its share of every slice is booked as `finalized_joules_foreign` (another replica bills it). The
split is the same as one proxy holding every request would make: each replica publishes the
local density function it weighs its own intervals with (`take_local`), so the shares add up to
the backend's busy energy. Settling therefore has two phases: an interval is first *weighed*
(local densities fixed: what a replica publishes) and then *split* once foreign data covers it
(`foreign_until_s`), or `foreign_max_wait_s` after its end with the last known foreign value.
Without foreign data (`foreign_until_s` infinite, the default) both phases run back to back.

Idle energy (nothing in flight, here or at another replica): `separate` books it as idle.
`share` carries it forward and adds it to the next moment something is in flight, split there by
weight; an idle stretch longer than `share_max_s` is booked as idle instead, so one request never
pays for a night of idle.

Pure: no I/O, no clock reads; times are seconds on one clock, passed in.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Literal

from proxy.energy.timeline import EnergyTimeline

__all__ = ["Attributor", "Estimate", "Final", "ScheduledRequest", "attribute_schedule"]

IdleMode = Literal["separate", "share"]
Method = Literal["measured", "estimated"]

_INF = math.inf
# Provisional decode rate (tokens/s per request) before this backend has shown one; only ever
# used for guesses (estimates, forced intervals), never for a finalized measured value.
_DEFAULT_RATE_TOK_PER_S = 10.0
_RATE_SMOOTHING = 0.1  # EWMA weight of one interval's decode rate
# Spans shorter than this (s) carry no density: weight / span would overflow to infinity.
_MIN_SPAN_S = 1e-9
_ZERO = (0.0, 0.0)
_IDLE_SMOOTHING = 0.2  # EWMA weight of one wholly idle interval's power
# Compact the foreign step function's lists once this many dropped entries sit at their head.
_COMPACT_AT = 1024
# Local weight points kept for `take_local` when nobody drains them (a stalled exchange).
_MAX_LOCAL_POINTS = 100_000


@dataclass(slots=True, frozen=True)
class Estimate:
    """A request's joules as known when it closes; `measured` only if nothing was guessed."""

    joules: float
    method: Method


@dataclass(slots=True, frozen=True)
class Final:
    """A request's settled attribution: joules and what it was computed from (times in s)."""

    request_id: str
    joules: float
    prompt_tokens: int
    completion_tokens: int
    start_s: float
    first_token_s: float | None
    end_s: float
    # `estimated` only where weights had to be guessed (forced) or samples never covered it.
    method: Method = "measured"


@dataclass(slots=True)
class _Request:
    """One request's attribution state while any of its energy is unsettled."""

    request_id: str
    stream: bool
    start_s: float
    prompt_tokens: int
    first_token_s: float | None = None
    end_s: float | None = None  # None while open
    completion_tokens: int = 0
    prefill_density: float | None = None  # weight/s on [start, first]; None: not known yet
    flat_density: float | None = None  # weight/s on [start, end] (non-streamed); None: open
    arrivals: deque[tuple[float, int]] = field(default_factory=deque)  # unsettled (t_s, count)
    pending_tokens: int = 0  # sum of counts in `arrivals`
    joules: float = 0.0  # settled share so far
    guessed: bool = False  # a forced interval used provisional weights for it
    key: str = ""  # its key in `Attributor._requests` (the id, unless a namesake is settling)
    final: Final | None = None  # once settled
    leaving: bool = False  # its end lies in a weighed interval: it settles when that is split


@dataclass(slots=True)
class _Weighed:
    """A sample interval whose local weights are fixed, waiting for foreign data to be split.

    Segments of constant density: owner (index into `reqs`), density (weight/s; 0 marks the
    owner's in-flight range); `events` (sorted by time): (t_s, i) segment i starts, (t_s, ~i)
    it ends. The local step function: total density `w0` (0 where nothing weighs) and
    in-flight count `n0` at a_s; at `times[k]` (the distinct event times) they become
    `w_after[k]`, `n_after[k]`, after the events before index `ends[k]`.
    """

    a_s: float
    b_s: float
    b_e_j: float  # the timeline's cumulative joules at b_s
    energy_j: float
    reqs: list[_Request]
    done: list[_Request]  # those that end by b_s (or ended before a_s)
    owner: list[int]
    rho: list[float]
    events: list[tuple[float, int]]
    w0: float
    n0: int
    times: list[float]
    ends: list[int]
    w_after: list[float]
    n_after: list[int]
    counts: list[tuple[_Request, int]]  # decode tokens each request settles here
    settled_w: float  # known weight this interval settles (leaves `_pending_w` when split)
    modelled: bool = False  # its joules are a model's guess: nothing is learned from it


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

    Other replicas (see the module docstring): `set_foreign` and `foreign_until_s` take their
    weights in; `publish_local = True` makes `take_local` hand out this replica's own.
    """

    __slots__ = (
        "timeline", "prefill_weight", "idle", "max_pending_s", "share_max_s",
        "first_finalized_s", "finalized_until_s", "finalized_joules_attributed",
        "finalized_joules_idle", "carried_joules", "_first_e_j", "_until_e_j", "_carry_since_s",
        "_requests", "_unknown", "_ready", "_horizon_s", "_last_start_s", "_rate_tok_per_s",
        "_pending_w", "_open_n", "_unknown_prefills_n", "_prefill_w_avg", "_alias", "_dup_n",
        "finalized_joules_foreign", "foreign_until_s", "foreign_max_wait_s", "weighed_until_s",
        "publish_local", "_weighed_e_j", "_weighed", "_f_t", "_f_w", "_f_n", "_f_head",
        "_local_out", "_local_from_s", "foreign_estimate_density", "_w_per_req",
        "_w_per_flight", "idle_w", "learn_idle_power", "_modelled",
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
        self.prefill_weight = prefill_weight
        self.idle: IdleMode = idle
        # Book the idle part of partly idle intervals at the learned idle power (see _split).
        self.learn_idle_power = learn_idle_power
        self.max_pending_s = max_pending_s
        self.share_max_s = share_max_s
        self.first_finalized_s: float | None = None  # the first sample seen
        self.finalized_until_s: float | None = None  # everything before it is settled
        self.finalized_joules_attributed = 0.0
        self.finalized_joules_idle = 0.0
        self.carried_joules = 0.0
        #: Learned power while nothing is in flight (W), from wholly idle intervals; None until seen.
        self.idle_w: float | None = None
        self.finalized_joules_foreign = 0.0
        # Other replicas' weights: known before `foreign_until_s` (infinite: none are expected,
        # a lone proxy); an interval ending later waits for them, `foreign_max_wait_s` at most.
        self.foreign_until_s = _INF
        self.foreign_max_wait_s = foreign_max_wait_s
        # Their weight density (weight/s) and in-flight count as a step function of time:
        # value i holds from _f_t[i] on; entries before `_f_head` are dropped ones.
        self._f_t: list[float] = []
        self._f_w: list[float] = []
        self._f_n: list[int] = []
        self._f_head = 0
        # For estimates only: the others' weight density now, open requests included (their
        # settled steps lag behind); None: use the newest settled step.
        self.foreign_estimate_density: float | None = None
        # Recent weight/s per request over its lifetime (EWMA over closes; 0: none yet), and
        # per request in flight (EWMA of W / n over weighed intervals; 0: none yet).
        self._w_per_req = 0.0
        self._w_per_flight = 0.0
        # Phase one: intervals before `weighed_until_s` have fixed local weights; those not yet
        # split wait in `_weighed`. With `publish_local`, their density function collects in
        # `_local_out` as (t_s, density, in-flight count) steps from `_local_from_s` on.
        self.weighed_until_s: float | None = None
        self._weighed_e_j = 0.0
        self._weighed: deque[_Weighed] = deque()
        self.publish_local = False
        self._local_out: list[tuple[float, float, int]] = []
        self._local_from_s: float | None = None
        # The timeline's cumulative joules at those two times: kept here, so pruning old
        # samples never changes the books.
        self._first_e_j = self._until_e_j = 0.0
        self._carry_since_s = 0.0  # share mode: where the carried idle stretch began
        # Unsettled requests, open or closed, in start order (settling stops at the first one
        # that starts after the interval), and those of them whose weights are not known yet.
        self._requests: dict[str, _Request] = {}
        self._unknown: dict[str, _Request] = {}
        self._ready: list[Final] = []  # settled, not yet handed out by `advance`
        self._horizon_s = -_INF  # latest time seen: events before it count as reported
        self._last_start_s = -_INF
        self._rate_tok_per_s = 0.0  # recent decode tokens/s per decoding request; 0: none seen
        self._pending_w = 0.0  # known weight not yet settled: feeds O(1) estimates
        self._open_n = 0
        # Of `_unknown`, streams past their first token: only their (settled) prefill is unknown.
        self._unknown_prefills_n = 0
        self._prefill_w_avg = 0.0  # recent prefill weight per streamed request (EWMA)
        # A request id reused while its closed namesake still settles (a client's retry with
        # its own x-request-id) gets another key; the id maps to it here.
        self._alias: dict[str, str] = {}
        self._dup_n = 0
        # Spans (a_s, b_s) whose joules a model guessed (the power source was down), oldest first.
        self._modelled: deque[tuple[float, float]] = deque()

    # -- the relay's calls ---------------------------------------------------------------------

    def open(self, request_id: str, start_s: float, stream: bool, prompt_tokens: int = 0) -> None:
        """A request was sent upstream at `start_s`. `prompt_tokens`: a best guess, 0 if none.

        For a streamed request the guess fixes its prefill weight at its first token; with 0 the
        prefill weight (and every interval it overlaps) waits for `close`'s exact count.
        """
        if self._find_open(request_id) is not None:
            raise ValueError(f"request {request_id!r} is already in flight")
        key = request_id
        if key in self._requests:
            self._dup_n += 1
            key = self._alias[request_id] = f"{request_id}\x00{self._dup_n}"
        # Starts never go backwards (one clock), which keeps `_requests` in start order.
        start_s = max(start_s, self._last_start_s)
        self._last_start_s = start_s
        r = _Request(request_id, stream, start_s, max(prompt_tokens, 0), key=key)
        self._requests[key] = r
        self._unknown[key] = r
        self._open_n += 1
        if start_s > self._horizon_s:
            self._horizon_s = start_s

    def tokens(self, request_id: str, t_s: float, count: int) -> None:
        """`count` generated tokens of a streamed request arrived at `t_s` (first call: TTFT)."""
        r = self._requests.get(request_id)
        if r is None or r.end_s is not None:
            r = self._find_open(request_id)
            if r is None:
                return
        if not r.stream:
            return
        if t_s < r.start_s:
            t_s = r.start_s
        if t_s > self._horizon_s:
            self._horizon_s = t_s
        if r.first_token_s is None:
            r.first_token_s = t_s
            if self.prefill_weight == 0 or r.prompt_tokens > 0:
                self._fix_prefill(r)
            else:
                self._unknown_prefills_n += 1
        if count > 0:
            r.arrivals.append((t_s, count))
            r.pending_tokens += count
            self._pending_w += count

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

    @property
    def finalized_joules_measured(self) -> float:
        """Joules the timeline measured over [first_finalized_s, finalized_until_s]."""
        return self._until_e_j - self._first_e_j

    @property
    def open_requests(self) -> int:
        """How many requests are in flight (opened, not closed)."""
        return self._open_n

    def mark_modelled(self, a_s: float, b_s: float) -> None:
        """The timeline's joules over [a_s, b_s] (s) are a model's guess, not readings: every
        request in flight there settles `estimated`. Mark spans in time order."""
        if b_s > a_s:
            self._modelled.append((a_s, b_s))

    # -- other replicas ------------------------------------------------------------------------

    def set_foreign(self, t_s: float, density: float, count: int = 0) -> None:
        """From `t_s` on, other replicas have `density` weight/s and `count` requests in flight.

        Same units as this replica's own densities (generated tokens/s plus prefill_weight x
        prompt tokens/s). Times never go back: a `t_s` at or before the newest step changes
        that step's value. Call `advance` afterwards to settle what the new data allows.
        """
        if not math.isfinite(t_s):
            return
        density = density if density > 0 and math.isfinite(density) else 0.0
        count = max(int(count), 0)
        ft = self._f_t
        if len(ft) > self._f_head and t_s <= ft[-1]:
            self._f_w[-1], self._f_n[-1] = density, count
            return
        ft.append(t_s)
        self._f_w.append(density)
        self._f_n.append(count)

    @property
    def foreign_density(self) -> float:
        """Other replicas' newest known weight density (weight/s); 0 when none is known."""
        return self._f_w[-1] if len(self._f_w) > self._f_head else 0.0

    @property
    def foreign_count(self) -> int:
        """Other replicas' newest known in-flight count on this backend."""
        return self._f_n[-1] if len(self._f_n) > self._f_head else 0

    @property
    def load_density(self) -> float:
        """A rough weight density of this replica's requests now (weight/s): each one in
        flight at the recent weight rate per request. What the other replicas' estimates use."""
        return self._open_n * self.density_per_request

    @property
    def density_per_request(self) -> float:
        """Recent weight density of one request (weight/s over its lifetime; a default before)."""
        return self._w_per_req or self._rate_tok_per_s or _DEFAULT_RATE_TOK_PER_S

    @property
    def density_in_flight(self) -> float:
        """Recent weight density per request in flight here (weight/s; a default before)."""
        return self._w_per_flight or self.density_per_request

    def take_local(self) -> tuple[float, float, list[tuple[float, float, int]]] | None:
        """This replica's weights fixed since the last call, for the other replicas.

        Returns (from_s, until_s, steps): over [from_s, until_s) the local weight density and
        in-flight count are the step function `steps` = [(t_s, density, count), ...] (its
        first step at from_s when not empty; empty: unchanged since the previous call's last
        step). None before the first sample. Collected only while `publish_local` is set.
        """
        until_s = self.weighed_until_s
        if until_s is None:
            return None
        from_s = self._local_from_s if self._local_from_s is not None else until_s
        steps, self._local_out = self._local_out, []
        self._local_from_s = until_s
        return from_s, until_s, steps

    # -- internals -----------------------------------------------------------------------------

    def _close(
        self, request_id: str, end_s: float, prompt_tokens: int, completion_tokens: int
    ) -> _Request:
        r = self._find_open(request_id)
        if r is None:
            raise KeyError(f"no request {request_id!r} in flight")
        if r.stream and r.first_token_s is not None and r.prefill_density is None:
            self._unknown_prefills_n -= 1  # it leaves `_unknown` below
        end_s = max(end_s, r.start_s, r.arrivals[-1][0] if r.arrivals else r.start_s)
        if end_s > self._horizon_s:
            self._horizon_s = end_s
        r.end_s = end_s
        self._open_n -= 1
        r.prompt_tokens = max(prompt_tokens, 0)
        r.completion_tokens = max(completion_tokens, 0)
        weight = self.prefill_weight * r.prompt_tokens + r.completion_tokens
        if weight > 0 and end_s - r.start_s >= 1e-3:
            rate, old = weight / (end_s - r.start_s), self._w_per_req
            self._w_per_req = rate if old == 0 else old + _RATE_SMOOTHING * (rate - old)
        if r.stream and (r.first_token_s is None or r.first_token_s >= end_s):
            if r.completion_tokens > 0:
                # Everything came at once at the end: no decode time to place the tokens in,
                # so weigh it like a non-streamed request (tokens spread over its lifetime).
                r.stream = False
                r.arrivals.clear()
                self._pending_w -= r.pending_tokens
                r.pending_tokens = 0
            elif r.first_token_s is None:
                r.first_token_s = end_s  # no tokens at all: prefill (or waiting) throughout
        if r.stream:
            if r.prefill_density is None:
                self._fix_prefill(r)
        else:
            weight = self.prefill_weight * r.prompt_tokens + r.completion_tokens
            r.flat_density = _density(weight, end_s - r.start_s)
            self._note_pending(r.flat_density, r.start_s, end_s)
            self._unknown.pop(r.key, None)
        return r

    def _find_open(self, request_id: str) -> _Request | None:
        """The request in flight under this id, if any."""
        r = self._requests.get(request_id)
        if r is not None and r.end_s is None:
            return r
        key = self._alias.get(request_id)
        r = self._requests.get(key) if key is not None else None
        return r if r is not None and r.end_s is None else None

    def _settled(self, r: _Request, joules: float, method: Method) -> None:
        """`r` is done: forget it and hand out its final value."""
        del self._requests[r.key]
        if self._alias.get(r.request_id) == r.key:
            del self._alias[r.request_id]
        r.final = Final(r.request_id, joules, r.prompt_tokens, r.completion_tokens, r.start_s,
                        r.first_token_s, r.end_s if r.end_s is not None else r.start_s, method)
        self._ready.append(r.final)

    def _fix_prefill(self, r: _Request) -> None:
        """Fix a streamed request's prefill density (needs its first token time)."""
        first_s = r.first_token_s
        assert first_s is not None
        weight = self.prefill_weight * r.prompt_tokens
        self._prefill_w_avg += _RATE_SMOOTHING * (weight - self._prefill_w_avg)
        r.prefill_density = _density(weight, first_s - r.start_s)
        self._note_pending(r.prefill_density, r.start_s, first_s)
        self._unknown.pop(r.key, None)

    def _note_pending(self, density: float, from_s: float, to_s: float) -> None:
        """Count a newly known density's weight in the unsettled part of [from_s, to_s]."""
        if self.finalized_until_s is not None:
            from_s = max(from_s, self.finalized_until_s)
        if to_s > from_s:
            self._pending_w += density * (to_s - from_s)

    def _provisional_density(self, r: _Request) -> float:
        """A guess at the weight/s of a request whose weights are unknown (estimates, forcing)."""
        rate = self._rate_tok_per_s or _DEFAULT_RATE_TOK_PER_S
        if r.stream and r.first_token_s is not None and r.prompt_tokens == 0:
            return rate  # a prefill of unknown size: weigh it like a decoding request
        until_s = r.first_token_s if r.first_token_s is not None else self._horizon_s
        prefill_w = self.prefill_weight * r.prompt_tokens / max(until_s - r.start_s, 1.0)
        return prefill_w if r.stream else prefill_w + rate

    def _blocked(self, a_s: float, b_s: float) -> bool:
        """Whether some request with unknown weights overlaps the interval [a_s, b_s]."""
        for r in self._unknown.values():
            if r.start_s < b_s:
                until_s = r.first_token_s if r.stream and r.first_token_s is not None else _INF
                if until_s > a_s:
                    return True
        return False

    def _settle_ready(self) -> None:
        """Settle every interval that can be settled, oldest first."""
        tl = self.timeline
        last_s = tl.last_sample_s
        if last_s is not None and last_s > self._horizon_s:
            self._horizon_s = last_s
        force_before_s = self._horizon_s - self.max_pending_s
        if self.finalized_until_s is None or self.weighed_until_s is None:
            first_s = tl.first_sample_s
            if first_s is None:
                self._give_up(force_before_s)
                return
            self.finalized_until_s = self.first_finalized_s = self._carry_since_s = first_s
            self.weighed_until_s = first_s
            self._until_e_j = self._first_e_j = self._weighed_e_j = tl.energy_j(first_s)
        # Phase one: fix the local weights of every interval whose requests are all known.
        while (nxt := tl.sample_after(self.weighed_until_s)) is not None:
            a_s, (b_s, b_e_j) = self.weighed_until_s, nxt
            # Work pending too long goes through with provisional weights.
            if a_s >= force_before_s and self._blocked(a_s, b_s):
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
            self.finalized_until_s, self._until_e_j = iv.b_s, iv.b_e_j
        if self.finalized_until_s < force_before_s:
            self._give_up(force_before_s)

    def _give_up(self, before_s: float) -> None:
        """Samples stopped: closed requests that ended before `before_s` leave as estimates."""
        gone = []
        for r in self._requests.values():
            if r.start_s >= before_s:
                break  # start order: no later one ended before `before_s`
            if r.end_s is not None and r.end_s < before_s and not r.leaving:
                gone.append(r)
        for r in gone:
            self._pending_w -= r.pending_tokens  # (its other unsettled weight lingers a while)
            self._settled(r, r.joules + self._estimate_rest(r), "estimated")

    def _weigh(self, a_s: float, b_s: float, b_e_j: float, energy_j: float) -> _Weighed:
        """Phase one for sample interval [a_s, b_s]: fix the densities of the requests in it."""
        reqs: list[_Request] = []  # the requests in flight during the interval
        done: list[_Request] = []  # those that end by b_s
        owner: list[int] = []
        rho: list[float] = []
        events: list[tuple[float, int]] = []
        counts: list[tuple[_Request, int]] = []
        # State at a_s: total density W (Neumaier pair), weighted and in-flight counts.
        w = w_c = 0.0
        nw = nf = 0
        tokens_n, decode_s, settled_w = 0, 0.0, 0.0

        def segment(k: int, lo_s: float, hi_s: float, density: float) -> None:
            nonlocal w, w_c, nw, nf
            i = len(rho)
            owner.append(k)
            rho.append(density)
            if lo_s > a_s:
                events.append((lo_s, i))
            elif density > 0:
                w, w_c = _neumaier(w, w_c, density)
                nw += 1
            else:
                nf += 1
            if hi_s < b_s:
                events.append((hi_s, ~i))

        for r in self._requests.values():
            if r.leaving:
                continue  # ended in an interval weighed before; settles when that is split
            s_s = r.start_s
            if s_s >= b_s:
                break  # start order: the rest start later too
            e_s = r.end_s if r.end_s is not None else _INF
            if e_s <= a_s:  # ended before the interval: a late close, or before any sample
                r.guessed = r.guessed or e_s <= (self.first_finalized_s or a_s)
                done.append(r)
                continue
            k = len(reqs)
            reqs.append(r)
            lo_s, hi_s = max(s_s, a_s), min(e_s, b_s)
            segment(k, lo_s, hi_s, 0.0)
            first_s = r.first_token_s if r.first_token_s is not None else _INF
            if not r.stream or s_s < first_s and first_s > a_s:
                end_s = hi_s if not r.stream else min(first_s, b_s)
                density = r.flat_density if not r.stream else r.prefill_density
                if density is None:  # only in a forced interval
                    r.guessed = True
                    density = self._provisional_density(r)
                else:
                    settled_w += density * (end_s - lo_s)
                if density > 0 and end_s > lo_s:
                    segment(k, lo_s, end_s, density)
            dlo_s = max(first_s, a_s)
            if r.stream and hi_s - dlo_s >= _MIN_SPAN_S:  # else tokens wait for a next window
                count = 0
                arrivals = r.arrivals
                while arrivals and arrivals[0][0] <= b_s:
                    count += arrivals.popleft()[1]
                if count:
                    counts.append((r, count))
                    tokens_n += count
                    settled_w += count
                    decode_s += hi_s - dlo_s
                    segment(k, dlo_s, hi_s, count / (hi_s - dlo_s))

        done.extend(r for r in reqs if r.end_s is not None and r.end_s <= b_s)
        for r in done:
            r.leaving = True
        if decode_s > 0:
            rate, old = tokens_n / decode_s, self._rate_tok_per_s
            self._rate_tok_per_s = rate if old == 0 else old + _RATE_SMOOTHING * (rate - old)
        # The local step function. W is a compensated sum: a huge short density (a quick
        # prefill) leaving must not wipe out the small ones left.
        events.sort(key=itemgetter(0))
        w0 = w + w_c if nw > 0 and w + w_c > 0 else 0.0
        n0 = nf
        times: list[float] = []
        ends: list[int] = []
        w_after: list[float] = []
        n_after: list[int] = []
        k, n = 0, len(events)
        while k < n:
            t_s = events[k][0]
            while k < n and events[k][0] == t_s:
                i = events[k][1]
                density = rho[i if i >= 0 else ~i]
                if density == 0:
                    nf += 1 if i >= 0 else -1
                elif i >= 0:
                    w, w_c = _neumaier(w, w_c, density)
                    nw += 1
                else:
                    nw -= 1
                    w, w_c = (0.0, 0.0) if nw == 0 else _neumaier(w, w_c, -density)
                k += 1
            times.append(t_s)
            ends.append(k)
            w_after.append(w + w_c if nw > 0 and w + w_c > 0 else 0.0)
            n_after.append(nf)
        # Weight per request in flight over the interval: integral of W / integral of n.
        weight = count_s = 0.0
        t_prev, w_now, n_now = a_s, w0, n0
        for t_s, w_next, n_next in zip(times, w_after, n_after, strict=True):
            weight += w_now * (t_s - t_prev)
            count_s += n_now * (t_s - t_prev)
            t_prev, w_now, n_now = t_s, w_next, n_next
        weight += w_now * (b_s - t_prev)
        count_s += n_now * (b_s - t_prev)
        if weight > 0 and count_s > 0:
            rate, old = weight / count_s, self._w_per_flight
            self._w_per_flight = rate if old == 0 else old + _RATE_SMOOTHING * (rate - old)
        if self.publish_local:
            self._publish_steps(a_s, w0, n0, times, w_after, n_after)
        modelled = bool(self._modelled) and self._overlaps_modelled(a_s, b_s)
        if modelled:
            for r in reqs:
                r.guessed = True
        return _Weighed(a_s, b_s, b_e_j, energy_j, reqs, done, owner, rho, events, w0, n0,
                        times, ends, w_after, n_after, counts, settled_w, modelled)

    def _publish_steps(self, a_s: float, w0: float, n0: int, times: list[float],
                       w_after: list[float], n_after: list[int]) -> None:
        """Append an interval's local (density, in-flight count) steps to `_local_out`."""
        out = self._local_out
        if len(out) >= _MAX_LOCAL_POINTS:  # nobody drains them: start over
            out.clear()
            self._local_from_s = None
        if self._local_from_s is None:
            self._local_from_s = a_s
        if not out or out[-1][1] != w0 or out[-1][2] != n0:
            out.append((a_s, w0, n0))
        for t_s, w, n in zip(times, w_after, n_after, strict=True):
            last = out[-1]
            if last[1] != w or last[2] != n:
                out.append((t_s, w, n))

    def _overlaps_modelled(self, a_s: float, b_s: float) -> bool:
        """Whether [a_s, b_s] overlaps a modelled span (spans wholly before a_s are dropped:
        intervals are weighed in time order)."""
        spans = self._modelled
        while spans and spans[0][1] <= a_s:
            spans.popleft()
        return any(lo < b_s for lo, _ in spans)

    def _foreign_in(self, a_s: float, b_s: float
                    ) -> tuple[float, int, list[tuple[float, float, int]]]:
        """Foreign density and count at a_s, and their steps inside (a_s, b_s)."""
        ft, h = self._f_t, self._f_head
        if len(ft) == h:
            return 0.0, 0, []
        i = bisect_right(ft, a_s, h)
        fw, fn = (self._f_w[i - 1], self._f_n[i - 1]) if i > h else (0.0, 0)
        j = bisect_left(ft, b_s, i)
        inside = [(ft[k], self._f_w[k], self._f_n[k]) for k in range(i, j)]
        return fw, fn, inside

    def _prune_foreign(self, until_s: float) -> None:
        """Drop foreign steps before the one in force at `until_s`."""
        ft = self._f_t
        h = bisect_right(ft, until_s, self._f_head) - 1
        if h <= self._f_head:
            return
        if h >= _COMPACT_AT and h * 2 >= len(ft):
            del ft[:h], self._f_w[:h], self._f_n[:h]
            h = 0
        self._f_head = h

    def _learn_idle_power(self, energy_j: float, span_s: float) -> None:
        """Moving average of the power of wholly idle intervals (W)."""
        if span_s <= 0:
            return
        power_w = energy_j / span_s
        self.idle_w = power_w if self.idle_w is None else self.idle_w + _IDLE_SMOOTHING * (power_w - self.idle_w)

    def _split(self, iv: _Weighed) -> None:
        """Phase two: split the interval's joules among its requests, others' and idle."""
        a_s, b_s, energy_j = iv.a_s, iv.b_s, iv.energy_j
        power_w = energy_j / (b_s - a_s)
        reqs, owner, rho, events = iv.reqs, iv.owner, iv.rho, iv.events
        times, ends, w_after, n_after = iv.times, iv.ends, iv.w_after, iv.n_after
        nseg = len(rho)
        # Running integral at each segment's start and end (None: at b_s).
        g_from: list[tuple[float, float]] = [_ZERO] * nseg
        g_to: list[tuple[float, float] | None] = [None] * nseg
        local_w, nf = iv.w0, iv.n0
        fw, fn, foreign_steps = self._foreign_in(a_s, b_s)

        # Sweep the local and the foreign step functions together: G = integral of P/W where
        # weighted, H = integral of P/n where in flight but weightless, W and n counting the
        # other replicas' too; F: the joules of the other replicas' share. Compensated sums, so
        # a large running integral never swallows a tiny slice's increment.
        share = self.idle == "share"
        carry_in_j = carry_j = self.carried_joules
        idle_j = idle_s = 0.0
        g = g_c = h = h_c = f = f_c = 0.0
        busy = False
        t_prev = a_s
        gi, ng = 0, len(times)
        fi, nfs = 0, len(foreign_steps)
        start = 0
        while True:
            if gi < ng and (fi >= nfs or times[gi] <= foreign_steps[fi][0]):
                t_s, kind = times[gi], 0
            elif fi < nfs:
                t_s, kind = foreign_steps[fi][0], 1
            else:
                t_s, kind = b_s, 2
            if t_s > t_prev:
                part_j = power_w * (t_s - t_prev)
                if nf == 0 and fn == 0 and fw == 0:
                    if not share:
                        idle_j += part_j
                        idle_s += t_s - t_prev
                    elif carry_j == 0:
                        carry_j, self._carry_since_s = part_j, t_prev
                    else:
                        carry_j += part_j
                else:
                    busy = True
                    part_j, carry_j = part_j + carry_j, 0.0
                    if local_w > 0 or fw > 0:
                        total_w = local_w + fw
                        if local_w > 0:
                            g, g_c = _neumaier(g, g_c, part_j / total_w)
                        if fw > 0:
                            f, f_c = _neumaier(f, f_c, part_j * (fw / total_w))
                    else:
                        total_n = nf + fn
                        if nf:
                            h, h_c = _neumaier(h, h_c, part_j / total_n)
                        if fn:
                            f, f_c = _neumaier(f, f_c, part_j * (fn / total_n))
                t_prev = t_s
            if kind == 0:
                snap_g, snap_h = (g, g_c), (h, h_c)
                end = ends[gi]
                for e in range(start, end):
                    i = events[e][1]
                    if i >= 0:
                        g_from[i] = snap_g if rho[i] > 0 else snap_h
                    else:
                        g_to[~i] = snap_g if rho[~i] > 0 else snap_h
                start = end
                local_w, nf = w_after[gi], n_after[gi]
                gi += 1
            elif kind == 1:
                _, fw, fn = foreign_steps[fi]
                fi += 1
            else:
                break

        # Exact books for this interval: what is neither idle nor carried on is busy, split
        # between this replica's requests and the others', so the rounding of the sub-slice
        # sums never leaks out of the invariant.
        busy_j = 0.0
        if not busy:
            if share:
                carry_j = carry_in_j + energy_j
            else:
                idle_j = energy_j
                if not iv.modelled:
                    self._learn_idle_power(energy_j, b_s - a_s)
        else:
            if idle_s > 0 and self.idle_w is not None and self.learn_idle_power:
                # The interval was partly idle. Its power was not uniform: the GPU drew about its
                # idle power while nothing ran and more while it worked. Book the idle part at the
                # learned idle power (never more than the uniform split gave it), the rest is busy.
                idle_j = min(idle_j, self.idle_w * idle_s)
            busy_j = energy_j + carry_in_j - idle_j - carry_j
            if busy_j < 0:  # rounding in a nearly idle interval
                if share:
                    carry_j += busy_j
                else:
                    idle_j += busy_j
                busy_j = 0.0
        if share and carry_j > 0 and b_s - self._carry_since_s > self.share_max_s:
            idle_j, carry_j = idle_j + carry_j, 0.0  # a long idle stretch is idle even in share
        self.carried_joules = carry_j
        self.finalized_joules_idle += idle_j

        if busy_j > 0:
            raw = [0.0] * len(reqs)
            g_end, h_end = (g, g_c), (h, h_c)
            for i, density in enumerate(rho):
                end = g_to[i] or (g_end if density > 0 else h_end)
                raw[owner[i]] += (density or 1.0) * _span(g_from[i], end)
            raw_sum = math.fsum(raw)
            foreign_raw = f + f_c
            if not reqs:
                local_j = 0.0
            elif foreign_raw > 0:
                local_j = busy_j * (raw_sum / (raw_sum + foreign_raw))
            else:
                local_j = busy_j
            if local_j > 0:
                if raw_sum > 0:
                    shares = [x * (local_j / raw_sum) for x in raw]
                else:  # every share underflowed: split evenly rather than lose energy
                    shares = [local_j / len(reqs)] * len(reqs)
                for r, share_j in zip(reqs, shares, strict=True):
                    r.joules += share_j
                self.finalized_joules_attributed += math.fsum(shares)
            self.finalized_joules_foreign += busy_j - local_j
        for r, count in iv.counts:
            r.pending_tokens -= count
        self._pending_w = max(self._pending_w - iv.settled_w, 0.0)
        for r in iv.done:
            self._settled(r, r.joules, "estimated" if r.guessed else "measured")
        if not self._requests:
            self._pending_w = 0.0  # exactly, so rounding cannot pile up
        if self._f_t:
            self._prune_foreign(b_s)

    def _estimate_rest(self, r: _Request) -> float:
        """Guess `r`'s joules after `finalized_until_s`: its share of the weight there, in O(1).

        The backend's known unsettled weight (plus the recent average prefill weight for
        streams whose prompt size is not known yet) is taken as spread evenly over the
        unsettled window, each request still in prefill, or non-streamed and open, as
        weighing what a request recently weighed, and other replicas' requests at the density
        they last reported (`foreign_estimate_density`, else their newest settled step).
        """
        assert r.end_s is not None
        end_s, fin_s = r.end_s, self.finalized_until_s
        lo_s = r.start_s if fin_s is None else max(fin_s, r.start_s)
        if end_s <= lo_s or self.timeline.last_sample_s is None:
            return 0.0
        energy_j = self.timeline.joules_between(lo_s, end_s)
        span_s = end_s - lo_s
        mine = float(r.pending_tokens)
        if r.flat_density is not None:
            mine += r.flat_density * span_s
        elif r.prefill_density is not None and r.first_token_s is not None:
            mine += r.prefill_density * max(0.0, r.first_token_s - lo_s)
        window_s = self._horizon_s - fin_s if fin_s is not None else 0.0
        fraction = span_s / window_s if window_s > span_s else 1.0
        guessed_n = len(self._unknown) - self._unknown_prefills_n
        rate = self.density_per_request
        known_w = self._pending_w + self._unknown_prefills_n * self._prefill_w_avg
        # Other replicas' requests: their density now over the whole span.
        foreign_w = self.foreign_estimate_density
        if foreign_w is None:
            foreign_w = self.foreign_density
        total = known_w * fraction + guessed_n * rate * span_s + foreign_w * span_s
        if max(total, mine) > 0:
            return energy_j * mine / max(total, mine)
        # Nobody has weight: an equal split.
        return energy_j / (self._open_n + self.foreign_count + 1)


def _density(weight: float, span_s: float) -> float:
    """Weight per second spread over `span_s` seconds (0 for a vanishing span)."""
    return weight / span_s if span_s >= _MIN_SPAN_S and weight > 0 else 0.0


def _span(start: tuple[float, float], end: tuple[float, float]) -> float:
    """Difference of two compensated running sums."""
    return (end[0] - start[0]) + (end[1] - start[1])


def _neumaier(total: float, comp: float, x: float) -> tuple[float, float]:
    """Compensated addition: (total, compensation) after adding `x`."""
    t = total + x
    if abs(total) >= abs(x):
        comp += (total - t) + x
    else:
        comp += (x - t) + total
    return t, comp


# -- offline use -------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class ScheduledRequest:
    """A finished request for offline attribution (times in seconds)."""

    request_id: str
    start_s: float
    end_s: float
    prompt_tokens: int
    completion_tokens: int
    stream: bool = True
    # Streamed only: (arrival time s, tokens) of each chunk.
    token_arrivals: Sequence[tuple[float, int]] = ()


def attribute_schedule(
    samples: Iterable[tuple[float, float]],
    requests: Iterable[ScheduledRequest],
    prefill_weight: float = 0.1,
    idle: IdleMode = "separate",
    *,
    sample_kind: Literal["energy_j", "power_w"] = "energy_j",
    share_max_s: float = 60.0,
    learn_idle_power: bool = True,
) -> tuple[dict[str, float], float]:
    """Attribute a whole schedule offline: (joules per request id, idle joules).

    `samples`: (time s, cumulative counter joules) readings, or (time s, watts) with
    `sample_kind="power_w"`. Replays the events in time order through the live `Attributor`.
    Idle joules include share mode's carry left after the last request. Raises ValueError if
    the samples do not reach some request's end.
    """
    attributor = Attributor(EnergyTimeline(max_age_s=_INF), prefill_weight=prefill_weight,
                            idle=idle, max_pending_s=_INF, share_max_s=share_max_s,
                            learn_idle_power=learn_idle_power)
    timeline = attributor.timeline
    add = timeline.add_energy_sample if sample_kind == "energy_j" else timeline.add_power_sample
    # (t_s, order, request or (request id, tokens) or sample value); at one instant requests
    # move before samples are read, as they would live.
    events: list[tuple[float, int, Any]] = []
    for req in requests:
        events.append((req.start_s, 0, req))
        if req.stream:
            events.extend((t_s, 1, (req.request_id, n)) for t_s, n in req.token_arrivals)
        events.append((req.end_s, 2, req))
    events.extend((t_s, 3, value) for t_s, value in samples)
    events.sort(key=itemgetter(0, 1))
    joules: dict[str, float] = {}
    for t_s, order, item in events:
        if order == 0:
            attributor.open(item.request_id, t_s, item.stream, item.prompt_tokens)
            if not item.stream:
                # Its end is known already: its weights too, so nothing waits for it.
                attributor._close(item.request_id, item.end_s, item.prompt_tokens,
                                  item.completion_tokens)
        elif order == 1:
            attributor.tokens(item[0], t_s, item[1])
        elif order == 2:
            if item.stream:
                attributor._close(item.request_id, t_s, item.prompt_tokens,
                                  item.completion_tokens)
        else:
            add(t_s, item)
            joules.update((f.request_id, f.joules) for f in attributor.advance())
    joules.update((f.request_id, f.joules) for f in attributor.advance())
    if attributor._requests:
        missing = ", ".join(sorted(attributor._requests)[:5])
        raise ValueError(f"samples end before these requests do: {missing}")
    return joules, attributor.finalized_joules_idle + attributor.carried_joules
