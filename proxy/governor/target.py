"""What the live governor (actuate.py) remembers of each backend, and where it reads from and
writes to: its power agent's limits API (`GET` / `PUT /v1/power/limits`, every GPU of a backend
at one cap; the limits found before the first change kept to put back) and the proxy's
request-duration histogram. Units: watts, seconds."""

from __future__ import annotations

import logging
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

log = logging.getLogger("joulegate.governor")


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
    refused: str | None = None  # why the agent refused our last PUT (another governor's claim)
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

    async def read_limits(self) -> bool:
        """GET the agent's limits into `gpus`; whether they were read. An agent that stops
        answering gets its original limits back (if it still takes PUTs); limits someone else
        changed become the originals."""
        assert self.client is not None and self.url is not None
        try:
            resp = await self.client.get(self.url)
            resp.raise_for_status()
            gpus = resp.json()["gpus"]
            if not gpus:
                raise ValueError("no GPUs")
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            error = f"power limits unreadable: {type(exc).__name__}: {str(exc)[:200]}"
            if error != self.error:
                log.warning("governor: backend %s: %s", self.backend.name, error)
            if self.original_w:
                await self.restore("its agent stopped answering")
            self.error = error
            return False
        if self.applied_w is not None and any(g["power_limit_w"] != self.applied_w for g in gpus):
            # Someone else (or a restarted agent) set the limits: theirs are the originals now.
            log.info("governor: backend %s: limits changed outside the governor; starting over", self.backend.name)
            self.original_w.clear()
            self.applied_w = None
        self.gpus, self.error = gpus, self.refused  # a refusal stands until a PUT goes through
        return True

    async def set_cap(self, cap_w: float) -> bool:
        """Set every GPU to `cap_w`, remembering the limits found first; whether it was set."""
        originals = {int(g["index"]): float(g["power_limit_w"]) for g in self.gpus}
        answer = await self.put({i: cap_w for i in originals})
        if answer is None:
            return False
        for index, watts in originals.items():
            self.original_w.setdefault(index, watts)
        self.applied_w = max(float(g["power_limit_w"]) for g in answer["gpus"])
        return True

    async def renew(self) -> None:
        """PUT the cap in force again, if this governor set one: renews the agent's lease and
        this governor's claim on the limits (power_limits.claim)."""
        if self.applied_w is not None:
            await self.put({i: self.applied_w for i in self.original_w})

    async def put(self, limits_w: dict[int, float], release: bool = False) -> dict[str, Any] | None:
        """PUT these limits (GPU index -> W); the agent's answer, or None (logged, in `error`).
        `release`: this governor's claim on the limits ends with it (power_limits.claim)."""
        assert self.client is not None and self.url is not None
        body = {"gpus": [{"index": i, "power_limit_w": w} for i, w in sorted(limits_w.items())]}
        try:
            resp = await self.client.put(self.url, json=body, params={"release": "true"} if release else None)
            if resp.status_code == 409:  # another governor holds them: advise only, quietly
                refused = f"power limits not set: {_message(resp) or 'another governor holds them'}"
                if refused != self.refused:
                    log.warning("governor: backend %s: %s", self.backend.name, refused)
                self.refused = self.error = refused
                return None
            resp.raise_for_status()
            answer = dict(resp.json())
            if self.refused is not None:
                log.info("governor: backend %s: power limits set again (the other governor let go)",
                         self.backend.name)
                self.refused = None
            return answer
        except (httpx.HTTPError, ValueError, TypeError) as exc:
            self.error = f"setting power limits failed: {type(exc).__name__}: {str(exc)[:200]}"
            log.warning("governor: backend %s: %s", self.backend.name, self.error)
            return None

    async def restore(self, why: str) -> None:
        """Put back the limits found before the first change (`why`: for the log)."""
        if await self.put(self.original_w, release=True) is None:
            log.warning("governor: backend %s: could not restore its power limits (%s)", self.backend.name, why)
            return
        log.info("governor: backend %s: power limits restored to %s W (%s)", self.backend.name,
                 sorted(self.original_w.values()), why)
        self.original_w.clear()
        self.applied_w = None


def _message(resp: httpx.Response) -> str | None:
    """The OpenAI-shaped error message of `resp`, if it has one."""
    try:
        message = resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return None
    return message if isinstance(message, str) else None


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
