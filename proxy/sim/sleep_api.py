"""vLLM's sleep mode on the simulated backend: `POST /sleep[?level=1|2]`, `POST /wake_up`,
`GET /is_sleeping` -> `{"is_sleeping": bool}` (outside /v1, as vLLM serves them when started
with VLLM_SERVER_DEV_MODE=1 and --enable-sleep-mode).

Asleep, the simulated GPU draws its profile's `sleep_w` (`SLEEP_POWER_RATIO`, 0.5, times its
idle power; derived, see proxy/sim/profiles.py) and inference is refused with 503
(server.SimState.submit), as vLLM refuses it while the weights are offloaded.
`POST /wake_up` answers after the wake time (`wake_s`: JOULEGATE_SIM_WAKE_S or
`sim-backend --wake-s`), the time a real engine takes to load its weights back; the GPU is
asleep until then. Units: watts, seconds.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from proxy.sim.profiles import SLEEP_POWER_RATIO

__all__ = ["SLEEP_POWER_RATIO", "add_routes", "is_sleeping"]


def is_sleeping(state: Any) -> bool:
    """True while the engine of `state` (server.SimState) sleeps or is waking up."""
    return state.engine.sleep_w is not None


def add_routes(app: web.Application, key: web.AppKey[Any], wake_s: float) -> None:
    """Serve the sleep-mode routes for the SimState in app[key]; a wake-up takes `wake_s`."""
    waking: dict[str, asyncio.Task[None]] = {}

    async def sleep(request: web.Request) -> web.Response:
        state = request.app[key]
        level = request.query.get("level", "1")
        if level not in ("1", "2"):
            return _error(400, "'level' must be 1 or 2", "level")
        if state.engine.has_work:
            # The simulator does not offload under load; the governor only parks idle engines.
            return _error(409, "the engine has requests running", None)
        if not is_sleeping(state):
            state.engine.set_sleep_w(state.profile.sleep_w, state.now_s())
        return web.Response(status=200)

    async def wake_up(request: web.Request) -> web.Response:
        state = request.app[key]
        if is_sleeping(state):
            task = waking.get("wake")
            if task is None or task.done():
                task = waking["wake"] = asyncio.create_task(_wake(state, wake_s))
            await asyncio.shield(task)  # a caller that leaves does not stop the wake-up
        return web.Response(status=200)

    async def get(request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": is_sleeping(request.app[key])})

    app.router.add_post("/sleep", sleep)
    app.router.add_post("/wake_up", wake_up)
    app.router.add_get("/is_sleeping", get)


async def _wake(state: Any, wake_s: float) -> None:
    await asyncio.sleep(wake_s)
    state.engine.set_sleep_w(None, state.now_s())


def _error(status: int, message: str, param: str | None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                        "code": None}}, status=status)
