"""A backend's first minutes, settled again once its split weights are learned.

A cold proxy splits with the prior weights until the learner has seen enough busy windows, and
on a busy backend the prior bills chat a few percent high and long prompts and embeddings low.
`ColdStart` records what the attributor is told while the weights are still the prior, and
holds back the finals it settles. Once the weights are learned it replays the record into a
fresh attributor that has those weights from the start: its finals are booked instead, and it
carries on as the live attributor. Every request is in the record from its open, so each one
settles exactly once, in the replacement. The hold ends early when the backend has had
nothing in flight for `idle_s` (a backend that idles between requests rarely gives the learner
a fully busy window) and at the latest `hold_s` after the first held request ended: then the
record is replayed with whatever fit the learner can give from fewer windows, or, with
nothing learned, the held finals go out as they were settled.

Pure: no I/O, no clock reads; times are seconds on the attributor's clock, passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from proxy.energy.attribution.attributor import Attributor
from proxy.energy.attribution.request import Final
from proxy.energy.attribution.weights import TokenWeights

__all__ = ["EARLY_WINDOWS", "ColdStart"]

#: Nothing in flight this long (s) ends the hold.
IDLE_S = 1.0
#: Held finals wait at most this long (s) after the first one's request ended: well inside
#: the accounting's wait for a final (proxy/accounting.py, 120 s), after which it books the
#: estimate.
HOLD_S = 60.0
#: A record this long ends the hold (about 100 MB: a minute at some 10,000 tokens a second).
MAX_EVENTS = 600_000
#: Recorded calls replayed per `settle` at least: 10-20 ms of work on a busy 2-core machine.
CHUNK_EVENTS = 2000
#: Fit windows (of about 1 s, fully busy) behind the weights before the replay: the learner
#: hands out weights from 10, which are still noisy (10 to 80 tried on the virtual bench,
#: seeds 1-4: 40 gave the smallest per-tenant errors).
MIN_WINDOWS = 40.0
#: When the hold is over sooner, the fewest windows a fit for the replay may rest on
#: (SplitLearner.early_weights): a short busy burst gives a few, and on the virtual bench (80
#: requests, seeds 1-4) they beat the prior on three seeds of four (3 and 5 gave the same).
EARLY_WINDOWS = 5.0


class ColdStart:
    """The record of one attributor's calls while its weights are the prior, and its held finals.

    The owner calls `open`, `tokens`, `close`, `mark_modelled` and `advance` on the attributor
    as usual, `record`s each call here (an `advance` with the last sample time it could use), and
    passes each `advance`'s finals to `settle`, which returns those to hand out now and the
    attributor to use from then on.
    """

    __slots__ = ("events", "held", "hold_s", "min_windows", "idle_s", "chunk_events", "fresh",
                 "replayed", "_idle_since_s", "_done", "_seen_n")

    def __init__(self, hold_s: float = HOLD_S, min_windows: float = MIN_WINDOWS,
                 idle_s: float = IDLE_S, chunk_events: int = CHUNK_EVENTS) -> None:
        self.events: list[tuple[str, tuple[Any, ...]]] = []
        self.held: list[Final] = []  # the live attributor's finals, not handed out
        self.hold_s = hold_s
        self.min_windows = min_windows
        self.idle_s = idle_s
        self.chunk_events = chunk_events
        self.fresh: Attributor | None = None  # the replacement, while the replay runs
        self.replayed: list[Final] = []  # its finals so far
        self._idle_since_s: float | None = None  # since when nothing has been in flight
        self._done = 0  # events replayed
        self._seen_n = 0  # events recorded at the previous `settle`

    def record(self, call: str, *args: Any) -> None:
        """The attributor was called: `call` is the method's name, `args` its arguments (for
        `advance`: now_s, then the newest sample time, s, or None before the first)."""
        self.events.append((call, args))

    def hold_over(self, now_s: float, in_flight: int) -> bool:
        """Whether the hold ends without the windows wanted: the backend has had nothing in
        flight for `idle_s`, the first held final is `hold_s` old, or the record is full."""
        if in_flight:
            self._idle_since_s = None
        elif self._idle_since_s is None:
            self._idle_since_s = now_s
        return len(self.events) > MAX_EVENTS or bool(self.held) and (
            now_s - self.held[0].end_s > self.hold_s
            or self._idle_since_s is not None and now_s - self._idle_since_s >= self.idle_s)

    def settle(self, attributor: Attributor, finals: list[Final],
               weights: Callable[[], TokenWeights | None], windows: float, now_s: float,
               make: Callable[[], Attributor], *, ending: bool = False,
               ) -> tuple[Attributor, list[Final], bool]:
        """Take one `advance`'s finals. Returns (the attributor to use from now on, the finals
        to hand out now, whether the cold start is over: then drop this object). `weights()`:
        the best fit the learner can give now (None: only the prior), from `windows` fit
        windows; `ending`: the owner stops (replay all now if there is a fit, else release).

        The replay starts once the fit rests on `min_windows` windows, or when the hold is over
        with a fit from fewer; it goes a chunk of the record per call (`chunk_events`, twice
        what was recorded since the previous call, or a twentieth of what is left, whichever is
        most), so no call stalls the caller for long; the live attributor carries on (its
        finals held) until the replay has caught up."""
        self.held.extend(finals)
        if self.fresh is None:
            if not (ending or windows >= self.min_windows
                    or self.hold_over(now_s, attributor.open_requests)):
                return attributor, [], False
            fit = weights()
            if fit is None:
                return attributor, self.held, True  # nothing learned: as first settled
            self.fresh = make()
            self.fresh.weights = fit
            self.fresh.host = attributor.host  # the same host timeline; its books start over
            self._seen_n = len(self.events)
        fresh = self.fresh
        grown = len(self.events) - self._seen_n
        self._seen_n = len(self.events)
        backlog = len(self.events) - self._done
        # At least a twentieth of what is left, so a long record catches up within 20 samples,
        # well inside the accounting's wait for a final.
        step = max(self.chunk_events, 2 * grown, backlog // 20)
        self._replay(fresh, len(self.events) if ending else self._done + step)
        if self._done < len(self.events):
            return attributor, [], False
        fresh.samples_until_s = math.inf
        self.replayed.extend(fresh.advance(now_s))
        self.events.clear()
        return fresh, self.replayed, True

    def _replay(self, attributor: Attributor, until: int) -> None:
        """Apply the record's calls up to index `until` to `attributor` (fresh, on the same
        timeline, so an `advance` settles only with the samples it had then)."""
        events, done, finals = self.events, self._done, self.replayed
        until = min(until, len(events))
        for call, args in events[done:until]:
            if call == "advance":
                attributor.samples_until_s = args[1] if args[1] is not None else -math.inf
                finals.extend(attributor.advance(args[0]))
            else:
                getattr(attributor, call)(*args)
        self._done = until
