"""The governor in `joulegate simulate` (policies named `...+governor`): decide.py driven in
virtual time over the fleet's engines, applying its caps as the live `apply` mode would.

The fleet calls `sample` at each of its power samples (every 100 ms of virtual time) with
each backend's requests in flight and requests routed to it so far; every `interval_s` the
governor decides from the time-averaged load since its last decision (arrivals / s, and by
Little's law the mean request time) and sets each engine's `power_cap_w`. It also books the
time each backend spent at each cap.

With `parking` (proxy/sim/parking.py) it also parks and wakes, as the live apply mode does
(proxy/governor/actuate.py): parked and waking backends are left out of the decision; if any is
parked and `wake_advice` says the others no longer cover their expected load, the first parked
one is woken (one wake-up at a time); otherwise at most one backend per interval is parked, one
that `decide` advises parking (the dearest idle first) and that was idle (nothing routed, nothing
in flight) for the whole interval before. Between two decisions, at every sample, a burst that
leaves no awake backend the router's SLO guard lets take more wakes one at once (burst.py; at
most one such wake-up per interval). Units: seconds, watts.

With an attainment target (`slo_target`) each decision first moves the fleet clock
(proxy/governor/clock.py) from the latency of the requests that finished since the last one, as
the live apply mode does, and caps follow it where it is deeper than the model's choice; between
decisions each cap follows its backend's queue (proxy/governor/follow.py).

Under the carbon objective (`cost_factor`: grams per joule of a backend now) parking ranks by
grams rather than joules: the idle backend parked first is the one whose idle power costs the
most grams, a wake-up (for capacity or on demand) wakes the parked backend that would serve for
the fewest grams, and a swap (decide.swap_advice) wakes a cheaper parked backend and drains the
one it relieves (nothing new is routed to it once the other is up), which is parked when empty.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from policies.efficiency import takes_more
from policies.model import EfficiencyModel
from proxy.governor.burst import at_now, burst_wake_advice
from proxy.governor.capmodel import min_limit_w
from proxy.governor.clock import ClockParams, FleetClock, next_clock
from proxy.governor.decide import (
    BackendInput,
    Decision,
    GovernorParams,
    cheapest_to_wake,
    decide,
    idle_cost_rate,
    swap_advice,
    wake_advice,
)
from proxy.governor.fast import fast_raise_advice
from proxy.governor.follow import FollowParams, follow_advice
from proxy.sim.engine import Engine
from proxy.sim.parking import FleetParking

INTERVAL_S = 15.0


class VirtualGovernor:
    """decide.py over simulated engines (one GPU each)."""

    def __init__(self, names: Sequence[str], engines: Sequence[Engine], models: Sequence[EfficiencyModel],
                 slo_ttft_s: float, slo_tpot_s: float, interval_s: float = INTERVAL_S,
                 parking: FleetParking | None = None,
                 cost_factor: Callable[[int, float], float] | None = None, caps: bool = True,
                 fast: bool = False, slo_target: float | None = None) -> None:
        self.names, self.engines, self.models = list(names), list(engines), list(models)
        self.parking = parking
        # Carbon objective: backend index, t_s -> grams per joule now; a parked backend on a grid
        # now cleaner wakes to take the load back (decide.swap_advice). None: joules, no swaps.
        self.cost_factor = cost_factor
        self.caps = caps  # False: caps are decided (parking reads the decisions) but not set
        if parking is not None and cost_factor is not None:
            parking.wake_choice = self._cheapest_asleep
        self.swaps = [0] * len(self.names)
        self.interval_s = interval_s
        # `fast`: deeper caps, raised at once when a queue forms between two decisions (fast.py);
        # an attainment target has its own between decisions (follow.py) and excludes it.
        if fast and slo_target is not None:
            raise ValueError("the fast raise and an attainment target exclude each other")
        self.params = GovernorParams(slo_ttft_s=slo_ttft_s, slo_tpot_s=slo_tpot_s, hold_s=0.9 * interval_s,
                                     rewake_s=interval_s, fast=fast and caps, slo_target=slo_target)
        # With an attainment target: the fleet's clock (each model's SLO tally feeds it).
        self.clock = FleetClock()
        self.clock_params = ClockParams(slo_target) if slo_target is not None else None
        self.clocks: list[tuple[float, float]] = []  # (t_s, clock ratio) at each decision
        # ... and between decisions each cap follows its backend's queue (follow.py).
        self.follow = FollowParams() if slo_target is not None and caps else None
        if slo_target is not None:
            for m in self.models:
                m.slo_limits_s = (slo_ttft_s, slo_tpot_s)
        n = len(self.names)
        self._last_s = 0.0
        self._next_s = interval_s
        self._routed = [0] * n
        self._load_s = [0.0] * n  # integral of requests in flight since the last decision
        self._cap_ws = [0.0] * n  # integral of the cap (W s) since the last decision
        self._last_change_s: list[float | None] = [None] * n
        self.changes = [0] * n
        self.parks_advised = [0] * n
        self.time_at_cap_s: list[dict[float, float]] = [{} for _ in range(n)]
        self._idle_since_s: list[float | None] = [None] * n  # idle for every interval since
        self._last_park_s: float | None = None
        self._decided: dict[int, BackendInput] = {}  # the last decision's input, by backend
        self._last_burst_wake_s: float | None = None
        self.burst_wakes = [0] * n
        self._safe_w: dict[int, float | None] = {}  # the last decision's safe cap, by backend
        self._last_fast_s: list[float | None] = [None] * n
        self.fast_raised: list[list[tuple[float, float, float]]] = [[] for _ in range(n)]  # (t_s, from W, to W)
        self._decided_w: dict[int, float] = {}  # the last decision's cap, by backend (follow)
        self._last_move_s: list[float | None] = [None] * n  # a decision's or a follow's
        self.follow_moves = [0] * n

    def _input(self, b: int, in_flight: int, rate_per_s: float, mean_request_s: float,
               t_s: float) -> BackendInput:
        board_w = self.engines[b].profile.board_limit_w
        return BackendInput(
            name=self.names[b], model=self.models[b], in_flight=in_flight, arrival_rate_per_s=rate_per_s,
            mean_request_s=mean_request_s, gpus=1, min_w=min_limit_w(board_w), max_w=board_w,
            cap_w=self._cap_w(b), last_change_s=self._last_change_s[b],
            cost_per_j=self.cost_factor(b, t_s) if self.cost_factor is not None else 1.0)

    def _asleep_inputs(self, parked: Sequence[int], t_s: float) -> list[BackendInput]:
        return [self._input(b, 0, 0.0, 0.0, t_s) for b in parked]

    def _cheapest_asleep(self, asleep: list[int], t_s: float) -> int:
        """Carbon objective: the asleep backend that would serve for the fewest grams now."""
        name = cheapest_to_wake(self._asleep_inputs(asleep, t_s))
        return self.names.index(name) if name is not None else asleep[0]

    def _cap_w(self, b: int) -> float:
        eng = self.engines[b]
        return eng.power_cap_w if eng.power_cap_w is not None else eng.profile.board_limit_w

    def sample(self, t_s: float, in_flight: Sequence[int], routed: Sequence[int], dt_s: float) -> None:
        """One fleet power sample at `t_s`, `dt_s` after the previous one."""
        for b in range(len(self.names)):
            self._load_s[b] += in_flight[b] * dt_s
            cap = self._cap_w(b)
            self.time_at_cap_s[b][cap] = self.time_at_cap_s[b].get(cap, 0.0) + dt_s
            self._cap_ws[b] += cap * dt_s
        if t_s + 1e-9 < self._next_s:
            if self.params.fast:
                self._fast(t_s, in_flight)
            if self.follow is not None:
                self._follow(t_s, in_flight)
            if self.parking is not None:
                self._between(t_s, in_flight)
            return
        span_s = max(t_s - self._last_s, 1e-9)
        up = [b for b in range(len(self.names)) if self.parking is None or self.parking.routable(b)]
        inputs = []
        for b in up:
            rate = (routed[b] - self._routed[b]) / span_s
            mean_load = self._load_s[b] / span_s
            x = self._input(b, in_flight[b], rate, mean_load / rate if rate > 0 else 0.0, t_s)
            # With the fast raise the model learnt at the mean cap since the last decision; otherwise
            # at the cap in force, exactly (a mean of equal caps may round below the board limit).
            if self.params.fast:
                x = replace(x, learned_cap_w=self._cap_ws[b] / span_s)
            elif b in self._decided_w:  # following a queue moved the cap: decide from the last decision's
                x = replace(x, cap_w=self._decided_w[b])
            inputs.append(x)
        if self.clock_params is not None:
            wait_s = self.params.wake_wait_share * self.params.slo_ttft_s
            ratios = [x for m in self.models for x in m.slo_ratios]
            for m in self.models:
                m.slo_ratios.clear()
            room = [takes_more(self.models[b].plan(self.params.slo_ttft_s, self.params.slo_tpot_s), in_flight[b],
                               self.models[b].waiting, self.models[b].oldest_wait_s(t_s), wait_s) for b in up]
            self.clock = next_clock(self.clock, ratios, self.clock_params, saturated=not any(room))
            self.clocks.append((t_s, self.clock.clock))
        decisions = decide(inputs, self.params, t_s, self.clock.clock)
        self._decided = dict(zip(up, inputs, strict=True))
        self._safe_w = {b: d.safe_cap_w for b, d in zip(up, decisions, strict=True)}
        self._decided_w = {b: d.cap_w for b, d in zip(up, decisions, strict=True)} if self.follow else {}
        for b, x, d in zip(up, inputs, decisions, strict=True):
            if self.caps and d.cap_w != x.cap_w:
                self._last_change_s[b] = t_s
                self.changes[b] += 1
            if self.caps and d.cap_w != self._cap_w(b):
                self._set_cap(b, d.cap_w)
                self._last_move_s[b] = t_s
            self.parks_advised[b] += d.park
        if self.parking is not None:
            self._park_or_wake(t_s, up, inputs, decisions, in_flight, routed)
        self._routed = list(routed)
        self._load_s = [0.0] * len(self.names)
        self._cap_ws = [0.0] * len(self.names)
        self._last_s = t_s
        self._next_s = t_s + self.interval_s

    def _park_or_wake(self, t_s: float, up: Sequence[int], inputs: Sequence[BackendInput],
                      decisions: Sequence[Decision], in_flight: Sequence[int], routed: Sequence[int]) -> None:
        """Wake one parked backend if the others near their capacity; else park at most one."""
        parking = self.parking
        assert parking is not None
        for b in range(len(self.names)):
            idle = (b in up and in_flight[b] == 0 and self._load_s[b] == 0.0
                    and routed[b] == self._routed[b])
            since = self._idle_since_s[b]
            self._idle_since_s[b] = (self._last_s if since is None else since) if idle else None
        parked = parking.parked()
        draining = [b for b in up if parking.draining[b]]
        if parked and wake_advice(inputs, self.params) is not None:
            self._wake_for_capacity(t_s, draining, parked)
            return
        if parked and self.cost_factor is not None and not parking.waking() and not draining:
            swap = swap_advice(self._asleep_inputs(parked, t_s), inputs, self.params)
            if swap is not None:
                woken, relieved = self.names.index(swap.wake), self.names.index(swap.relieve)
                parking.wake(woken, t_s)
                parking.hand_over(woken, relieved)
                self.swaps[woken] += 1
                return
        for b in draining:  # a swap's second half: relieved and now empty
            if in_flight[b] == 0 and self.engines[b].current_step is None and not self.engines[b].has_work:
                parking.park(b, t_s)
                self._last_park_s, self._idle_since_s[b] = t_s, None
                return
        if self._last_park_s is not None and t_s - self._last_park_s < 0.9 * self.interval_s:
            return  # at most one park per interval
        advised = [(b, x) for b, x, d in zip(up, inputs, decisions, strict=True) if d.park]
        for b, _ in sorted(advised, key=lambda bx: -idle_cost_rate(bx[1])):
            since = self._idle_since_s[b]
            if since is not None and t_s - since >= 0.9 * self.interval_s:
                parking.park(b, t_s)
                self._last_park_s, self._idle_since_s[b] = t_s, None
                return

    def _wake_for_capacity(self, t_s: float, draining: Sequence[int], parked: Sequence[int]) -> int | None:
        """Capacity is short: draining backends take new requests again (they are awake), else
        one parked backend wakes (one wake-up at a time); the one woken, if any."""
        parking = self.parking
        assert parking is not None
        if draining:  # the capacity is needed: a draining backend is awake already
            for b in draining:
                parking.undrain(b)
            return None
        if parking.waking():
            return None
        wake = parked[0]
        if self.cost_factor is not None:  # carbon: the cleanest, not the first listed
            wake = self._cheapest_asleep([b for b in parked if parking.asleep_since_s[b] is not None]
                                         or list(parked), t_s)
        parking.wake(wake, t_s)
        return wake

    def _fast(self, t_s: float, in_flight: Sequence[int]) -> None:
        """Between two decisions: raise a capped backend's cap at once when a queue forms on it
        (proxy/governor/fast.py); the next decision may lower it again."""
        for b, decided in self._decided.items():
            if self.parking is not None and not self.parking.routable(b):
                continue
            model = self.models[b]
            now = replace(at_now(decided, in_flight[b], model.waiting, model.oldest_wait_s(t_s)), cap_w=self._cap_w(b))
            advice = fast_raise_advice(now, self.params, self._safe_w.get(b), t_s, self._last_fast_s[b])
            if advice is not None:
                self.fast_raised[b].append((round(t_s, 3), advice.previous_cap_w, advice.cap_w))
                self._set_cap(b, advice.cap_w)
                self._last_fast_s[b] = t_s

    def _follow(self, t_s: float, in_flight: Sequence[int]) -> None:
        """Between two decisions, under an attainment target: each cap follows its backend's
        queue (proxy/governor/follow.py)."""
        assert self.follow is not None
        for b, decided in self._decided.items():
            decided_w = self._decided_w.get(b)
            if decided_w is None or (self.parking is not None and not self.parking.routable(b)):
                continue
            model = self.models[b]
            now = replace(at_now(decided, in_flight[b], model.waiting, model.oldest_wait_s(t_s)), cap_w=self._cap_w(b))
            move = follow_advice(now, decided_w, self.clock.clock, self.params.slo_ttft_s, self.follow, t_s,
                                 self._last_move_s[b])
            if move is not None:
                self._set_cap(b, move.cap_w)
                self._last_move_s[b] = t_s
                self.follow_moves[b] += 1

    def _set_cap(self, b: int, cap_w: float) -> None:
        board_w = self.engines[b].profile.board_limit_w
        self.engines[b].power_cap_w = None if cap_w >= board_w else cap_w

    def _between(self, t_s: float, in_flight: Sequence[int]) -> None:
        """Between two decisions: wake a parked backend at once when the awake ones cannot carry
        a burst (proxy/governor/burst.py)."""
        parking = self.parking
        assert parking is not None
        if parking.waking() or all(since is None for since in parking.asleep_since_s):
            return
        up = [b for b in range(len(self.names)) if parking.routable(b)]
        # A backend woken since the last decision has no input of its own yet: no load but now's.
        now = [at_now(self._decided.get(b) or self._input(b, 0, 0.0, 0.0, t_s), in_flight[b],
                      self.models[b].waiting, self.models[b].oldest_wait_s(t_s))
               for b in up if not parking.draining[b]]
        if burst_wake_advice(now, self.params, t_s, self._last_burst_wake_s) is None:
            return
        self._last_burst_wake_s = t_s
        woken = self._wake_for_capacity(t_s, [b for b in up if parking.draining[b]], parking.parked())
        if woken is not None:
            self.burst_wakes[woken] += 1

    def summary(self) -> dict[str, Any]:
        """Per backend: seconds at each cap (W, as a string key), cap changes, parking advice;
        with parking, also seconds asleep, wake-ups and the parked intervals; with an attainment
        target, the fleet clock after each decision ([t_s, ratio])."""
        out: dict[str, Any] = {}
        for b, name in enumerate(self.names):
            caps = sorted(self.time_at_cap_s[b].items())
            out[name] = {"time_at_cap_s": {f"{cap:g}": round(s, 3) for cap, s in caps},
                         "cap_changes": self.changes[b], "park_advised_intervals": self.parks_advised[b],
                         "fast_raises": len(self.fast_raised[b]), "fast_raised": self.fast_raised[b]}
            if self.clock_params is not None:  # the fleet's, the same for every backend
                out[name]["fleet_clock"] = [[round(t_s, 3), round(c, 4)] for t_s, c in self.clocks]
                out[name]["follow_moves"] = self.follow_moves[b]
            if self.parking is not None:
                out[name].update(self.parking.summary(b))
                out[name]["burst_wakes"] = self.burst_wakes[b]
                if self.cost_factor is not None:
                    out[name]["swap_wakes"] = self.swaps[b]
        return out
