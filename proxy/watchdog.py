"""Stream time limits: a client that stops reading, a backend that stops sending, a long stream.

uvicorn's `send` waits while the socket's write buffer is full, so a client that stops reading
would pin its request, its upstream connection and its slot on the GPU for as long as it liked.
A sweep once a second finds sends that made no progress for `write_timeout_s` and cancels the
task stuck in them; the relay then treats the client as gone. The same sweep cuts a stream whose
backend sent no chunk for `idle_timeout_s` (while the relay was not busy sending) or that has
run `max_s` in all. Per relayed chunk the cost is three attribute writes and two increments, no
clock read and no timer; limits are kept to within one sweep period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger("joulegate.watchdog")

_INCOMPLETE = "ASGI callable returned without completing response."


class _ExpectedIncomplete(logging.Filter):
    """uvicorn logs an ERROR when an app returns mid-response. After a cut that is the intent,
    already logged as a warning: drop one such line per cut. uvicorn logs it synchronously as
    the app returns, and the relay does not await between the cut and its return. (Should the
    client vanish in that instant, uvicorn stays silent and the next such line is dropped.)"""

    def __init__(self) -> None:
        super().__init__()
        self.pending = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if self.pending and record.getMessage() == _INCOMPLETE:
            self.pending -= 1
            return False
        return True


_expected = _ExpectedIncomplete()
logging.getLogger("uvicorn.error").addFilter(_expected)


class SendGuard:
    """One stream's progress. The relay sets `sending` around each `send`, counts completed ones
    in `sends` and upstream chunks in `chunks`; `expired` and `reason` are set just before the
    watchdog cancels the task: "client" (stopped reading), "idle" (backend silent) or "max"."""

    __slots__ = ("task", "sending", "sends", "chunks", "_seen", "_stalled_s", "_chunks_seen", "_idle_s",
                 "_age_s", "expired", "reason")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.sending = False
        self.sends = 0
        self.chunks = 0
        self._seen = -1
        self._stalled_s = 0.0
        self._chunks_seen = 0
        self._idle_s = 0.0
        self._age_s = 0.0
        self.expired = False
        self.reason = ""


class SendWatchdog:
    """Cancels streams whose client has not taken a byte for `write_timeout_s` seconds, whose
    backend sent nothing for `idle_timeout_s`, or that have run for `max_s` (None: no cap)."""

    def __init__(self, write_timeout_s: float, period_s: float = 1.0, idle_timeout_s: float | None = None,
                 max_s: float | None = None) -> None:
        self.write_timeout_s = write_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_s = max_s
        self.period_s = min(period_s, write_timeout_s, idle_timeout_s or period_s, max_s or period_s)
        self.cut = 0  # requests cut so far
        self._guards: set[SendGuard] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def guard(self) -> SendGuard:
        """Watch the current task's sends until `release`."""
        task = asyncio.current_task()
        assert task is not None
        guard = SendGuard(task)
        self._guards.add(guard)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="send-watchdog")
        return guard

    def release(self, guard: SendGuard) -> None:
        self._guards.discard(guard)
        if guard.expired and guard.reason == "client":
            _expected.pending += 1  # the response stays incomplete on purpose

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    def check(self) -> None:
        """One sweep: a guard stuck in the same send since the last sweep has stalled a period;
        one with no new upstream chunk, and not sending, has idled a period."""
        period_s = self.period_s
        for guard in list(self._guards):
            if guard.sending and guard.sends == guard._seen:
                guard._stalled_s += period_s
                if guard._stalled_s >= self.write_timeout_s:
                    self._cut(guard, "client")
                    continue
            else:
                guard._seen = guard.sends
                guard._stalled_s = 0.0
            if guard.sending or guard.chunks != guard._chunks_seen:
                guard._chunks_seen = guard.chunks
                guard._idle_s = 0.0  # a slow client is the write timeout's business, not idleness
            else:
                guard._idle_s += period_s
                if self.idle_timeout_s is not None and guard._idle_s >= self.idle_timeout_s:
                    self._cut(guard, "idle")
                    continue
            guard._age_s += period_s
            if self.max_s is not None and guard._age_s >= self.max_s:
                self._cut(guard, "max")

    def _cut(self, guard: SendGuard, reason: str) -> None:
        guard.expired = True
        guard.reason = reason
        self.cut += 1
        self._guards.discard(guard)
        guard.task.cancel()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            self.check()
