"""`GET|PUT /v1/power/limits` on the simulated backend (the agent's API, proxy/power_limits.py).

The one simulated GPU (index 0) takes the limit as `Engine.power_cap_w`; proxy/sim/capping.py
says what a cap does to its steps. Unlike the agent, the simulator takes a PUT without a token:
it is a test device whose power is fiction. Units: watts.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from proxy import power_limits as api
from proxy.sim.capping import min_limit_w


def gpu_limits(state: Any) -> api.GpuLimits:
    """The simulated GPU's limits (state: server.SimState)."""
    board_w = state.profile.board_limit_w
    cap_w = state.engine.power_cap_w
    return api.GpuLimits(0, state.uuid, board_w if cap_w is None else cap_w, min_limit_w(board_w), board_w, board_w)


def add_routes(app: web.Application, key: web.AppKey[Any]) -> None:
    """Serve the limits API for the SimState in app[key] (one governor at a time, as the agent)."""
    held = api.Claim()

    async def get(request: web.Request) -> web.Response:
        return web.json_response(api.limits_json([gpu_limits(request.app[key])]), dumps=_dumps)

    async def put(request: web.Request) -> web.Response:
        state = request.app[key]
        try:
            wanted = api.parse_put(orjson.loads(await request.read()), {0})
        except (ValueError, orjson.JSONDecodeError) as exc:
            return web.json_response({"error": {"message": str(exc).splitlines()[0], "type": "invalid_request_error",
                                                "code": "invalid_power_limits"}}, status=400, dumps=_dumps)
        refused = api.claim(held, request.headers, time.monotonic())
        if refused is not None:
            return web.json_response(api.held_json(refused), status=409, dumps=_dumps)
        limit_w = api.clamp_w(wanted[0], gpu_limits(state))
        state.engine.power_cap_w = None if limit_w >= state.profile.board_limit_w else limit_w
        api.release(held, request.headers, request.query)
        return web.json_response(api.limits_json([gpu_limits(state)]), dumps=_dumps)

    app.router.add_get(api.PATH, get)
    app.router.add_put(api.PATH, put)


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()
