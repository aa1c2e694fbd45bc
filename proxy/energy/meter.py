"""The live energy meter: power sources feed timelines, the relay feeds attributors.

One `BackendMeter` per backend with a power source. The relay calls `open`, `tokens` and
`close` (all cheap, on the hot path); each power sample advances attribution and turns
finished requests' values from `estimated` into `measured`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from policies.model import EfficiencyModel
from proxy.config import Config, PowerConfig
from proxy.energy.attribution import Attributor, Final
from proxy.energy.attribution.restate import EARLY_WINDOWS, ColdStart
from proxy.energy.learn import SplitLearner
from proxy.energy.sources import PowerSample, PowerSource, make_source
from proxy.energy.timeline import EnergyTimeline

log = logging.getLogger("joulegate.energy")

#: How many recent finals feed a backend's "recent tokens per joule".
_RECENT_FINALS = 512
#: How often (s) the meters check for silent power sources and extend their modelled bridge.
_WATCH_S = 0.25
#: "Recent" for the largest gap between power samples (s of wall clock).
_GAP_WINDOW_S = 300.0
#: The fields of `BackendMeter.power_health`, in /v1/energy/backends.
POWER_HEALTH_KEYS = ("power_clock_offset_s", "power_sample_gap_s", "power_last_sample_age_s",
                     "power_samples_discarded", "power_counter_resets")


@dataclass(slots=True)
class EnergyResult:
    """A request's energy as reported on its response or its final record."""

    joules: float
    tokens_per_joule: float
    backend: str
    method: str  # measured | estimated
    host_joules: float = 0.0  # host (CPU, DRAM) share, split like the GPU's (proxy/carbon.py)

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
        self._prefill_weight = config.energy.prefill_weight
        self._idle = config.energy.idle
        self.attributor = self._new_attributor()
        self._on_final = on_final
        self.learner = SplitLearner(config.energy.prefill_weight) if config.energy.learn else None
        # Until the split weights are learned, the attributor's calls are recorded and its
        # finals held, to be settled again with the learned weights (restate.py).
        hold_s = config.energy.cold_start_hold_s
        self.cold: ColdStart | None = ColdStart(hold_s) if self.learner is not None and hold_s > 0 else None
        # Host energy (power.host_w, constant), sampled at the GPU's sample times.
        self.host_w = power.host_w
        if self.host_w is not None:
            self.attributor.host = EnergyTimeline()
        self.source: PowerSource | None = make_source(power, self._on_sample)
        self.last_power_w: float | None = None
        self._recent: deque[tuple[int, float]] = deque(maxlen=_RECENT_FINALS)
        self._last_sample_s: float | None = None
        self.efficiency: EfficiencyModel | None = None  # set by the app: learns from samples
        # Source liveness: silent for `stale_s`, it counts as down and the energy since its last
        # reading is modelled (bridged on the timeline, settled `estimated`) until it is back.
        self.stale_s = power.stale_s
        self.source_up = True
        self.down_since_s: float | None = None  # last reading before the outage (wall clock s)
        self.modelled_j = 0.0  # joules the model has bridged since start
        self._heard_s = time.time()  # when a reading last arrived (or the meter was made)
        self._bridged = False  # the timeline ends in a bridge: the next reading's step is modelled
        self._gaps: deque[tuple[float, float]] = deque()  # (heard s, s since the previous sample)

    def _new_attributor(self) -> Attributor:
        return Attributor(self.timeline, prefill_weight=self._prefill_weight, idle=self._idle)

    def _on_sample(self, sample: PowerSample) -> None:
        prev_s = self.timeline.last_sample_s
        if sample.energy_j is not None:
            self.timeline.add_energy_sample(sample.t_s, sample.energy_j)
        elif sample.power_w is not None:
            self.timeline.add_power_sample(sample.t_s, sample.power_w)
        else:
            return
        if sample.host_energy_j is not None:  # the agent's RAPL counter beats a constant
            if self.attributor.host is None or self.attributor.host.kind == "power":
                self.attributor.host = EnergyTimeline()
            self.attributor.host.add_energy_sample(sample.t_s, sample.host_energy_j)
        elif self.host_w is not None and self.attributor.host is not None \
                and self.attributor.host.kind != "energy":
            self.attributor.host.add_power_sample(sample.t_s, self.host_w)
        self._heard_s = time.time()
        if not self.source_up:
            self.source_up = True
            log.warning("power source of %s is back after %.1f s; energy is measured again",
                        self.name, self._heard_s - (self.down_since_s or self._heard_s))
        # A bridge, or readings the source discarded as implausible (their gap is interpolated):
        # either way the step to this reading is not measured.
        if (self._bridged or sample.gap_before) and prev_s is not None \
                and self.timeline.last_sample_s != prev_s:
            self._bridged = False
            self.mark_modelled(prev_s, self.timeline.last_sample_s or prev_s)
        elif self.learner is not None and prev_s is not None and sample.t_s > prev_s:
            self.learner.interval(prev_s, sample.t_s, self.timeline.joules_between(prev_s, sample.t_s))
            self.learner.weights.apply_to(self.attributor)
        if self._last_sample_s is not None and sample.t_s > self._last_sample_s:
            self._note_gap(self._heard_s, sample.t_s - self._last_sample_s)
        self.last_power_w = sample.power_w if sample.power_w is not None else self.timeline.power_w_at(sample.t_s)
        if self.efficiency is not None and self._last_sample_s is not None and sample.t_s > self._last_sample_s:
            interval_w = self.timeline.joules_between(self._last_sample_s, sample.t_s) / (
                sample.t_s - self._last_sample_s)
            self.efficiency.power_sample(sample.t_s, interval_w)
        self._last_sample_s = sample.t_s
        self.settle(time.time())

    def check(self, now_s: float) -> None:
        """Bridge a silent source's gap up to `now_s` with modelled power (W, from the learned
        efficiency model) so requests keep settling, as `estimated`; never waits on the source."""
        if self.source is None or now_s - self._heard_s <= self.stale_s:
            return
        if self.source_up:
            self.source_up = False
            self.down_since_s = self._heard_s
            self.last_power_w = None
            log.warning("power source of %s silent for %.1f s (%s); modelling its energy",
                        self.name, now_s - self._heard_s, self.source.last_error or "no error")
        if self.efficiency is not None:
            power_w = self.efficiency.modelled_power_w(now_s)
        else:
            power_w = self.attributor.idle_w or 0.0
        tl = self.timeline
        if tl.last_sample_s is None:  # never heard from: bridge from when it should have spoken
            tl.add_modelled_power(self._heard_s, power_w)
        from_s = tl.last_sample_s
        assert from_s is not None
        if now_s <= from_s:
            return
        tl.add_modelled_power(now_s, power_w)
        self.mark_modelled(from_s, now_s)
        self.modelled_j += power_w * (now_s - from_s)
        self._bridged = True
        self.settle(now_s)

    def _note_gap(self, heard_s: float, gap_s: float) -> None:
        """Keep the intervals between samples of the last _GAP_WINDOW_S, as a running maximum
        (a deque whose values fall from head to tail), so the largest is at the head."""
        gaps = self._gaps
        while gaps and gaps[-1][1] <= gap_s:
            gaps.pop()
        gaps.append((heard_s, gap_s))
        while gaps[0][0] < heard_s - _GAP_WINDOW_S:
            gaps.popleft()

    def sample_gap_s(self, now_s: float) -> float | None:
        """The largest interval (s) between power samples in the last _GAP_WINDOW_S, the silence
        since the last sample included; None before the first sample."""
        if self._last_sample_s is None:
            return None
        while self._gaps and self._gaps[0][0] < now_s - _GAP_WINDOW_S:
            self._gaps.popleft()
        recent_s = self._gaps[0][1] if self._gaps else 0.0
        return max(recent_s, now_s - self._heard_s)

    def power_health(self, now_s: float | None = None) -> dict[str, float | int | None]:
        """How far the power readings can be trusted: the source's clock offset (s, remote minus
        ours; None where it reads local clocks), largest recent sample gap (s), readings
        discarded as implausible and GPU counter restarts seen (counts since start)."""
        now_s = time.time() if now_s is None else now_s
        source = self.source
        offset_s = getattr(source, "offset_s", None)
        return {
            "power_clock_offset_s": offset_s if isinstance(offset_s, float) else None,
            "power_sample_gap_s": self.sample_gap_s(now_s),
            "power_last_sample_age_s": now_s - self._heard_s if self._last_sample_s is not None else None,
            "power_samples_discarded": source.counters.discarded if source else 0,
            "power_counter_resets": source.counters.resets if source else 0,
        }

    @property
    def held_n(self) -> int:
        """Finals a cold start holds until the split weights are learned (0 once it is over)."""
        cold = self.cold
        return len(cold.held) if cold is not None else 0

    def mark_modelled(self, a_s: float, b_s: float) -> None:
        """The timeline's joules over [a_s, b_s] are a model's guess (Attributor.mark_modelled)."""
        self.attributor.mark_modelled(a_s, b_s)
        if self.cold is not None:
            self.cold.record("mark_modelled", a_s, b_s)

    def settle(self, now_s: float | None = None, *, ending: bool = False) -> None:
        """Settle what the samples and the other replicas' weights allow; hand out finals.
        `ending`: the proxy stops, so a cold start's held finals go out now."""
        cold = self.cold
        if cold is not None:
            cold.record("advance", now_s, self.timeline.last_sample_s)
        finals = self.attributor.advance(now_s)
        if cold is not None:
            finals = self._settle_cold(cold, finals, time.time() if now_s is None else now_s, ending)
        for final in finals:
            self._recent.append((final.completion_tokens, final.joules))
            self._on_final(self.name, final)

    def _settle_cold(self, cold: ColdStart, finals: list[Final], now_s: float, ending: bool) -> list[Final]:
        """Hold finals while the weights are the prior; once learned, settle the record again."""
        a = self.attributor
        if a.publish_local or a.foreign_until_s != math.inf or self.learner is None:
            # Replicas share this backend: the others split with the weights already published.
            self.cold = None
            return cold.held + finals
        learner = self.learner
        windows = learner.weights.intervals
        try:
            fresh, out, over = cold.settle(a, finals, lambda: learner.early_weights(EARLY_WINDOWS),
                                           windows, now_s, self._new_attributor, ending=ending)
        except Exception:  # never lose what was settled: the held finals go out as they are
            log.exception("restating the first requests of %s failed; booked as first settled", self.name)
            self.cold = None
            return cold.held
        if fresh is not a:
            log.info("%s: %d requests of the cold start settled again with learned split weights "
                     "(%.0f fit windows)", self.name, len(out), windows)
            self.attributor = fresh
        if over:
            self.cold = None
        return out

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
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        now_s = time.time()
        for meter in self.meters.values():
            if meter.source is not None:
                meter._heard_s = now_s
                await meter.source.start()
        if self.meters:
            self._watch = asyncio.create_task(self._watch_sources(), name="power-watch")

    async def _watch_sources(self) -> None:
        while True:
            await asyncio.sleep(_WATCH_S)
            now_s = time.time()
            for meter in self.meters.values():
                try:
                    meter.check(now_s)
                except Exception:  # a bug here must not stop the watch for the other backends
                    log.exception("power watch failed for %s", meter.name)

    def load_state(self, path: str, now_s: float) -> None:
        """Resume each backend's split-weight fit from `path` (EnergyConfig.state_file); a
        missing, unreadable or malformed file leaves the priors (logged)."""
        try:
            saved = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("energy state %s not read (%s); split weights start from the prior", path, exc)
            return
        for name, meter in self.meters.items():
            state = saved.get(name) if isinstance(saved, dict) else None
            if meter.learner is None or not isinstance(state, dict):
                continue
            try:
                weights = meter.learner.restore(state, now_s)
            except ValueError as exc:
                log.warning("energy state of %s not used: %s", name, exc)
                continue
            weights.apply_to(meter.attributor)
            if weights.learned:
                meter.cold = None  # not a cold start: the weights are learned already
            log.info("split weights of %s resumed from %s (%.1f windows of evidence left)",
                     name, path, weights.intervals)

    def save_state(self, path: str) -> None:
        """Write every backend's split-weight fit to `path` (atomically: a temp file renamed)."""
        state = {name: m.learner.state() for name, m in self.meters.items() if m.learner is not None}
        if not state:
            return
        target = Path(path)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(state), encoding="utf-8")
            os.replace(tmp, target)
        except OSError as exc:
            log.warning("energy state not saved to %s: %s", path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        for meter in self.meters.values():
            if meter.source is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(meter.source.close(), 5)
            if meter.cold is not None:  # a cold start's held finals are booked before we stop
                meter.settle(time.time(), ending=True)

    def power_health(self, backend: str) -> dict[str, float | int | None]:
        """BackendMeter.power_health of `backend`, every field None where it has no source."""
        meter = self.meters.get(backend)
        return meter.power_health() if meter is not None else dict.fromkeys(POWER_HEALTH_KEYS)

    def open(self, backend: str, request_id: str, start_s: float, stream: bool, prompt_tokens: int,
             embedding: bool = False) -> None:
        meter = self.meters.get(backend)
        if meter is not None:
            meter.attributor.open(request_id, start_s, stream, prompt_tokens, embedding)
            if meter.cold is not None:  # recorded once the attributor took it
                meter.cold.record("open", request_id, start_s, stream, prompt_tokens, embedding)
            if meter.learner is not None:
                meter.learner.open(request_id, start_s, stream, prompt_tokens, embedding)

    def tokens(self, backend: str, request_id: str, t_s: float, count: int) -> None:
        meter = self.meters.get(backend)
        if meter is not None:
            meter.attributor.tokens(request_id, t_s, count)
            if meter.cold is not None:
                meter.cold.record("tokens", request_id, t_s, count)
            if meter.learner is not None:
                meter.learner.tokens(request_id, t_s, count)

    def abort(self, backend: str, request_id: str, t_s: float) -> None:
        """The request never reached the backend (connection refused): it takes no energy."""
        meter = self.meters.get(backend)
        if meter is not None:
            # A request with no tokens has no weight: it takes energy only from slices where it
            # was alone, which are microseconds long for a refused connection.
            meter.attributor.close(request_id, t_s, 0, 0)
            if meter.cold is not None:
                meter.cold.record("close", request_id, t_s, 0, 0)
            if meter.learner is not None:
                meter.learner.close(request_id, t_s, 0, 0)

    def close_request(self, backend: str, request_id: str, end_s: float, prompt_tokens: int,
                      completion_tokens: int, embedding: bool) -> EnergyResult | None:
        """The request's energy now (estimated unless samples already cover it)."""
        meter = self.meters.get(backend)
        if meter is None:
            return None
        estimate = meter.attributor.close(request_id, end_s, prompt_tokens, completion_tokens)
        if meter.cold is not None:
            meter.cold.record("close", request_id, end_s, prompt_tokens, completion_tokens)
        if meter.learner is not None:
            meter.learner.close(request_id, end_s, prompt_tokens, completion_tokens)
        if meter.cold is not None and estimate.method == "measured":
            # Settled already, but with the prior weights: the final comes with the restatement.
            estimate = replace(estimate, method="estimated")
        tokens = prompt_tokens if embedding else completion_tokens
        a = meter.attributor
        host_j = estimate.joules * a.host_attributed_j / a.books.attributed_j \
            if a.books.attributed_j > 0 else 0.0  # an estimate: the host/GPU ratio so far
        return EnergyResult(estimate.joules, tokens_per_joule(tokens, estimate.joules), backend,
                            estimate.method, host_j)
