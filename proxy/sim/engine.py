"""A pure continuous-batching engine with ground-truth energy per request.

No asyncio and no clock reads: every call takes the time in seconds, so the same engine runs in
real time under `proxy.sim.server` and in virtual time under a fleet simulator. Times are on
the caller's clock (monotonic seconds); energies are in joules.

Driving it:

    engine.add(Request("r1", prompt_tokens=200, max_output_tokens=64), now_s)
    step = engine.plan_step(now_s)        # None when there is nothing to run
    ...wait until step.end_s...
    events = engine.finish_step(step)     # tokens emitted at step.end_s

While requests are running, steps run back to back (a step starts where the last one ended,
whatever `now_s` the caller passes), so a late caller never stretches the GPU timeline. Time
not covered by a step is idle: it accrues `idle_w` to the counter and to no request.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

from proxy.sim.capping import cap_step
from proxy.sim.profiles import GpuProfile

__all__ = ["Engine", "Request", "RequestRecord", "Step", "TokenEvent"]


@dataclass(frozen=True, slots=True)
class Request:
    """What a client asked for: token counts only. Embeddings are prefill-only."""

    request_id: str
    prompt_tokens: int
    max_output_tokens: int
    is_embedding: bool = False


@dataclass(slots=True)
class RequestRecord:
    """Ground truth for one request; times in engine seconds, energy in J."""

    request_id: str
    prompt_tokens: int
    max_output_tokens: int
    is_embedding: bool
    arrival_s: float
    first_token_s: float | None = None
    end_s: float | None = None
    completion_tokens: int = 0
    joules: float = 0.0
    finished: bool = False
    aborted: bool = False


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """`tokens` new tokens for one request at `time_s`; `finished` when it is done."""

    request_id: str
    tokens: int
    finished: bool
    time_s: float


@dataclass(slots=True)
class Step:
    """One engine iteration: the prefill phase (prompts of newly admitted requests, and
    embedding passes) at its own power, then one decode token each for the running requests at
    the decode power. `prefill_j` / `decode_j` are each request's joules of this step, in the
    order of `prefill` / `decode`; they sum to the phases' energies."""

    start_s: float
    end_s: float
    prefill: list[RequestRecord]
    decode: list[RequestRecord]
    prefill_tokens: int
    prefill_energy_j: float
    decode_energy_j: float
    prefill_s: float = 0.0  # the prefill phase is [start_s, start_s + prefill_s]
    prefill_j: list[float] = field(default_factory=list)
    decode_j: list[float] = field(default_factory=list)
    power_w: float = field(init=False)  # mean over the step

    def __post_init__(self) -> None:
        dur_s = self.end_s - self.start_s
        energy_j = self.prefill_energy_j + self.decode_energy_j
        self.power_w = energy_j / dur_s if dur_s > 0 else 0.0

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def energy_j(self) -> float:
        return self.prefill_energy_j + self.decode_energy_j

    @property
    def batch(self) -> int:
        """Requests in this step, prefilling or decoding."""
        return len(self.prefill) + len(self.decode)

    def power_at_w(self, at_s: float) -> float:
        """Board power in W at `at_s` inside the step: the prefill phase's, then the decode's."""
        split_s = self.start_s + self.prefill_s
        if at_s < split_s and self.prefill_s > 0:
            return self.prefill_energy_j / self.prefill_s
        decode_s = self.end_s - split_s
        return self.decode_energy_j / decode_s if decode_s > 0 else self.power_w

    def energy_until_j(self, at_s: float) -> float:
        """Joules of this step spent by `at_s` (piecewise linear over the two phases)."""
        if at_s <= self.start_s:
            return 0.0
        if at_s >= self.end_s:
            return self.energy_j
        split_s = self.start_s + self.prefill_s
        if at_s <= split_s:
            return self.prefill_energy_j * (at_s - self.start_s) / self.prefill_s
        return self.prefill_energy_j + self.decode_energy_j * (at_s - split_s) / (self.end_s - split_s)


