"""A backend's unsettled requests (open or closed, in start order) and their known weights.

A request's weights become known in steps: a stream's prefill density at its first token
(when its prompt size is known), its decode tokens as they arrive, a non-streamed request's
flat density at its end. Until then it is `unknown` and blocks the intervals it overlaps.

Pure: no I/O, no clock reads.
"""

from __future__ import annotations

import math

from proxy.energy.attribution.books import Books
from proxy.energy.attribution.provisional import LearnedRates
from proxy.energy.attribution.request import RequestState
from proxy.energy.attribution.steps import StepClock
from proxy.energy.attribution.ttft import TtftFit
from proxy.energy.attribution.weighing import MIN_SPAN_S, density
from proxy.energy.attribution.weights import TokenWeights

__all__ = ["UnsettledRequests"]


class UnsettledRequests:
    """The requests whose energy is not settled yet, keyed by `RequestState.key`.

    `by_key` is in start order (settling stops at the first one starting after an interval);
    `unknown`: those whose weights are not all known; `pending_w`: known weight not yet
    settled (feeds O(1) estimates). A request id reused while its closed namesake still
    settles (a client's retry with its own x-request-id) gets another key, in `alias`.
    """

    __slots__ = ("by_key", "unknown", "alias", "open_n", "unknown_prefills_n", "pending_w",
                 "_dup_n", "_last_start_s", "_rates", "_books", "clock", "ttft", "place")

    def __init__(self, rates: LearnedRates, books: Books) -> None:
        self.by_key: dict[str, RequestState] = {}
        self.unknown: dict[str, RequestState] = {}
        self.alias: dict[str, str] = {}
        self.open_n = 0
        # Of `unknown`, streams past their first token: only their (settled) prefill is unknown.
        self.unknown_prefills_n = 0
        self.pending_w = 0.0
        self._dup_n = 0
        self._last_start_s = -math.inf
        self._rates = rates  # learns from each request's weights
        self._books = books  # where settling has got to: weight before it is not pending
        self.clock = StepClock()  # decode steps seen in the streams: where non-streamed work lay
        self.ttft = TtftFit()  # streams' TTFT: where a non-streamed prefill lay
        self.place = True  # False: non-streamed work spread flat (the clock is this replica's)

    def open(self, request_id: str, start_s: float, stream: bool,
             prompt_tokens: int, embedding: bool = False) -> RequestState:
        """Add an opened request; ValueError if one under this id is in flight."""
        if self.find_open(request_id) is not None:
            raise ValueError(f"request {request_id!r} is already in flight")
        key = request_id
        if key in self.by_key:
            self._dup_n += 1
            key = self.alias[request_id] = f"{request_id}\x00{self._dup_n}"
        # Starts never go backwards (one clock), which keeps `by_key` in start order.
        start_s = max(start_s, self._last_start_s)
        self._last_start_s = start_s
        r = RequestState(request_id, stream, start_s, max(prompt_tokens, 0), key=key,
                         embedding=embedding)
        self.by_key[key] = r
        self.unknown[key] = r
        self.open_n += 1
        if not stream and not embedding:
            self.clock.others_n += 1
        return r

    def find_open(self, request_id: str) -> RequestState | None:
        """The request in flight under this id, if any."""
        r = self.by_key.get(request_id)
        if r is not None and r.end_s is None:
            return r
        key = self.alias.get(request_id)
        r = self.by_key.get(key) if key is not None else None
        return r if r is not None and r.end_s is None else None

    def tokens(self, r: RequestState, t_s: float, count: int, weights: TokenWeights) -> None:
        """Streamed `r` got `count` tokens at `t_s` (not before its start)."""
        shared = 0.0
        if r.first_token_s is None:
            r.first_token_s = t_s
            # Its prompt went through in the step that ended with its first token: after the
            # step before it, not while it queued (where it would take others' stalls).
            before_s = self.clock.moment_before(t_s) if self.place else None
            r.prefill_from_s = max(r.start_s, before_s if before_s is not None else r.start_s)
            self.clock.decoding_n += 1
            if weights.prefill_weight == 0 or r.prompt_tokens > 0:
                self._fix_prefill(r, weights)
            else:
                self.unknown_prefills_n += 1
        elif count > 0:
            # A later chunk: decode steps (the first token closes a prefill step), and proof
            # that the first chunk was a first token, not a buffered whole answer.
            self.clock.arrival(t_s, count, r.last_token_s)
            if not r.timed:
                r.timed = True
                self.ttft.observe(r.prompt_tokens, r.first_token_s - r.start_s)
            shared = weights.step_share(count, 1.0 / self.clock.batch())
        if count > 0:
            weight = weights.decode(r.prompt_tokens + r.emitted, count)
            if r.emitted:
                weight += shared
            r.emitted += count
            r.last_token_s = t_s
            r.arrivals.append((t_s, weight))
            r.pending_tokens += weight
            self.pending_w += weight

    def close(self, r: RequestState, end_s: float, prompt_tokens: int, completion_tokens: int,
              weights: TokenWeights) -> None:
        """`r` ended at `end_s` (not before its start or last token) with these exact counts."""
        if r.stream and r.first_token_s is not None and r.prefill_density is None:
            self.unknown_prefills_n -= 1  # it leaves `unknown` below
        r.end_s = end_s
        self.open_n -= 1
        if not r.stream and not r.embedding:
            self.clock.others_n -= 1
        if r.stream and r.first_token_s is not None:
            self.clock.decoding_n -= 1
        r.prompt_tokens = max(prompt_tokens, 0)
        r.completion_tokens = max(completion_tokens, 0)
        weight = (weights.prompt(r.prompt_tokens, r.embedding)
                  + weights.decode(r.prompt_tokens, r.completion_tokens)
                  + weights.step_share(max(r.completion_tokens - 1, 0), 1.0 / (self.clock.batch() + 1)))
        self._rates.learn_request(weight, end_s - r.start_s)
        converted = False
        if r.stream and (r.first_token_s is None or r.first_token_s >= end_s):
            if r.completion_tokens > 0:
                converted = True
                # Everything came at once at the end: no decode time to place the tokens in,
                # so weigh it like a non-streamed request (tokens spread over its lifetime).
                r.stream = False
                r.arrivals.clear()
                self.pending_w -= r.pending_tokens
                r.pending_tokens = 0
            elif r.first_token_s is None:
                r.first_token_s = end_s  # no tokens at all: prefill (or waiting) throughout
        if r.stream:
            if r.prefill_density is None:
                self._fix_prefill(r, weights)
        else:
            r.flat_density = density(weight, end_s - r.start_s)
            # A stream whose tokens all came at its end fed the step clock itself: flat.
            r.placed = None if converted else self._place(r, weights)
            self._note_pending(r.flat_density, r.start_s, end_s)
            self.unknown.pop(r.key, None)

    def _place(self, r: RequestState, weights: TokenWeights) -> tuple[float, float, float, float] | None:
        """Where a closed non-streamed request's work lay (see RequestState.placed): its prefill
        over the TTFT recent streams of its prompt length saw, its tokens over the steps the
        streams saw after that. None (spread flat) where no stream shows its steps."""
        end_s = r.end_s
        assert end_s is not None
        if not self.place or r.completion_tokens <= 0 or not self.ttft.seen:
            return None
        from_s = min(end_s, r.start_s + self.ttft.ttft_s(r.prompt_tokens))
        steps = self.clock.steps(from_s, end_s)
        if steps <= 0 or end_s - from_s < MIN_SPAN_S or from_s - r.start_s < MIN_SPAN_S:
            return None
        # Its first token came out of its prefill step, not a shared decode step (as a stream's).
        shared = weights.step_share(max(r.completion_tokens - 1, 0), self.clock.mean_share(from_s, end_s) or 0.0)
        return (from_s, weights.prompt(r.prompt_tokens, r.embedding),
                weights.decode(r.prompt_tokens, r.completion_tokens) + shared, steps)

    def forget(self, r: RequestState) -> None:
        """`r` is settled."""
        del self.by_key[r.key]
        first = next(iter(self.by_key.values()), None)
        self.clock.forget_before(first.start_s if first is not None else self._last_start_s)
        if self.alias.get(r.request_id) == r.key:
            del self.alias[r.request_id]

    def blocked(self, a_s: float, b_s: float) -> bool:
        """Whether some request with unknown weights overlaps the interval [a_s, b_s]."""
        for r in self.unknown.values():
            if r.start_s < b_s:
                until_s = r.first_token_s if r.stream and r.first_token_s is not None else math.inf
                if until_s > a_s:
                    return True
        return False

    def _fix_prefill(self, r: RequestState, weights: TokenWeights) -> None:
        """Fix a streamed request's prefill density (needs its first token time)."""
        first_s = r.first_token_s
        assert first_s is not None
        weight = weights.prompt(r.prompt_tokens, r.embedding)
        self._rates.learn_prefill(weight)
        from_s = max(r.prefill_from_s, r.start_s)
        r.prefill_density = density(weight, first_s - from_s)
        self._note_pending(r.prefill_density, from_s, first_s)
        self.unknown.pop(r.key, None)

    def _note_pending(self, rho: float, from_s: float, to_s: float) -> None:
        """Count a newly known density's weight in the unsettled part of [from_s, to_s]."""
        if self._books.until_s is not None:
            from_s = max(from_s, self._books.until_s)
        if to_s > from_s:
            self.pending_w += rho * (to_s - from_s)
