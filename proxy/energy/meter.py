"""The live energy meter: power sources feed timelines, the relay feeds attributors.

One `BackendMeter` per backend with a power source. The relay calls `open`, `tokens` and
`close` (all cheap, on the hot path); each power sample advances attribution and turns
finished requests' values from `estimated` into `measured`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from policies.model import EfficiencyModel
from proxy.config import Config, PowerConfig
from proxy.energy.attribution import Attributor, Final
from proxy.energy.sources import PowerSample, PowerSource, make_source
from proxy.energy.timeline import EnergyTimeline

log = logging.getLogger("joulegate.energy")

#: How many recent finals feed a backend's "recent tokens per joule".
_RECENT_FINALS = 512


@dataclass(slots=True)
class EnergyResult:
    """A request's energy as reported on its response or its final record."""

    joules: float
    tokens_per_joule: float
    backend: str
    method: str  # measured | estimated

    def as_dict(self) -> dict[str, float | str]:
        return {
            "joules": self.joules, "tokens_per_joule": self.tokens_per_joule,
            "backend": self.backend, "method": self.method,
        }


def tokens_per_joule(tokens: int, joules: float) -> float:
    return tokens / joules if joules > 0 else 0.0


class BackendMeter:
    """One backend's power source, timeline and attributor."""

    def __init__(self, name: str, power: PowerConfig, config: Config,
                 on_final: Callable[[str, Final], None]) -> None:
        self.name = name
        self.timeline = EnergyTimeline()
        self.attributor = Attributor(
            self.timeline, prefill_weight=config.energy.prefill_weight, idle=config.energy.idle,
        )
        self._on_final = on_final
        self.source: PowerSource | None = make_source(power, self._on_sample)
        self.last_power_w: float | None = None
        self._recent: deque[tuple[int, float]] = deque(maxlen=_RECENT_FINALS)
        self._last_sample_s: float | None = None
        self.efficiency: EfficiencyModel | None = None  # set by the app: learns from samples

    def _on_sample(self, sample: PowerSample) -> None:
        if sample.energy_j is not None:
            self.timeline.add_energy_sample(sample.t_s, sample.energy_j)
        elif sample.power_w is not None:
            self.timeline.add_power_sample(sample.t_s, sample.power_w)
        else:
            return
        self.last_power_w = sample.power_w if sample.power_w is not None else self.timeline.power_w_at(sample.t_s)
        if self.efficiency is not None and self._last_sample_s is not None and sample.t_s > self._last_sample_s:
            interval_w = self.timeline.joules_between(self._last_sample_s, sample.t_s) / (
                sample.t_s - self._last_sample_s)
            self.efficiency.power_sample(sample.t_s, interval_w)
        self._last_sample_s = sample.t_s
        self.settle(time.time())

    def settle(self, now_s: float | None = None) -> None:
        """Settle what the samples and the other replicas' weights allow; hand out finals."""
        for final in self.attributor.advance(now_s):
            self._recent.append((final.completion_tokens, final.joules))
            self._on_final(self.name, final)

    def recent_tokens_per_joule(self) -> float | None:
        """Completion tokens per joule over the last finalized requests."""
        tokens = sum(t for t, _ in self._recent)
        joules = sum(j for _, j in self._recent)
        return tokens / joules if joules > 0 else None

    def idle_w(self) -> float | None:
        """Power while nothing was in flight (moving average over idle sample intervals), W."""
        return self.attributor.idle_w


class EnergyMeter:
    """All backends' meters; what the relay and the energy API talk to."""

    def __init__(self, config: Config, on_final: Callable[[str, Final], None]) -> None:
        self.meters: dict[str, BackendMeter] = {}
        for backend in config.backends:
            if backend.power.source != "none":
                self.meters[backend.name] = BackendMeter(backend.name, backend.power, config, on_final)

    async def start(self) -> None:
        for meter in self.meters.values():
            if meter.source is not None:
                await meter.source.start()

    async def close(self) -> None:
        for meter in self.meters.values():
            if meter.source is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(meter.source.close(), 5)

    def open(self, backend: str, request_id: str, start_s: float, stream: bool, prompt_tokens: int) -> None:
        meter = self.meters.get(backend)
        if meter is not None:
            meter.attributor.open(request_id, start_s, stream, prompt_tokens)

    def tokens(self, backend: str, request_id: str, t_s: float, count: int) -> None:
        meter = self.meters.get(backend)
        if meter is not None:
            meter.attributor.tokens(request_id, t_s, count)

    def abort(self, backend: str, request_id: str, t_s: float) -> None:
        """The request never reached the backend (connection refused): it takes no energy."""
        meter = self.meters.get(backend)
        if meter is not None:
            # A request with no tokens has no weight: it takes energy only from slices where it
            # was alone, which are microseconds long for a refused connection.
            meter.attributor.close(request_id, t_s, 0, 0)

    def close_request(self, backend: str, request_id: str, end_s: float, prompt_tokens: int,
                      completion_tokens: int, embedding: bool) -> EnergyResult | None:
        """The request's energy now (estimated unless samples already cover it)."""
        meter = self.meters.get(backend)
        if meter is None:
            return None
        estimate = meter.attributor.close(request_id, end_s, prompt_tokens, completion_tokens)
        tokens = prompt_tokens if embedding else completion_tokens
        return EnergyResult(estimate.joules, tokens_per_joule(tokens, estimate.joules), backend, estimate.method)
