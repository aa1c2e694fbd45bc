"""What a policy sees and what it answers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """The request being routed."""

    model: str
    prompt_tokens: int = 0
    max_output_tokens: int | None = None
    stream: bool = False


@dataclass(frozen=True, slots=True)
class BackendView:
    """A snapshot of one backend that serves the request's model.

    `in_flight` counts this proxy's open requests on it; `queued` is the engine's own waiting
    queue where its metrics are scraped (it includes other proxies' requests), else 0.
    """

    name: str
    healthy: bool
    in_flight: int
    queued: int = 0
    running: int | None = None
    max_concurrency: int | None = None
    # Where it runs, for carbon routing: facility / IT energy, and the grid's gCO2e/kWh now
    # (None: unknown).
    pue: float = 1.0
    gco2e_per_kwh: float | None = None

    @property
    def load(self) -> int:
        """Best estimate of requests on the engine now: the larger of ours and what it reports."""
        engine = (self.running or 0) + self.queued
        return max(self.in_flight, engine)

    @property
    def has_room(self) -> bool:
        return self.max_concurrency is None or self.in_flight < self.max_concurrency


class Policy(Protocol):
    """Chooses a backend for a request among candidate views, or None if none can take it."""

    name: str

    def choose(self, request: RequestInfo, views: Sequence[BackendView], now_s: float) -> str | None:
        ...


def eligible(views: Sequence[BackendView]) -> list[BackendView]:
    """Healthy backends with room; all healthy ones if none has room is left to the caller."""
    return [v for v in views if v.healthy and v.has_room]
