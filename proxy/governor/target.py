"""What the live governor (actuate.py) remembers of each backend, and where it reads from:
its power agent's limits URL and the proxy's request-duration histogram. Units: watts, seconds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

from proxy.backends import Backend
from proxy.governor.decide import BackendInput, Decision
from proxy.governor.fast import FastRaise
from proxy.governor.follow import CapMove
from proxy.metrics import Metrics
from proxy.power_limits import PATH

__all__ = ["Target", "durations", "limits_url"]


@dataclass
class Target:
    """One governed backend and what the governor remembers of it."""

    backend: Backend
    url: str | None  # the agent's limits URL; None: not governable
    client: httpx.AsyncClient | None = None
    gpus: list[dict[str, Any]] = field(default_factory=list)  # the last GET's entries
    original_w: dict[int, float] = field(default_factory=dict)  # before our first change
    applied_w: float | None = None
    last_change_s: float | None = None
    decision: Decision | None = None
    error: str | None = None
    seen: tuple[float, float, float, int] | None = None  # (t_s, completions, duration sum, in flight)
    idle_since_s: float | None = None  # nothing arrived nor ran since (monotonic s)
    decided: BackendInput | None = None  # the last decision's input (for the watch between)
    advised_w: float | None = None  # advise mode: the cap advised now (the last decision's, or raised)
    fast: FastRaise | None = None  # the last fast raise (applied or advised)
    fast_at_s: float | None = None  # when (monotonic s)
    fast_raises: int = 0
    follow: CapMove | None = None  # the last queue-following move (follow.py)
    moved_s: float | None = None  # when its cap last moved, by a decision or a follow (monotonic s)
    follow_moves: int = 0
    cap_ws: float = 0.0  # the cap held (W) integrated over time since `cap_since_s`
    cap_since_s: float | None = None  # (monotonic s)

    def learned_cap_w(self, held_w: float | None, now_s: float, since_s: float | None) -> float | None:
        """The time-weighted mean cap since `since_s` (`BackendInput.learned_cap_w`), `held_w`
        held since the last call; then starts over. None: no span yet, or no cap known."""
        self.hold(held_w, now_s)
        span_s = now_s - since_s if since_s is not None else 0.0
        mean_w = self.cap_ws / span_s if span_s > 0 and held_w is not None else None
        self.cap_ws = 0.0
        return mean_w

    def hold(self, held_w: float | None, now_s: float) -> None:
        """Book `held_w` as the cap held from the last mark until `now_s` (call before a change)."""
        if self.cap_since_s is not None and held_w is not None:
            self.cap_ws += held_w * (now_s - self.cap_since_s)
        self.cap_since_s = now_s


def limits_url(backend: Backend) -> str | None:
    power = backend.config.power
    if power.source not in ("agent", "sim") or not power.url:
        return None
    return power.url.rstrip("/") + PATH


def durations(metrics: Metrics, backend: str) -> tuple[float, float]:
    """(requests finished, their total duration in s) on `backend`, from the duration histogram."""
    count = total_s = 0.0
    for family in metrics.duration_s.collect():
        for sample in family.samples:
            if sample.labels.get("backend") == backend:
                if sample.name.endswith("_count"):
                    count += sample.value
                elif sample.name.endswith("_sum"):
                    total_s += sample.value
    return count, total_s