class Engine:
    """vLLM-like scheduler: FIFO waiting queue, up to `profile.max_batch` running requests."""

    def __init__(self, profile: GpuProfile, *, start_s: float = 0.0, max_finished: int = 100_000) -> None:
        self.profile = profile
        self.max_finished = max_finished
        self._clock_s = start_s  # everything before this is in the counter
        self._energy_j = 0.0
        self._idle_j = 0.0
        self._attributed_j = 0.0
        # Insertion-ordered dicts: FIFO order plus O(1) removal on abort.
        self._waiting: dict[str, RequestRecord] = {}
        self._running: dict[str, RequestRecord] = {}
        self._finished: OrderedDict[str, RequestRecord] = OrderedDict()
        self._step: Step | None = None
        self._last_power_w = profile.idle_w
        self.power_cap_w: float | None = None  # a GPU power limit below the board's: proxy/sim/capping.py
        self.sleep_w: float | None = None  # while asleep (vLLM sleep mode): the idle draw; proxy/sim/sleep_api.py

    # -- requests ---------------------------------------------------------------------------

    def add(self, req: Request, now_s: float) -> RequestRecord:
        """Queue `req` arriving at `now_s`; ValueError for a duplicate live id or bad counts."""
        rid = req.request_id
        if rid in self._waiting or rid in self._running:
            raise ValueError(f"request id {rid!r} is already in flight")
        if req.prompt_tokens < 1:
            raise ValueError("prompt_tokens must be >= 1")
        if not req.is_embedding and req.max_output_tokens < 1:
            raise ValueError("max_output_tokens must be >= 1")
        self._finished.pop(rid, None)  # a reused id replaces the old ground truth
        rec = RequestRecord(
            request_id=rid,
            prompt_tokens=req.prompt_tokens,
            max_output_tokens=0 if req.is_embedding else req.max_output_tokens,
            is_embedding=req.is_embedding,
            arrival_s=now_s,
        )
        self._waiting[rid] = rec
        return rec

    def abort(self, request_id: str, now_s: float) -> bool:
        """Stop a request (client gone). A request inside the current step still pays for that
        step and leaves at its end; otherwise it leaves now. False if it was not in flight."""
        rec = self._waiting.pop(request_id, None)
        if rec is None:
            rec = self._running.get(request_id)
            if rec is None:
                return False
            rec.aborted = True
            if self._step is not None:
                return True  # finish_step removes it
            del self._running[request_id]
        rec.aborted = True
        self._retire(rec, max(now_s, rec.arrival_s))
        return True

    def record(self, request_id: str) -> RequestRecord | None:
        """Ground truth for a live or recently finished request."""
        return (
            self._running.get(request_id)
            or self._waiting.get(request_id)
            or self._finished.get(request_id)
        )

    def records(self) -> list[RequestRecord]:
        """All known records: waiting, running and the retained finished ones."""
        return [*self._waiting.values(), *self._running.values(), *self._finished.values()]

    # -- stepping ---------------------------------------------------------------------------

    def plan_step(self, now_s: float) -> Step | None:
        """Start the next step at `now_s` (or where the last one ended, while busy); None when
        nothing is running or waiting. The step's effects apply in `finish_step`."""
        if self._step is not None:
            raise RuntimeError("finish_step() the current step before planning another")
        if not self._running and not self._waiting:
            return None
        if self._running:
            start_s = self._clock_s
        else:
            # Idle GPU: it starts when the first waiting request arrived, even if the caller
            # noticed late, so wake-up latency does not show up as queueing.
            first = next(iter(self._waiting.values()))
            start_s = max(self._clock_s, min(now_s, first.arrival_s))
        self._accrue_idle(start_s)

        p = self.profile
        prefill: list[RequestRecord] = []
        prefill_tokens = 0
        free = p.max_batch - len(self._running)
        while self._waiting and len(prefill) < free:
            rec = next(iter(self._waiting.values()))
            # At least one request per step, however long its prompt.
            if prefill and prefill_tokens + rec.prompt_tokens > p.max_prefill_tokens:
                break
            del self._waiting[rec.request_id]
            prefill.append(rec)
            prefill_tokens += rec.prompt_tokens
        decode = list(self._running.values())
        for rec in prefill:
            self._running[rec.request_id] = rec

        # Physical cost per request, not token counts: a prompt's prefill grows faster than
        # linearly (attention), an embedding is an encoder pass at its own power, a decode
        # token costs a share of the weights read plus its own context's KV-cache reads.
        prefill_j: list[float] = []
        prefill_s = 0.0
        for rec in prefill:
            if rec.is_embedding:
                t_s = p.embed_s(rec.prompt_tokens)
                prefill_j.append(t_s * p.embed_power_w)
            else:
                t_s = p.prefill_s(rec.prompt_tokens)
                prefill_j.append(t_s * p.prefill_power_w)
            prefill_s += t_s
        decode_s, parts_s = p.decode_costs_s([r.prompt_tokens + r.completion_tokens for r in decode])
        decode_w = p.power_w(len(decode)) if decode else 0.0
        step = Step(
            start_s=start_s,
            end_s=start_s + prefill_s + decode_s,
            prefill=prefill,
            decode=decode,
            prefill_tokens=prefill_tokens,
            prefill_energy_j=math.fsum(prefill_j),
            decode_energy_j=decode_s * decode_w,
            prefill_s=prefill_s,
            prefill_j=prefill_j,
            decode_j=[x * decode_w for x in parts_s],
        )
        if self.power_cap_w is not None:
            step = cap_step(step, prefill_s, decode_s, self.power_cap_w, p.idle_w)
        self._step = step
        return step

    def finish_step(self, step: Step) -> list[TokenEvent]:
        """Apply `step` at its end: bill each request its own joules of the step, emit tokens,
        retire finished requests. Aborted requests pay their part but get no event."""
        if step is not self._step:
            raise RuntimeError("finish_step() takes the step returned by the last plan_step()")
        self._step = None
        end_s = step.end_s
        self._clock_s = end_s
        self._energy_j += step.energy_j
        self._attributed_j += step.energy_j
        self._last_power_w = step.power_at_w(end_s)
        events: list[TokenEvent] = []
        for rec, joules in zip(step.prefill, step.prefill_j, strict=True):
            rec.joules += joules
            if rec.is_embedding:
                done = True
            else:
                rec.completion_tokens = 1
                rec.first_token_s = end_s
                done = rec.max_output_tokens <= 1
            self._emit(rec, done, end_s, events)
        for rec, joules in zip(step.decode, step.decode_j, strict=True):
            rec.joules += joules
            rec.completion_tokens += 1
            self._emit(rec, rec.completion_tokens >= rec.max_output_tokens, end_s, events)
        return events

    def _emit(self, rec: RequestRecord, done: bool, end_s: float, events: list[TokenEvent]) -> None:
        if not rec.aborted:
            events.append(TokenEvent(rec.request_id, 0 if rec.is_embedding else 1, done, end_s))
        if done or rec.aborted:
            del self._running[rec.request_id]
            self._retire(rec, end_s)

    def _retire(self, rec: RequestRecord, end_s: float) -> None:
        rec.finished = True
        rec.end_s = end_s
        self._finished[rec.request_id] = rec
        while len(self._finished) > self.max_finished:
            self._finished.popitem(last=False)

    @property
    def idle_w(self) -> float:
        """Board power in W with nothing running: the profile's idle, or the sleep power."""
        return self.profile.idle_w if self.sleep_w is None else self.sleep_w

    def set_sleep_w(self, sleep_w: float | None, now_s: float) -> None:
        """Asleep drawing `sleep_w` W while idle, or awake (None). Idle energy up to `now_s` is
        booked at the old draw first, so the counter stays exact across the change."""
        if self._step is None and not self._running:
            self._accrue_idle(now_s)
        self.sleep_w = sleep_w

    def _accrue_idle(self, until_s: float) -> None:
        if until_s > self._clock_s:
            idle_j = (until_s - self._clock_s) * self.idle_w
            self._energy_j += idle_j
            self._idle_j += idle_j
            self._clock_s = until_s

    # -- readings ---------------------------------------------------------------------------

    def energy_j(self, at_s: float) -> float:
        """Cumulative board energy in J at `at_s`: interpolated within the current step,
        extrapolated at idle power while nothing runs. Monotonic in `at_s`."""
        return self._energy_j + self._pending_j(at_s)[0]

    def idle_energy_j(self, at_s: float) -> float:
        """The part of `energy_j(at_s)` that no request is billed for."""
        return self._idle_j + self._pending_j(at_s)[1]

    def attributed_energy_j(self, at_s: float) -> float:
        """The part of `energy_j(at_s)` billed (or, mid-step, being billed) to requests."""
        pending_j, pending_idle_j = self._pending_j(at_s)
        return self._attributed_j + (pending_j - pending_idle_j)

    def _pending_j(self, at_s: float) -> tuple[float, float]:
        """(energy, of which idle) between the clock and `at_s`, not yet in the counters."""
        step = self._step
        if step is not None:
            if at_s <= step.start_s or step.duration_s <= 0:
                return 0.0, 0.0
            return step.energy_until_j(at_s), 0.0
        if self._running or at_s <= self._clock_s:
            return 0.0, 0.0  # between two back-to-back steps
        idle_j = (at_s - self._clock_s) * self.idle_w
        return idle_j, idle_j

    def power_w(self, at_s: float) -> float:
        """Board power in W at `at_s`."""
        if self._step is not None:
            step = self._step
            return step.power_at_w(at_s) if at_s >= step.start_s else self.idle_w
        return self._last_power_w if self._running else self.idle_w

    @property
    def attributed_j(self) -> float:
        """Joules billed to requests so far (completed steps only)."""
        return self._attributed_j

    @property
    def clock_s(self) -> float:
        """Engine time up to which energy is accounted (end of the last step or idle gap)."""
        return self._clock_s

    @property
    def current_step(self) -> Step | None:
        return self._step

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of batch slots in use, in [0, 1] (a stand-in for KV-cache pressure)."""
        return len(self._running) / self.profile.max_batch

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting)
