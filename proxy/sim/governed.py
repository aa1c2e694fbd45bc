"""The governor in `joulegate simulate` (policies named `...+governor`): decide.py driven in
virtual time over the fleet's engines, applying its caps as the live `apply` mode would.

The fleet calls `sample` at each of its power samples (every 100 ms of virtual time) with
each backend's requests in flight and requests routed to it so far; every `interval_s` the
governor decides from the time-averaged load since its last decision (arrivals / s, and by
Little's law the mean request time) and sets each engine's `power_cap_w`. It also books the
time each backend spent at each cap. Units: seconds, watts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from policies.model import EfficiencyModel
from proxy.governor.capmodel import min_limit_w
from proxy.governor.decide import BackendInput, GovernorParams, decide
from proxy.sim.engine import Engine

INTERVAL_S = 15.0


class VirtualGovernor:
    """decide.py over simulated engines (one GPU each)."""

    def __init__(self, names: Sequence[str], engines: Sequence[Engine], models: Sequence[EfficiencyModel],
                 slo_ttft_s: float, slo_tpot_s: float, interval_s: float = INTERVAL_S) -> None:
        self.names, self.engines, self.models = list(names), list(engines), list(models)
        self.interval_s = interval_s
        self.params = GovernorParams(slo_ttft_s=slo_ttft_s, slo_tpot_s=slo_tpot_s, hold_s=0.9 * interval_s)
        n = len(self.names)
        self._last_s = 0.0
        self._next_s = interval_s
        self._routed = [0] * n
        self._load_s = [0.0] * n  # integral of requests in flight since the last decision
        self._last_change_s: list[float | None] = [None] * n
        self.changes = [0] * n
        self.parks_advised = [0] * n
        self.time_at_cap_s: list[dict[float, float]] = [{} for _ in range(n)]

    def _cap_w(self, b: int) -> float:
        eng = self.engines[b]
        return eng.power_cap_w if eng.power_cap_w is not None else eng.profile.board_limit_w

    def sample(self, t_s: float, in_flight: Sequence[int], routed: Sequence[int], dt_s: float) -> None:
        """One fleet power sample at `t_s`, `dt_s` after the previous one."""
        for b in range(len(self.names)):
            self._load_s[b] += in_flight[b] * dt_s
            cap = self._cap_w(b)
            self.time_at_cap_s[b][cap] = self.time_at_cap_s[b].get(cap, 0.0) + dt_s
        if t_s + 1e-9 < self._next_s:
            return
        span_s = max(t_s - self._last_s, 1e-9)
        inputs = []
        for b, name in enumerate(self.names):
            rate = (routed[b] - self._routed[b]) / span_s
            mean_load = self._load_s[b] / span_s
            board_w = self.engines[b].profile.board_limit_w
            inputs.append(BackendInput(
                name=name, model=self.models[b], in_flight=in_flight[b], arrival_rate_per_s=rate,
                mean_request_s=mean_load / rate if rate > 0 else 0.0, gpus=1,
                min_w=min_limit_w(board_w), max_w=board_w, cap_w=self._cap_w(b),
                last_change_s=self._last_change_s[b]))
        for b, d in enumerate(decide(inputs, self.params, t_s)):
            if d.cap_w != inputs[b].cap_w:
                board_w = self.engines[b].profile.board_limit_w
                self.engines[b].power_cap_w = None if d.cap_w >= board_w else d.cap_w
                self._last_change_s[b] = t_s
                self.changes[b] += 1
            self.parks_advised[b] += d.park
        self._routed = list(routed)
        self._load_s = [0.0] * len(self.names)
        self._last_s = t_s
        self._next_s = t_s + self.interval_s

    def summary(self) -> dict[str, Any]:
        """Per backend: seconds at each cap (W, as a string key), cap changes, parking advice."""
        return {name: {"time_at_cap_s": {f"{cap:g}": round(s, 3) for cap, s in sorted(self.time_at_cap_s[b].items())},
                       "cap_changes": self.changes[b], "park_advised_intervals": self.parks_advised[b]}
                for b, name in enumerate(self.names)}
