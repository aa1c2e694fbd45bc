"""Round robin over eligible backends, per model."""

from __future__ import annotations

from collections.abc import Sequence

from policies.base import BackendView, RequestInfo, eligible


class RoundRobin:
    """Each model's backends take turns; unhealthy or full ones are skipped."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next_by_model: dict[str, int] = {}

    def choose(self, request: RequestInfo, views: Sequence[BackendView], now_s: float) -> str | None:
        candidates = eligible(views)
        if not candidates:
            return None
        turn = self._next_by_model.get(request.model, 0)
        self._next_by_model[request.model] = turn + 1
        return candidates[turn % len(candidates)].name
