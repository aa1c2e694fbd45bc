"""The stream watchdog's sweep, one call at a time: what it cuts, when, and why."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from proxy.watchdog import SendGuard, SendWatchdog


def _sweeps(dog: SendWatchdog, n: int, between: Callable[[SendGuard], None]) -> SendGuard:
    """A guarded task, `n` sweeps with `between(guard)` before each; the guard afterwards."""
    async def main() -> SendGuard:
        ready: asyncio.Future[SendGuard] = asyncio.get_running_loop().create_future()

        async def stream() -> None:
            ready.set_result(dog.guard())
            await asyncio.sleep(3600)

        task = asyncio.create_task(stream())
        guard = await ready
        for _ in range(n):
            between(guard)
            dog.check()
        await asyncio.sleep(0)
        if guard.expired:  # a cut cancels the stream's task
            assert task.cancelling() or task.cancelled()
        task.cancel()
        await dog.close()
        return guard

    return asyncio.run(main())


def _chunk(guard: SendGuard) -> None:
    guard.chunks += 1


def test_a_silent_backend_is_cut_after_the_idle_timeout() -> None:
    dog = SendWatchdog(30.0, idle_timeout_s=3.0)
    assert not _sweeps(dog, 2, lambda g: None).expired  # 2 s of silence: not yet
    guard = _sweeps(SendWatchdog(30.0, idle_timeout_s=3.0), 4, lambda g: None)
    assert guard.expired and guard.reason == "idle"


def test_chunks_or_a_slow_client_are_not_idleness() -> None:
    assert not _sweeps(SendWatchdog(30.0, idle_timeout_s=2.0), 10, _chunk).expired

    def slow_send(guard: SendGuard) -> None:  # stuck in a send that progresses between sweeps
        guard.sending = True
        guard.sends += 1

    assert not _sweeps(SendWatchdog(30.0, idle_timeout_s=2.0), 10, slow_send).expired


def test_a_stream_past_its_cap_is_cut_however_lively() -> None:
    assert not _sweeps(SendWatchdog(30.0, idle_timeout_s=60.0), 10, _chunk).expired  # no cap by default
    guard = _sweeps(SendWatchdog(30.0, idle_timeout_s=60.0, max_s=5.0), 6, _chunk)
    assert guard.expired and guard.reason == "max"


def test_a_client_that_takes_nothing_is_cut_for_itself() -> None:
    def stuck(guard: SendGuard) -> None:
        guard.sending = True

    guard = _sweeps(SendWatchdog(3.0, idle_timeout_s=60.0), 5, stuck)
    assert guard.expired and guard.reason == "client"
