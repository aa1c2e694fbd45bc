"""Slow-client protection: a stream whose client stops reading is cut after a write timeout.

uvicorn's `send` waits while the socket's write buffer is full, so a client that stops reading
would pin its request, its upstream connection and its slot on the GPU for as long as it liked.
A sweep once a second finds sends that made no progress for `write_timeout_s` and cancels the
task stuck in them; the relay then treats the client as gone. Per relayed chunk the cost is
two attribute writes and an increment, no clock read.
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
    """One request's send progress. The relay sets `sending` around each `send` and counts
    completed ones in `sends`; `expired` is set just before the watchdog cancels the task."""

    __slots__ = ("task", "sending", "sends", "_seen", "_stalled_s", "expired")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.sending = False
        self.sends = 0
        self._seen = -1
        self._stalled_s = 0.0
        self.expired = False


class SendWatchdog:
    """Cancels requests whose client has not taken a byte for `write_timeout_s` seconds."""

    def __init__(self, write_timeout_s: float, period_s: float = 1.0) -> None:
        self.write_timeout_s = write_timeout_s
        self.period_s = min(period_s, write_timeout_s)
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
        if guard.expired:
            _expected.pending += 1  # the response stays incomplete on purpose

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    def check(self) -> None:
        """One sweep: a guard stuck in the same send since the last sweep has stalled a period."""
        for guard in list(self._guards):
            if guard.sending and guard.sends == guard._seen:
                guard._stalled_s += self.period_s
                if guard._stalled_s >= self.write_timeout_s and not guard.expired:
                    guard.expired = True
                    self.cut += 1
                    self._guards.discard(guard)
                    guard.task.cancel()
            else:
                guard._seen = guard.sends
                guard._stalled_s = 0.0

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            self.check()
