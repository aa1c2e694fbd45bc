"""Parking in `joulegate simulate`: simulated engines that the governor put to sleep.

The virtual-time counterpart of the live governor's apply mode (proxy/governor/park.py). When
to park and when to wake is decided in proxy/sim/governed.py from decide.py's advice; this
module holds what the fleet needs to honour it:

- asleep: the engine draws its profile's `sleep_w`; the router never picks the backend.
- waking: for `wake_s` after a wake-up starts the backend is still not routed to, and its
  engine draws its awake idle power (the weights are being loaded back).
- a request that finds no awake backend with room waits for a wake-up (one under way, or one
  started for it, `on_demand`) and is routed again when it ends, as the live relay does; the
  wait is in its TTFT. Which asleep backend wakes: the first, or `wake_choice`'s pick.
- draining: a backend relieved by a swap (the governor woke a cheaper one to take its load)
  takes nothing new once the one it hands over to is awake, unless no other has room; the
  governor parks it when it is empty.

Energy stays exact: the engine books idle time at the draw in force before each change
(`Engine.set_sleep_w`), so asleep time is idle energy at sleep power. Units: seconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from proxy.sim.engine import Engine

__all__ = ["DEFAULT_WAKE_S", "FleetParking"]

#: Seconds a wake-up takes by default: a small model's weights back from CPU memory (the
#: simulated backend's `--wake-s` default too).
DEFAULT_WAKE_S = 2.0


class FleetParking:
    """Asleep and waking state of each backend of a virtual fleet, by backend index."""

    def __init__(self, engines: Sequence[Engine], wake_s: float = DEFAULT_WAKE_S) -> None:
        if not wake_s >= 0:
            raise ValueError("wake_s must be >= 0")
        self.engines, self.wake_s = list(engines), wake_s
        n = len(self.engines)
        self.asleep_since_s: list[float | None] = [None] * n
        self.waking_until_s: list[float | None] = [None] * n
        self.parked_s = [0.0] * n  # time asleep, at sleep power
        self.wakes = [0] * n
        self.on_demand_wakes = [0] * n
        self.intervals: list[list[tuple[float, float]]] = [[] for _ in range(n)]  # (parked, woken)
        self.waiting: list[int] = []  # requests (trace indices) waiting for a wake-up
        self.next_s = math.inf  # the earliest end of a wake-up under way: the fleet's next event
        self.draining = [False] * n
        self._handover: dict[int, int] = {}  # waking backend -> the one it relieves once awake
        # (asleep backends, t_s) -> the one to wake on demand; None: the first. The carbon
        # objective's governor sets it so a request wakes the cleanest, not the first listed.
        self.wake_choice: Callable[[list[int], float], int] | None = None

    def routable(self, b: int) -> bool:
        """Neither asleep nor waking: the router may pick it."""
        return self.asleep_since_s[b] is None and self.waking_until_s[b] is None

    def accepts(self, b: int) -> bool:
        """Routable and not draining: the router may send it new requests."""
        return self.routable(b) and not self.draining[b]

    def hand_over(self, woken: int, relieved: int) -> None:
        """Once `woken` (waking now) is awake, drain `relieved`."""
        self._handover[woken] = relieved

    def undrain(self, b: int) -> None:
        """`b` takes new requests again (the fleet needs its capacity)."""
        self.draining[b] = False

    def parked(self) -> list[int]:
        """Backends asleep or waking, in fleet order (as the live pool lists its parked)."""
        return [b for b in range(len(self.engines)) if not self.routable(b)]

    def waking(self) -> bool:
        return self.next_s < math.inf

    def park(self, b: int, t_s: float) -> None:
        """Put idle backend `b` to sleep at `t_s`."""
        eng = self.engines[b]
        if eng.has_work or eng.current_step is not None or not self.routable(b):
            raise RuntimeError(f"backend {b} is busy or already parked")
        eng.set_sleep_w(eng.profile.sleep_w, t_s)
        self.asleep_since_s[b] = t_s
        self.draining[b] = False

    def wake(self, b: int, t_s: float, on_demand: bool = False) -> None:
        """Start waking asleep backend `b` at `t_s`; it is routable `wake_s` later."""
        since = self.asleep_since_s[b]
        if since is None:
            return  # awake, or already waking
        self.engines[b].set_sleep_w(None, t_s)  # loading weights: awake idle power from now
        self.parked_s[b] += t_s - since
        self.intervals[b].append((since, t_s))
        self.asleep_since_s[b] = None
        self.waking_until_s[b] = t_s + self.wake_s
        self.next_s = min(self.next_s, t_s + self.wake_s)
        self.wakes[b] += 1
        self.on_demand_wakes[b] += on_demand

    def wait(self, i: int, t_s: float) -> bool:
        """Request `i` found no awake backend with room: it waits for a wake-up under way, else
        wakes the first asleep backend. False when nothing is parked (the request is refused)."""
        if not self.waking():
            asleep = [b for b in range(len(self.engines)) if self.asleep_since_s[b] is not None]
            if not asleep:
                return False
            pick = self.wake_choice(asleep, t_s) if self.wake_choice is not None else asleep[0]
            self.wake(pick, t_s, on_demand=True)
        self.waiting.append(i)
        return True

    def finish_wakes(self, t_s: float) -> list[int]:
        """End the wake-ups due by `t_s`; the requests that waited, to be routed again now."""
        for b, until in enumerate(self.waking_until_s):
            if until is not None and until <= t_s:
                self.waking_until_s[b] = None
                relieved = self._handover.pop(b, None)
                if relieved is not None and self.routable(relieved):
                    self.draining[relieved] = True
        self.next_s = min((u for u in self.waking_until_s if u is not None), default=math.inf)
        waiting, self.waiting = self.waiting, []
        return waiting

    def close(self, end_s: float) -> None:
        """The run ends at `end_s`: book the time of backends still asleep."""
        for b, since in enumerate(self.asleep_since_s):
            if since is not None and end_s > since:
                self.parked_s[b] += end_s - since
                self.intervals[b].append((since, end_s))
                self.asleep_since_s[b] = end_s

    def summary(self, b: int) -> dict[str, Any]:
        """Backend `b`'s parking figures for the governor's JSON."""
        return {"parked_s": round(self.parked_s[b], 3), "wakes": self.wakes[b],
                "on_demand_wakes": self.on_demand_wakes[b],
                "parked_intervals_s": [[round(a, 3), round(z, 3)] for a, z in self.intervals[b]]}
