"""The governor's loop: every `governor.interval_s` read each backend's power limits and load,
call decide.py, and by `governor.mode`
  off:    nothing runs;
  advise: decisions logged with their reason, counted in `joulegate_governor_decisions_total`,
          the advised cap in `joulegate_governor_cap_watts` and in /v1/energy/backends (admin);
  apply:  the same, and caps set with `PUT /v1/power/limits` on the backend's power agent
          (power.source agent or sim, with power.token_file / token_env as the power source
          uses; the calls are target.py's), at most one decided change per backend per interval
          (the fast raise and the queue-following caps of an attainment target, follow.py, move
          caps between ticks); the limits found before the first change are put back when the
          proxy stops, and tried when the agent stops answering (an agent restores its own
          limits when it stops); and backends with a `park:` parked and woken (park.py): at most
          one park per interval, only a backend idle for a whole interval that decide.py would
          park; a parked one is woken when the unparked ones near their capacity
          (decide.wake_advice), when between two ticks a burst leaves none that the router's SLO
          guard lets take more (burst.py, looked at every WATCH_S), or when a request finds no
          other backend (the relay waits for it); all are woken when the proxy stops. Under the
          carbon objective parking ranks by grams: the idle backend with the most idle grams is
          parked first, a wake-up wakes the parked backend that would serve for the fewest
          grams, and a swap (decide.swap_advice) wakes a backend on a now-cleaner grid and
          drains the one it relieves (routed to only when no other has room), parked when empty.
Caps: backends with another power source are left alone (they may still be parked).

Load per backend, from what the proxy already keeps (nothing on the hot path): requests in
flight now, and from the request-duration histogram's deltas since the last tick the
completions per second and their mean duration; arrivals = completions + the change in
requests in flight. Units: watts, seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from dataclasses import replace
from typing import Any

import httpx

from policies.efficiency import takes_more
from proxy.backends import Backend, BackendPool
from proxy.carbon import grams
from proxy.config import Config
from proxy.energy.sources.agent import auth_headers, tls_verify
from proxy.governor.burst import at_now, burst_wake_advice
from proxy.governor.clock import ClockParams, FleetClock, next_clock
from proxy.governor.decide import (
    HOLD,
    BackendInput,
    Decision,
    GovernorParams,
    cheapest_to_wake,
    decide,
    idle_cost_rate,
    park_advice,
    swap_advice,
    wake_advice,
)
from proxy.governor.fast import (
    FAST_RAISE,
    FastRaise,
    fast_raise_advice,
)
from proxy.governor.follow import FOLLOW, CapMove, FollowParams, follow_advice
from proxy.governor.park import Parking
from proxy.governor.target import Target, durations, limits_url
from proxy.metrics import Metrics
from proxy.power_limits import HOLD_HEADER, HOLDER_HEADER

log = logging.getLogger("joulegate.governor")

CALL_TIMEOUT_S = 5.0
#: A governor's claim on an agent's limits lasts this many intervals unless a PUT renews it.
CLAIM_INTERVALS = 4
#: Seconds between two looks for a burst between decisions (apply mode, with parking).
WATCH_S = 0.1


class Governor:
    """Runs decide.py every interval and applies or advises its caps (see the module docstring)."""

    def __init__(self, config: Config, pool: BackendPool, metrics: Metrics) -> None:
        self.mode = config.governor.mode
        if self.mode == "apply" and metrics.multiprocess:
            # Every worker would govern the same GPUs: one must, and workers cannot elect one yet.
            log.warning("governor.mode apply needs a single worker; advising only")
            self.mode = "advise"
        self.interval_s = config.governor.interval_s
        self.caps = config.governor.caps  # False: parking only, no power limit is ever set
        slo = config.routing.slo
        # Deeper caps, raised at once when a queue forms between two ticks (fast.py).
        self.fast = self.caps and config.governor.fast_raise
        self.params = GovernorParams(slo_ttft_s=slo.ttft_ms / 1e3, slo_tpot_s=slo.tpot_ms / 1e3,
                                     hold_s=0.9 * self.interval_s,  # a tick a little early still counts
                                     rewake_s=self.interval_s, fast=self.fast,
                                     slo_target=config.governor.slo_target)
        # Attainment target (clock.py): in apply mode only, as its feedback is latency under the
        # caps it sets (advised caps change nothing, so the clock would only ever fall).
        target = config.governor.slo_target
        self.clock_params = ClockParams(target) if target is not None and self.mode == "apply" and self.caps else None
        self.clock = FleetClock()
        # ... and between ticks each cap follows its backend's queue (follow.py).
        self.follow = FollowParams() if self.clock_params is not None else None
        if self.clock_params is not None:
            for b in pool.backends:
                b.efficiency.slo_limits_s = (self.params.slo_ttft_s, self.params.slo_tpot_s)
        self.metrics = metrics
        self.targets = [Target(b, limits_url(b)) for b in pool.backends]
        self._task: asyncio.Task[None] | None = None
        # Parking acts only in apply mode, and only where some backend says how (park.via).
        parking = Parking(pool, metrics)
        self.parking: Parking | None = parking if self.mode == "apply" and parking.states else None
        self._last_park_s: float | None = None
        # Carbon objective: a parked backend whose grid got cleaner takes the load back
        # (decide.swap_advice); its cost factor is grams per joule at its site now.
        self.carbon = config.routing.objective == "carbon"
        if self.parking is not None and self.carbon:
            self.parking.choose_wake = self._cheapest_asleep  # a request wakes the cleanest
        self._handover: dict[str, str] = {}  # a swap's woken backend -> the one it relieves
        self._last_burst_wake_s: float | None = None  # monotonic s
        self.id = secrets.token_hex(8)  # this governor, to the agents it sets limits on

    async def start(self) -> None:
        if self.mode == "off":
            return
        if self.parking is not None:
            await self.parking.start()
        for t in self.targets:
            if t.url is not None:
                power = t.backend.config.power
                try:
                    # The claim headers: one governor at a time sets an agent's limits (power_limits.py).
                    claim = {HOLDER_HEADER: self.id, HOLD_HEADER: f"{CLAIM_INTERVALS * self.interval_s:g}"}
                    t.client = httpx.AsyncClient(timeout=CALL_TIMEOUT_S, headers={**auth_headers(power), **claim},
                                                 verify=tls_verify(power))
                except (OSError, ValueError) as exc:
                    t.error = f"agent credentials: {exc}"
                    log.warning("governor: backend %s: %s", t.backend.name, t.error)
        self._task = asyncio.create_task(self._loop(), name="joulegate-governor")

    async def close(self) -> None:
        """Stop, wake every parked backend, and put back every limit this governor changed."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.parking is not None:
            await self.parking.close()
        for t in self.targets:
            if t.original_w:
                await t.restore("the proxy stops")
            if t.client is not None:
                await t.client.aclose()

    def view(self, name: str) -> dict[str, Any] | None:
        """The governor's state for one backend, for the admin view of /v1/energy/backends."""
        if self.mode == "off":
            return None
        t = next((x for x in self.targets if x.backend.name == name), None)
        if t is None:
            return None
        d = t.decision
        return {"mode": self.mode, "governed": t.url is not None, "error": t.error,
                "cap_w": d.cap_w if d else None, "applied_cap_w": t.applied_w,
                "action": d.action if d else None, "reason": d.reason if d else None,
                "park": d.park if d else False, "park_reason": d.park_reason if d else None,
                "original_limits_w": {str(i): w for i, w in t.original_w.items()} or None,
                "safe_cap_w": d.safe_cap_w if d else None, "fast_raises": t.fast_raises,
                "fast_raise": ({"cap_w": t.fast.cap_w, "from_w": t.fast.previous_cap_w, "reason": t.fast.reason,
                                "age_s": round(time.monotonic() - t.fast_at_s, 3) if t.fast_at_s else None}
                               if t.fast else None),
                "follow": ({"cap_w": t.follow.cap_w, "from_w": t.follow.previous_cap_w, "reason": t.follow.reason,
                            "age_s": round(time.monotonic() - t.moved_s, 3) if t.moved_s else None}
                           if t.follow else None),
                "follow_moves": t.follow_moves if self.follow is not None else None,
                "clock": ({"ratio": self.clock.clock, "floor": self.clock.floor,
                           "latency_quantile": self.clock.quantile if math.isfinite(self.clock.quantile) else None,
                           "judged_requests": self.clock.judged,
                           "waiting_requests": sum(len(g) for g in self.clock.pending),
                           "slo_target": self.clock_params.target} if self.clock_params is not None else None),
                "parking": self.parking.view(name) if self.parking is not None else None}

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        deadline_s = loop.time()
        while True:
            deadline_s = max(deadline_s + self.interval_s, loop.time())
            # Every WATCH_S: with parking, look for a burst the awake backends cannot carry; with
            # the fast raise, for a queue forming under a cap; with a target, follow the queues.
            while ((self.parking is not None or self.fast or self.follow is not None)
                   and deadline_s - loop.time() > WATCH_S):
                await asyncio.sleep(WATCH_S)
                try:
                    self.watch()
                    await self.raise_fast()
                    await self.follow_queues()
                except Exception:
                    log.exception("governor watch failed")
            await asyncio.sleep(max(deadline_s - loop.time(), 0.0))
            try:
                await self.tick()
            except Exception:  # a bug must not stop the governor, nor the proxy
                log.exception("governor tick failed")

    async def tick(self) -> list[Decision]:
        """One round: read, decide, advise or apply; then park or wake (apply)."""
        now_s = time.monotonic()
        up = []
        for t in self.targets:
            if t.backend.parked:  # asleep: no load to read; its idle time starts over once woken
                t.seen = t.idle_since_s = None
                if self.mode == "apply" and t.client is not None:
                    await t.renew()
            else:
                up.append(t)
        ready = [t for t in up if self.caps and t.client is not None and await t.read_limits()]
        inputs = [self._input(t, now_s) for t in ready]
        if self.clock_params is not None:
            self._next_clock(up)
        decisions = decide(inputs, self.params, now_s, self.clock.clock)
        for t in self.targets:
            t.decided = None
        for t, i, d in zip(ready, inputs, decisions, strict=True):
            t.decided = i
            await self._act(t, d, now_s)
        if self.parking is not None:
            # Backends without a readable power agent get no cap but still count for parking.
            loads = list(zip(ready, inputs, strict=True)) + [(t, self._input(t, now_s)) for t in up
                                                             if t.url is None or not self.caps]
            for t, i in loads:
                t.decided = i
            await self._park_or_wake(loads, now_s)
        return decisions

    def _next_clock(self, up: list[Target]) -> None:
        """The fleet clock after this interval's finished requests (clock.py)."""
        assert self.clock_params is not None
        ratios: list[float] = []
        for t in self.targets:
            ratios += t.backend.efficiency.slo_ratios
            t.backend.efficiency.slo_ratios.clear()
        p, now_s = self.params, time.time()  # the models' clock
        max_wait_s = p.wake_wait_share * p.slo_ttft_s
        saturated = bool(up) and not any(
            takes_more(m.plan(p.slo_ttft_s, p.slo_tpot_s), t.backend.in_flight, m.waiting, m.oldest_wait_s(now_s),
                       max_wait_s) for t in up for m in (t.backend.efficiency,))
        before, self.clock = self.clock, next_clock(self.clock, ratios, self.clock_params, saturated)
        self.metrics.governor_clock.set(self.clock.clock)
        if self.clock.clock != before.clock:
            why = ("no backend takes one more request within the SLO, at two decisions in a row"
                   if saturated and before.saturated else
                   f"{100 * self.clock_params.target:g}th percentile of latency / SLO {self.clock.quantile:.2f} "
                   f"over {self.clock.judged} requests")
            log.info("governor: fleet clock %.2f (from %.2f; floor %.2f): %s", self.clock.clock, before.clock,
                     self.clock.floor, why)

    async def _park_or_wake(self, loads: list[tuple[Target, BackendInput]], now_s: float) -> None:
        """Wake one parked backend if the others near their capacity; else carry a swap on, or
        park at most one."""
        assert self.parking is not None
        serving = [(t, i) for t, i in loads if t.backend.healthy and not t.backend.circuit_open()]
        parked = self.parking.parked()
        draining = [t.backend for t, _ in serving if t.backend.draining]
        if parked:
            why = wake_advice([i for _, i in serving], self.params)
            if why is not None:
                self._wake_for_capacity(parked, draining, why)
                return
            swap = self._swap(parked, serving) if self.carbon and not draining and not self._handover else None
            if swap is not None:
                woken, relieved, why = swap
                self._handover[woken.name] = relieved.name
                self.parking.wake(woken, why)
                return
        self._carry_handover(serving)
        for t, _ in serving:  # a swap's second half: relieved and now empty
            if t.backend.draining and t.backend.in_flight == 0 and self.parking.parkable(t.backend):
                if await self.parking.park(t.backend, "relieved by a backend on a cleaner grid"):
                    t.backend.draining = False
                    self._last_park_s, t.idle_since_s = now_s, None
                return
        if self._last_park_s is not None and now_s - self._last_park_s < 0.9 * self.interval_s:
            return  # at most one park per interval
        advice = park_advice([i for _, i in serving], self.params)
        for t, _ in sorted(serving, key=lambda x: -idle_cost_rate(x[1])):
            idle_s = now_s - t.idle_since_s if t.idle_since_s is not None else 0.0
            if t.backend.name in advice and self.parking.parkable(t.backend) and idle_s >= 0.9 * self.interval_s:
                if await self.parking.park(t.backend, advice[t.backend.name]):
                    self._last_park_s = now_s
                    t.idle_since_s = None
                return

    def _wake_for_capacity(self, parked: list[Backend], draining: list[Backend], why: str) -> Backend | None:
        """Capacity is short: draining backends take new requests again (they are awake), else
        one parked backend wakes (not awaited); the one woken, if any."""
        assert self.parking is not None
        if draining:  # the capacity is needed: a draining backend is awake already
            for b in draining:
                b.draining = False
            self._handover.clear()
            return None
        wake = self._cheapest_asleep(parked) if self.carbon else parked[0]
        self.parking.wake(wake, why)  # not awaited: the governor goes on meanwhile
        return wake

    def watch(self) -> Backend | None:
        """Between two ticks: wake a parked backend at once when the awake ones cannot carry a
        burst (proxy/governor/burst.py); the one woken, if any."""
        if self.parking is None:
            return None
        parked = self.parking.parked()
        states = self.parking.states
        if not parked or any((w := s.waking) is not None and not w.done() for s in states.values()):
            return None
        now_s, model_now_s = time.monotonic(), time.time()  # the models' events are on time.time()
        serving = [t for t in self.targets if not t.backend.parked and t.backend.healthy
                   and not t.backend.circuit_open()]
        # A backend woken since the last tick has no input of its own yet: no load but now's.
        up = [at_now(t.decided or self._asleep_input(t.backend), t.backend.in_flight, t.backend.efficiency.waiting,
                     t.backend.efficiency.oldest_wait_s(model_now_s)) for t in serving if not t.backend.draining]
        why = burst_wake_advice(up, self.params, now_s, self._last_burst_wake_s)
        if why is None:
            return None
        self._last_burst_wake_s = now_s
        return self._wake_for_capacity(parked, [t.backend for t in serving if t.backend.draining], why)

    async def raise_fast(self) -> list[FastRaise]:
        """Between two ticks: raise the cap of each backend on which a queue forms (fast.py),
        through its agent in apply mode, as advice only in advise mode; the raises (or advice)."""
        if not self.fast:
            return []
        now_s, model_now_s = time.monotonic(), time.time()  # the models' events are on time.time()
        out = []
        for t in self.targets:
            d, held_w = t.decision, self._held_w(t)
            if t.decided is None or d is None or held_w is None or t.backend.parked:
                continue
            b = t.backend
            now = replace(at_now(t.decided, b.in_flight, b.efficiency.waiting, b.efficiency.oldest_wait_s(model_now_s)),
                          cap_w=held_w)
            advice = fast_raise_advice(now, self.params, d.safe_cap_w, now_s, t.fast_at_s)
            if advice is None:
                continue
            if await self._fast_apply(t, advice, now_s):
                out.append(advice)
        return out

    async def follow_queues(self) -> list[CapMove]:
        """Between two ticks, under an attainment target (apply mode): move each backend's cap
        with its queue (follow.py) through its agent; the moves made."""
        if self.follow is None:
            return []
        now_s, model_now_s = time.monotonic(), time.time()  # the models' events are on time.time()
        out = []
        for t in self.targets:
            d, held_w = t.decision, self._held_w(t)
            if t.decided is None or d is None or held_w is None or t.backend.parked or t.client is None:
                continue
            b = t.backend
            now = replace(at_now(t.decided, b.in_flight, b.efficiency.waiting, b.efficiency.oldest_wait_s(model_now_s)),
                          cap_w=held_w)
            move = follow_advice(now, d.cap_w, self.clock.clock, self.params.slo_ttft_s, self.follow, now_s,
                                 t.moved_s)
            if move is None or not await t.set_cap(move.cap_w):
                continue
            log.info("governor: backend %s: cap to %.0f W (from %.0f W): %s", b.name, t.applied_w,
                     move.previous_cap_w, move.reason)
            t.follow, t.moved_s = move, now_s
            t.follow_moves += 1
            self.metrics.governor_decisions.labels(b.name, FOLLOW).inc()
            self.metrics.governor_cap_w.labels(b.name).set(t.applied_w or 0.0)
            out.append(move)
        return out

    async def _fast_apply(self, t: Target, advice: FastRaise, now_s: float) -> bool:
        """Make (apply) or advise (advise) one fast raise: logged, counted, shown; whether done."""
        b = t.backend
        t.hold(self._held_w(t), now_s)  # the model learnt at the cap held until now
        if self.mode == "apply":
            if not await t.set_cap(advice.cap_w):
                return False
            log.info("governor: backend %s: fast raise cap to %.0f W (from %.0f W): %s", b.name, t.applied_w,
                     advice.previous_cap_w, advice.reason)
        else:
            t.advised_w = advice.cap_w
            log.info("governor: backend %s: advise fast raise to %.0f W (from %.0f W): %s", b.name,
                     advice.cap_w, advice.previous_cap_w, advice.reason)
        t.fast, t.fast_at_s = advice, now_s
        t.fast_raises += 1
        self.metrics.governor_decisions.labels(b.name, FAST_RAISE).inc()
        self.metrics.governor_cap_w.labels(b.name).set(advice.cap_w if self.mode == "advise" else t.applied_w or 0.0)
        return True

    def _held_w(self, t: Target) -> float | None:
        """The per-GPU cap the governor holds on `t` now: set (apply) or advised (advise)."""
        if self.mode == "advise":
            return t.advised_w
        if t.applied_w is not None:
            return t.applied_w
        return max(float(g["power_limit_w"]) for g in t.gpus) if t.gpus else None

    def _carry_handover(self, serving: list[tuple[Target, BackendInput]]) -> None:
        """Drain the backends relieved by a swap whose woken backend now serves; forget swaps
        whose wake-up failed or whose relieved backend is gone."""
        assert self.parking is not None
        awake = {t.backend.name: t.backend for t, _ in serving}
        for woken, relieved in list(self._handover.items()):
            state = self.parking.states.get(woken)
            waking = state is not None and state.waking is not None and not state.waking.done()
            if woken in awake and relieved in awake:
                awake[relieved].draining = True
                log.info("governor: backend %s drains: %s serves in its place", relieved, woken)
            elif waking:
                continue
            del self._handover[woken]

    def _g_per_j(self, b: Backend) -> float | None:
        """Grams of one joule of GPU energy at `b`'s site now, PUE included; None: unknown."""
        site = b.site
        kwh = site.gco2e_per_kwh() if site is not None else None
        return None if site is None or kwh is None else grams(site.pue, kwh)

    def _cost_per_j(self, b: Backend) -> float:
        """`BackendInput.cost_per_j`: 1 under the joules objective; under the carbon one grams
        per joule, an unknown intensity priced at the dearest known (as the router prices it)."""
        if not self.carbon:
            return 1.0
        own = self._g_per_j(b)
        if own is not None:
            return own
        known = [f for t in self.targets if (f := self._g_per_j(t.backend)) is not None]
        return max(known) if known else 1.0

    def _asleep_input(self, b: Backend) -> BackendInput:
        return BackendInput(name=b.name, model=b.efficiency, in_flight=0, arrival_rate_per_s=0.0,
                            mean_request_s=0.0, gpus=1, min_w=0.0, max_w=0.0, cap_w=0.0,
                            cost_per_j=self._cost_per_j(b))

    def _cheapest_asleep(self, parked: list[Backend]) -> Backend:
        """Carbon objective: the parked backend that would serve for the fewest grams now."""
        name = cheapest_to_wake([self._asleep_input(b) for b in parked])
        return next((b for b in parked if b.name == name), parked[0])

    def _swap(self, parked: list[Backend],
              serving: list[tuple[Target, BackendInput]]) -> tuple[Backend, Backend, str] | None:
        """(parked backend to wake, awake backend it relieves, why): one on a now-cleaner grid
        would serve the load for fewer grams."""
        advice = swap_advice([self._asleep_input(b) for b in parked], [i for _, i in serving], self.params)
        if advice is None:
            return None
        by_name = {t.backend.name: t.backend for t, _ in serving}
        woken = next(b for b in parked if b.name == advice.wake)
        return woken, by_name[advice.relieve], f"a cleaner grid now: {advice.reason}"

    def _input(self, t: Target, now_s: float) -> BackendInput:
        b = t.backend
        count, total_s = durations(self.metrics, b.name)
        in_flight = b.in_flight
        rate, mean_s = 0.0, 0.0
        if t.seen is not None and now_s > t.seen[0]:
            dt = now_s - t.seen[0]
            done = count - t.seen[1]
            mean_s = (total_s - t.seen[2]) / done if done > 0 else 0.0
            rate = max(0.0, (done + in_flight - t.seen[3]) / dt)
            # Idle for the whole interval: nothing finished, nothing in flight at either end.
            idle = done == 0 and in_flight == 0 and t.seen[3] == 0
            t.idle_since_s = (t.idle_since_s if t.idle_since_s is not None else t.seen[0]) if idle else None
        learned_w = t.learned_cap_w(self._held_w(t), now_s, t.seen[0] if t.seen is not None else None)
        t.seen = (now_s, count, total_s, in_flight)
        gpus = t.gpus or [{"min_w": 0.0, "max_w": 0.0, "power_limit_w": 0.0}]  # no agent: parking only
        return BackendInput(
            name=b.name, model=b.efficiency, in_flight=in_flight, arrival_rate_per_s=rate, mean_request_s=mean_s,
            gpus=len(t.gpus), min_w=max(float(g["min_w"]) for g in gpus),
            max_w=min(float(g["max_w"]) for g in gpus),
            # Following a queue moves the cap between ticks: decide from the last decision's.
            cap_w=(t.decision.cap_w if self.follow is not None and t.decision is not None and t.applied_w is not None
                   else max(float(g["power_limit_w"]) for g in gpus)), last_change_s=t.last_change_s,
            cost_per_j=self._cost_per_j(b),
            # Advice leaves the GPU's own cap; without the fast raise caps move only at decisions.
            learned_cap_w=learned_w if self.mode == "apply" and self.fast else None)

    async def _act(self, t: Target, d: Decision, now_s: float) -> None:
        name = t.backend.name
        previous = t.decision
        t.decision, t.advised_w = d, d.cap_w
        self.metrics.governor_decisions.labels(name, d.action).inc()
        if d.park:
            self.metrics.governor_decisions.labels(name, "park").inc()
            if not (previous and previous.park) and self.parking is None:
                log.info("governor: backend %s could be parked (advice only): %s", name, d.park_reason)
        if d.action == HOLD:
            log.debug("governor: backend %s holds %.0f W: %s", name, d.cap_w, d.reason)
            if self.mode == "apply":
                await t.renew()
        elif self.mode == "advise":
            log.info("governor: backend %s: advise %s to %.0f W (from %.0f W): %s", name, d.action, d.cap_w,
                     d.previous_cap_w, d.reason)
        else:
            await self._apply(t, d, now_s)
        self.metrics.governor_cap_w.labels(name).set(
            d.cap_w if self.mode == "advise" else (t.applied_w or d.previous_cap_w))

    async def _apply(self, t: Target, d: Decision, now_s: float) -> None:
        if not await t.set_cap(d.cap_w):
            return
        t.last_change_s = t.moved_s = now_s
        log.info("governor: backend %s: %s cap to %.0f W (from %.0f W): %s", t.backend.name, d.action,
                 t.applied_w, d.previous_cap_w, d.reason)
