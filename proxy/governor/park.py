"""Parking: putting an idle backend to sleep and waking it again (governor mode apply).

A backend's `park:` says how. `via: vllm` uses vLLM's sleep mode: `POST {base}/sleep?level=L`
and `POST {base}/wake_up` on the engine's root (its url without `/v1`), with the backend's
upstream Authorization header; vLLM serves these only with VLLM_SERVER_DEV_MODE=1 and
--enable-sleep-mode, and they are never reachable through the proxy (its pass-through
allowlist is /v1 paths). `via: command` runs `sleep_command` / `wake_command` (argv, no shell;
exit status 0 means done), with JOULEGATE_BACKEND set to the backend's name.

`Backend.parked` is set before the backend is put to sleep (checked with its `in_flight` in one
step, so no request is on its way to it) and cleared only once it answers the wake-up: routing
never picks a parked backend. A wake-up that does not finish within `wake_timeout_s` leaves the
backend parked and marks it unhealthy; the next wake trigger tries again. Concurrent callers of
`wake` share one wake-up. Units: seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from proxy.backends import Backend, BackendPool
from proxy.config import ParkConfig
from proxy.metrics import Metrics
from proxy.redact import redact_text

__all__ = ["Parking", "engine_base"]

log = logging.getLogger("joulegate.governor")

#: Seconds between `GET /is_sleeping` polls while vLLM finishes waking up.
_POLL_S = 0.1


@dataclass
class _State:
    """What parking remembers of one parkable backend."""

    backend: Backend
    config: ParkConfig
    since_s: float | None = None  # time.time() when parked
    last_wake_s: float | None = None  # how long the last successful wake-up took
    wakes: int = 0
    error: str | None = None
    waking: asyncio.Task[bool] | None = None


class Parking:
    """Parks and wakes the pool's backends that have a `park:` (see the module docstring)."""

    def __init__(self, pool: BackendPool, metrics: Metrics) -> None:
        self.pool = pool
        self.metrics = metrics
        self.states = {b.name: _State(b, b.config.park) for b in pool.backends if b.config.park.via != "none"}
        self._client: httpx.AsyncClient | None = None
        # Which parked backend a request wakes; None: the first listed. The carbon objective's
        # governor sets it so the cleanest wakes, not the first listed.
        self.choose_wake: Callable[[list[Backend]], Backend] | None = None

    def parkable(self, backend: Backend) -> bool:
        return backend.name in self.states

    def parked(self) -> list[Backend]:
        return [s.backend for s in self.states.values() if s.backend.parked]

    async def start(self) -> None:
        self._client = httpx.AsyncClient()

    async def close(self) -> None:
        """Wake every parked backend (the proxy stops: nothing would wake them later)."""
        tasks = [self.wake(b, "the proxy stops") for b in self.parked()]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    async def park(self, backend: Backend, reason: str) -> bool:
        """Put `backend` to sleep; False (and it stays in service) if it is busy or refuses."""
        state = self.states[backend.name]
        backend.parked = True  # first, in the same step as the check: no request is routed to it now
        if backend.in_flight:
            backend.parked = False
            return False
        error = await self._run(state, "sleep")
        if error is not None:
            backend.parked = False
            state.error = f"parking failed: {error}"
            log.warning("governor: backend %s: %s", backend.name, state.error)
            return False
        state.since_s, state.error = time.time(), None
        self.metrics.governor_parked.labels(backend.name).set(1)
        log.info("governor: backend %s parked: %s", backend.name, reason)
        return True

    def wake(self, backend: Backend, why: str) -> asyncio.Task[bool]:
        """The wake-up of parked `backend` (started now, or the one already under way)."""
        state = self.states[backend.name]
        if state.waking is None or state.waking.done():
            state.waking = asyncio.create_task(self._wake(state, why), name=f"joulegate-wake-{backend.name}")
        return state.waking

    async def wake_for(self, model: str) -> bool:
        """Wake a parked backend serving `model` and wait for it; True once one serves again."""
        parked = [b for b in self.pool.for_model(model) if b.parked and b.name in self.states]
        if not parked:
            return False
        waking = [b for b in parked if (t := self.states[b.name].waking) is not None and not t.done()]
        pick = waking[0] if waking else self.choose_wake(parked) if self.choose_wake is not None else parked[0]
        task = self.wake(pick, f"a request for {model} found no other backend")
        # Shielded: a client that leaves does not stop a wake-up others may wait for.
        return await asyncio.shield(task)

    def view(self, name: str) -> dict[str, Any] | None:
        """Parking state for the admin view of /v1/energy/backends; None if not parkable."""
        state = self.states.get(name)
        if state is None:
            return None
        since = state.since_s if state.backend.parked else None
        return {"parked": state.backend.parked, "via": state.config.via,
                "parked_since": _iso(since) if since is not None else None,
                "waking": state.waking is not None and not state.waking.done(),
                "last_wake_s": state.last_wake_s, "wakes": state.wakes, "error": state.error}

    async def _wake(self, state: _State, why: str) -> bool:
        backend = state.backend
        if not backend.parked:
            return True
        log.info("governor: waking backend %s: %s", backend.name, why)
        started_s = time.monotonic()
        error = await self._run(state, "wake")
        took_s = time.monotonic() - started_s
        if error is not None:
            state.error = f"did not wake up: {error}"
            self.metrics.governor_wakes.labels(backend.name, "failed").inc()
            backend.mark_down(state.error)  # stays parked: never routed to while it may sleep
            log.warning("governor: backend %s %s", backend.name, state.error)
            return False
        backend.parked = False
        state.since_s, state.error, state.last_wake_s = None, None, took_s
        state.wakes += 1
        self.metrics.governor_parked.labels(backend.name).set(0)
        self.metrics.governor_wakes.labels(backend.name, "ok").inc()
        self.metrics.governor_wake_s.labels(backend.name).observe(took_s)
        log.info("governor: backend %s woke up in %.2f s", backend.name, took_s)
        return True

    async def _run(self, state: _State, action: str) -> str | None:
        """Sleep or wake `state`'s backend within wake_timeout_s; None when done, else why not."""
        cfg = state.config
        try:
            async with asyncio.timeout(cfg.wake_timeout_s):
                if cfg.via == "vllm":
                    await self._vllm(state.backend, cfg, action)
                else:
                    argv = cfg.sleep_command if action == "sleep" else cfg.wake_command
                    assert argv
                    await _command(argv, state.backend.name)
        except TimeoutError:
            return f"{action} took longer than {cfg.wake_timeout_s:g} s"
        except (httpx.HTTPError, OSError, ValueError, RuntimeError) as exc:
            # Redacted: an error text may quote the backend's URL with its credentials.
            return redact_text(f"{action}: {type(exc).__name__}: {exc}")[:240]
        return None

    async def _vllm(self, backend: Backend, cfg: ParkConfig, action: str) -> None:
        assert self._client is not None
        base = engine_base(backend.url)
        headers = {k: v for k, v in backend.upstream_headers.items() if k == "Authorization"}
        timeout = httpx.Timeout(cfg.wake_timeout_s)
        if action == "sleep":
            resp = await self._client.post(f"{base}/sleep", params={"level": cfg.level}, headers=headers,
                                           timeout=timeout)
            resp.raise_for_status()
            return
        resp = await self._client.post(f"{base}/wake_up", headers=headers, timeout=timeout)
        resp.raise_for_status()
        while True:  # wake_up answers when done in vLLM; is_sleeping confirms it
            resp = await self._client.get(f"{base}/is_sleeping", headers=headers, timeout=timeout)
            resp.raise_for_status()
            if not resp.json().get("is_sleeping"):
                return
            await asyncio.sleep(_POLL_S)


async def _command(argv: list[str], backend: str) -> None:
    """Run `argv` to its end; RuntimeError on a non-zero exit (with its stderr's tail)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "JOULEGATE_BACKEND": backend})
    try:
        _, stderr = await proc.communicate()
    except asyncio.CancelledError:  # timed out: do not leave it running
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        tail = stderr.decode("utf-8", "replace").strip()[-200:]
        raise RuntimeError(f"{argv[0]} exited with {proc.returncode}" + (f": {tail}" if tail else ""))


def engine_base(url: str) -> str:
    """The engine's root from its OpenAI base URL: http://h:8000/v1 -> http://h:8000."""
    return url[:-3] if url.endswith("/v1") else url


def _iso(wall_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall_s))
