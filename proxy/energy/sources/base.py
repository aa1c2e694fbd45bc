"""The PowerSource interface: one backend's GPUs -> a stream of PowerSample.

A source samples in the background every `interval_s` seconds and hands each sample to the
`on_sample` callback on the event loop's thread. It never raises into its caller: when the far
end fails it sets `healthy = False` and `last_error`, retries with exponential backoff and
recovers by itself. It never emits a sum with a hole: when one of several selected GPUs fails a
read, the whole sample is skipped. Sources hand their per-GPU readings to `_emit_reads`, which
tracks each GPU's counter (resets and wraps per GPU, implausible steps discarded: see
counters.py), so the summed `energy_j` they emit is continuous.

Units: `t_s` seconds of the proxy's wall clock (`time.time()`), `energy_j` joules (a cumulative
counter, summed over the selected GPUs), `power_w` watts (instantaneous, summed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from proxy.config import PowerConfig
from proxy.energy.sources.counters import GpuCounters
from proxy.energy.sources.counters import GpuRead as GpuRead  # re-exported to the sources
from proxy.energy.sources.counters import sum_or_none as sum_or_none  # the sources' one import
from proxy.redact import redact_text, redact_url

log = logging.getLogger("joulegate.power")

#: How a source obtained its numbers; `method` on a source says which one it uses now.
METHOD_ENERGY_COUNTER = "energy_counter"  # a cumulative mJ counter (preferred)
METHOD_POWER_INSTANT = "power_instant"  # instantaneous power, integrated by the timeline
METHOD_POWER_AVERAGE = "power_average"  # a 1 s averaged power reading: the last resort


@dataclass(frozen=True, slots=True)
class PowerSample:
    """One reading of a backend's GPUs.

    t_s: the proxy's wall clock (`time.time()`, seconds), offset-corrected for remote hosts.
    energy_j: cumulative energy counter of all the backend's selected GPUs summed, joules;
        None when a GPU has no counter (then the timeline integrates `power_w`).
    power_w: instantaneous power summed over the same GPUs, watts; None when unknown.
    gap_before: readings since the previous sample were discarded (or a counter was re-based):
        the energy in between is interpolated, so requests there are `estimated`.
    """

    t_s: float
    energy_j: float | None
    power_w: float | None
    gap_before: bool = False
    host_energy_j: float | None = None  # the host's CPU + DRAM counter (RAPL, via the agent), J


SampleCallback = Callable[[PowerSample], None]


class Backoff:
    """Exponential retry delay in seconds: initial_s, doubling up to max_s, with +-10 % jitter."""

    def __init__(self, initial_s: float = 0.2, max_s: float = 5.0) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self._next_s = initial_s

    def next_s(self) -> float:
        delay_s = self._next_s
        self._next_s = min(self.max_s, self._next_s * 2.0)
        return delay_s * random.uniform(0.9, 1.1)

    def reset(self) -> None:
        self._next_s = self.initial_s


def gpu_key_matches(selector: int | str, index: int | None, uuid: str | None) -> bool:
    """Whether a `power.gpus` entry names the GPU with this index / UUID.

    An int or an all-digit string is an index; anything else is compared with the UUID
    (case-insensitive; the `GPU-` prefix is optional).
    """
    if isinstance(selector, int) or (isinstance(selector, str) and selector.strip().isdigit()):
        return index is not None and int(selector) == index
    if uuid is None:
        return False
    want = selector.strip().lower()
    have = uuid.lower()
    return have == want or have == f"gpu-{want}" or have.removeprefix("gpu-") == want


def select_gpus(selectors: Sequence[int | str], gpus: Iterable[tuple[int | None, str | None]]
                ) -> list[int] | None:
    """Positions in `gpus` (pairs of index, uuid) that `selectors` ask for, in selector order.

    Empty selectors select every GPU. None when some selector matches no GPU: the caller skips
    the sample rather than emit a sum with a hole.
    """
    pairs = list(gpus)
    if not selectors:
        return list(range(len(pairs)))
    chosen: list[int] = []
    for selector in selectors:
        for pos, (index, uuid) in enumerate(pairs):
            if gpu_key_matches(selector, index, uuid):
                if pos not in chosen:
                    chosen.append(pos)
                break
        else:
            return None
    return chosen


class PowerSource(ABC):
    """Background sampler of one backend's GPUs; see the module docstring for the contract.

    Public state, read by the app and /v1/energy/backends:
      healthy: the last attempt reached the far end and gave a usable reading.
      last_error: one line describing the last failure (kept after recovery), or None.
      last_sample_s: the proxy wall-clock time (s) of the last emitted sample, or None.
      method: METHOD_ENERGY_COUNTER, METHOD_POWER_INSTANT or METHOD_POWER_AVERAGE once known.
      counters.resets / counters.discarded: GPU counter restarts seen, readings discarded.
    """

    kind: ClassVar[str] = "?"

    def __init__(self, config: PowerConfig, on_sample: SampleCallback) -> None:
        self.config = config
        self.interval_s = float(config.interval_s)
        self.healthy = False
        self.last_error: str | None = None
        self.last_sample_s: float | None = None
        self.method: str | None = None
        self.samples_emitted = 0
        self._on_sample = on_sample
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._last_emitted_t_s: float | None = None
        self.counters = GpuCounters(slack_s=max(0.25, 2.0 * self.interval_s))
        self._discard_logged = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} healthy={self.healthy} method={self.method} error={self.last_error!r}>"

    async def start(self) -> None:
        """Begin sampling in a background task; returns at once, never raises."""
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._guarded_run(), name=f"power-source-{self.kind}")

    async def close(self) -> None:
        """Stop sampling and release resources; safe to call twice or without start()."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        try:
            await self._release()
        except Exception as exc:  # noqa: BLE001 - closing must not raise
            log.warning("%s source: error while closing: %s", self.kind, exc)
        self.healthy = False

    async def _guarded_run(self) -> None:
        """`_run` restarted after any unexpected error, so a bug never silently ends sampling."""
        backoff = Backoff(1.0, 30.0)
        while not self._closed:
            try:
                await self._run()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a source never dies of an error
                log.exception("%s source: sampler crashed; restarting", self.kind)
                self._failed(f"internal error: {type(exc).__name__}: {exc}")
                await asyncio.sleep(backoff.next_s())

    @abstractmethod
    async def _run(self) -> None:
        """Sample until cancelled, handling the far end's failures itself."""

    async def _release(self) -> None:
        """Free what `_run` acquired (clients, NVML); called by close() after cancelling."""
        return None

    # -- helpers for subclasses -------------------------------------------------------------

    def _emit(self, sample: PowerSample) -> bool:
        """Hand a sample to the callback; skip it if its time does not move forward."""
        if self._last_emitted_t_s is not None and sample.t_s <= self._last_emitted_t_s:
            return False
        if sample.energy_j is None and sample.power_w is None:
            return False
        self._last_emitted_t_s = sample.t_s
        self.last_sample_s = sample.t_s
        self.samples_emitted += 1
        try:
            self._on_sample(sample)
        except Exception:  # noqa: BLE001 - the consumer's bug must not stop sampling
            log.exception("%s source: on_sample callback failed", self.kind)
        return True

    def _emit_reads(self, t_s: float, reads: Sequence[GpuRead], host_energy_j: float | None = None) -> bool:
        """Check per-GPU readings taken at `t_s` (s) and emit their continuous sum (with the
        host's energy counter, J, where the source reads one)."""
        step = self.counters.step(t_s, reads)
        if step.resets:
            log.warning("%s source %s: %d GPU energy counter(s) restarted; counting on from their "
                        "new values", self.kind, self._where(), step.resets)
        if step.discarded:
            if not self._discard_logged:  # once per source: a flapping GPU must not flood the log
                self._discard_logged = True
                log.warning("%s source %s: discarded an implausible reading (%s); the gap is "
                            "interpolated and requests in it are estimated (further discards are "
                            "only counted)", self.kind, self._where(), step.reason)
            return False
        return self._emit(PowerSample(t_s, step.energy_j, step.power_w, step.gap_before, host_energy_j))

    def _ok(self) -> None:
        if not self.healthy:
            if self.last_error is not None:
                log.info("%s source %s: recovered", self.kind, self._where())
            self.healthy = True

    def _failed(self, error: str) -> None:
        error = redact_text(error)  # httpx and others quote URLs, which may hold secrets
        if self.healthy or error != self.last_error:
            log.warning("%s source %s: %s", self.kind, self._where(), error)
        self.healthy = False
        self.last_error = error

    def _set_method(self, method: str | None) -> None:
        if method != self.method and method is not None:
            if method == METHOD_POWER_AVERAGE:
                log.warning("%s source %s: using the 1 s averaged power reading, the last resort; "
                            "short requests' joules will be smeared", self.kind, self._where())
            else:
                log.info("%s source %s: using %s", self.kind, self._where(), method)
        self.method = method

    def _where(self) -> str:
        return redact_url(self.config.url) if self.config.url else ",".join(str(g) for g in self.config.gpus) or "all GPUs"

