"""Fewest requests on the engine (in flight, engine queue included)."""

from __future__ import annotations

from collections.abc import Sequence

from policies.base import BackendView, RequestInfo, eligible


class LeastLoaded:
    """The eligible backend with the fewest requests on its engine; ties go to the first listed."""

    name = "least_loaded"

    def choose(self, request: RequestInfo, views: Sequence[BackendView], now_s: float) -> str | None:
        candidates = eligible(views)
        if not candidates:
            return None
        best = min(candidates, key=lambda v: v.load)
        return best.name
