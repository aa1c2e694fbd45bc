"""A simulated OpenAI-compatible GPU inference server, driven in real time by `Engine`.

One driver task plans an engine step, sleeps until the step's absolute end (loop.time()
deadlines, so lateness never accumulates), and hands the step's tokens to the waiting handlers.
Engine time is `loop.time()`; the wall-clock times the API reports are engine time plus the
offset to `time.time()` taken at startup. The power API's `t` can be told to run off the true
clock (`clock_skew_s`, or JOULEGATE_SIM_CLOCK_SKEW_S for `joulegate sim-backend`), like an
agent on a host whose clock is wrong; everything else stays on the true clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from proxy.sim.api import (
    ApiError,
    StreamShaper,
    check_model,
    completion_body,
    embedding_data,
    parse_embeddings,
    parse_generation,
    parse_shape,
    read_json,
)
from proxy.sim.engine import Engine, Request, RequestRecord
from proxy.sim.limits_api import add_routes as add_limit_routes
from proxy.sim.parking import DEFAULT_WAKE_S  # seconds `POST /wake_up` takes, as in `simulate`
from proxy.sim.profiles import get_profile
from proxy.sim.responses import ResponsesStream, parse_response
from proxy.sim.sleep_api import add_routes as add_sleep_routes
from proxy.sim.sleep_api import is_sleeping

__all__ = ["SimState", "STATE", "make_app", "run"]

log = logging.getLogger("joulegate.sim")


class _Sink:
    """Where the driver leaves one request's tokens. `stream` sinks wake their handler on every
    step; the others only when the request finishes."""

    __slots__ = ("stream", "tokens", "finished", "_waiter")

    def __init__(self, stream: bool) -> None:
        self.stream = stream
        self.tokens = 0
        self.finished = False
        self._waiter: asyncio.Future[None] | None = None

    def push(self, tokens: int, finished: bool) -> None:
        self.tokens += tokens
        self.finished = self.finished or finished
        w = self._waiter
        if w is not None and not w.done() and (self.stream or finished):
            w.set_result(None)

    async def wait(self) -> tuple[int, bool]:
        """Tokens since the last call, and whether the request is done."""
        while not self.finished and not (self.stream and self.tokens):
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        n, self.tokens = self.tokens, 0
        return n, self.finished


class SimState:
    """The engine, its driver task and the handlers' sinks for one simulated GPU."""

    def __init__(self, profile_name: str, model: str | None, seed: int, gpu_uuid: str | None,
                 clock_skew_s: float = 0.0) -> None:
        self.profile = get_profile(profile_name)
        self.model = model or self.profile.model_name
        self.uuid = gpu_uuid or f"SIM-{profile_name}-{seed}"
        self.rng = random.Random(seed)
        self.seed = seed
        self.engine = Engine(self.profile)
        self.sinks: dict[str, _Sink] = {}
        self.wall_offset_s = 0.0
        self.clock_skew_s = clock_skew_s  # added to the power API's `t` only
        self.created = int(time.time())
        # The W3C traceparent each recent request came with (by x-request-id), shown by
        # /sim/requests/{id}: how tests see the proxy's trace propagation.
        self.traceparents: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._driver: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        now_s = loop.time()
        self.wall_offset_s = time.time() - now_s
        self.engine = Engine(self.profile, start_s=now_s)
        self._driver = loop.create_task(self._drive(), name="sim-driver")
        self._driver.add_done_callback(_log_crash)

    async def stop(self) -> None:
        if self._driver is not None:
            self._driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._driver

    def now_s(self) -> float:
        return asyncio.get_running_loop().time()

    def wall_s(self, engine_s: float | None) -> float | None:
        return None if engine_s is None else engine_s + self.wall_offset_s

    def submit(self, req: Request, stream: bool) -> _Sink:
        if is_sleeping(self):  # vLLM refuses work that needs the weights while they are offloaded
            raise ApiError(503, "The model is sleeping; POST /wake_up first.", code="model_sleeping",
                           type_="server_error")
        try:
            self.engine.add(req, self.now_s())
        except ValueError as exc:
            raise ApiError(409, str(exc), code="duplicate_request_id") from None
        sink = self.sinks[req.request_id] = _Sink(stream)
        self._wake.set()
        return sink

    def release(self, request_id: str, sink: _Sink) -> None:
        """Handler is done with `request_id`; abort it in the engine if it is still running."""
        if self.sinks.get(request_id) is sink:
            del self.sinks[request_id]
        if not sink.finished:
            self.engine.abort(request_id, self.now_s())

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        engine, sinks = self.engine, self.sinks
        while True:
            step = engine.plan_step(loop.time())
            if step is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            # Absolute deadline: the next step starts at this one's end, not when we wake.
            await asyncio.sleep(max(0.0, step.end_s - loop.time()))
            for ev in engine.finish_step(step):
                sink = sinks.get(ev.request_id)
                if sink is not None:
                    sink.push(ev.tokens, ev.finished)


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("simulator driver crashed", exc_info=task.exception())


STATE = web.AppKey("joulegate_sim_state", SimState)
# The request's x-request-id (the client's or a new one); RequestKey is aiohttp >= 3.12.
RID: Any = web.RequestKey("rid", str) if hasattr(web, "RequestKey") else "rid"


# -- handlers -------------------------------------------------------------------------------------

@web.middleware
async def _errors(request: web.Request,
                  handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """OpenAI-shaped errors everywhere; x-request-id on every response."""
    rid = request.headers.get("x-request-id") or f"sim-{uuidlib.uuid4().hex}"
    request[RID] = rid
    traceparent = request.headers.get("traceparent")
    if traceparent is not None:
        seen = request.app[STATE].traceparents
        seen[rid] = traceparent
        if len(seen) > 10_000:
            del seen[next(iter(seen))]  # the oldest
    try:
        resp = await handler(request)
    except ApiError as exc:
        resp = exc.response()
    except web.HTTPException as exc:
        resp = ApiError(exc.status, exc.reason).response()
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("simulator handler failed")
        resp = ApiError(500, "internal simulator error", type_="server_error").response()
    if not resp.prepared:
        resp.headers["x-request-id"] = rid
    return resp


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json(request)
    check_model(body, state.model)
    p = parse_generation(body, chat, state.rng, state.profile.max_context_tokens, _shape(request, body))
    rid: str = request[RID]
    sink = state.submit(Request(rid, p.prompt_tokens, p.completion_tokens), p.stream)
    try:
        if not p.stream:
            await sink.wait()
            return web.Response(body=completion_body(chat, state.model, p), content_type="application/json",
                                headers={"x-request-id": rid})
        return await _stream(request, sink, StreamShaper(chat, state.model, p))
    finally:
        state.release(rid, sink)


def _shape(request: web.Request, body: dict[str, Any]) -> frozenset[str]:
    """The answer shape asked for: `sim_shape` in the body, else the `x-sim-shape` header."""
    return parse_shape(body.get("sim_shape", request.headers.get("x-sim-shape")))


async def _stream(request: web.Request, sink: _Sink, shaper: StreamShaper | ResponsesStream) -> web.StreamResponse:
    """Write the shaper's bytes as the engine produces tokens, until the request is done."""
    resp = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "x-request-id": request[RID]})
    await resp.prepare(request)
    done = False
    while not done:
        tokens, done = await sink.wait()
        await resp.write(shaper.render(tokens, done))
    await resp.write_eof()
    return resp


async def responses(request: web.Request) -> web.StreamResponse:
    """`POST /v1/responses`: billed and batched like a chat completion."""
    state = request.app[STATE]
    body = await read_json(request)
    check_model(body, state.model)
    p = parse_response(body, state.rng, state.profile.max_context_tokens, _shape(request, body))
    rid: str = request[RID]
    sink = state.submit(Request(rid, p.prompt_tokens, p.completion_tokens), p.stream)
    try:
        shaper = ResponsesStream(state.model, p)
        if not p.stream:
            await sink.wait()
            return web.Response(body=orjson.dumps(shaper.response(True)), content_type="application/json",
                                headers={"x-request-id": rid})
        return await _stream(request, sink, shaper)
    finally:
        state.release(rid, sink)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def embeddings(request: web.Request) -> web.Response:
    """Prefill-only: the request costs its prompt tokens' prefill and nothing else."""
    state = request.app[STATE]
    body = await read_json(request)
    check_model(body, state.model)
    p = parse_embeddings(body)
    rid: str = request[RID]
    sink = state.submit(Request(rid, p.prompt_tokens, 0, is_embedding=True), stream=False)
    try:
        await sink.wait()
    finally:
        state.release(rid, sink)
    payload = {"object": "list", "data": embedding_data(p, state.seed), "model": state.model,
               "usage": {"prompt_tokens": p.prompt_tokens, "total_tokens": p.prompt_tokens}}
    return web.Response(body=orjson.dumps(payload), content_type="application/json", headers={"x-request-id": rid})


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return _json({"object": "list", "data": [
        {"id": state.model, "object": "model", "created": state.created, "owned_by": "joulegate-sim"}]})


async def health(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


def _power_reading(state: SimState) -> dict[str, Any]:
    now_s = state.now_s()
    wall_s = time.time() + state.clock_skew_s
    return {"t": wall_s, "gpus": [{
        "index": 0, "uuid": state.uuid, "name": state.profile.gpu_name,
        "energy_mj": int(state.engine.energy_j(now_s) * 1000.0),
        "power_w": round(state.engine.power_w(now_s), 3),
        "power_limit_w": state.engine.power_cap_w or state.profile.board_limit_w}]}


async def power(request: web.Request) -> web.Response:
    return _json(_power_reading(request.app[STATE]))


async def power_stream(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        interval_s = max(0.01, float(request.query.get("interval_s", "0.1")))
    except ValueError:
        raise ApiError(400, "'interval_s' must be a number", param="interval_s") from None
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "x-request-id": request[RID]})
    await resp.prepare(request)
    loop = asyncio.get_running_loop()
    deadline_s = loop.time()
    while True:
        await resp.write(b"data: " + orjson.dumps(_power_reading(state)) + b"\n\n")
        # Absolute deadlines, but never a burst to catch up after a long stall.
        deadline_s = max(deadline_s + interval_s, loop.time())
        await asyncio.sleep(deadline_s - loop.time())


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    eng, now_s = state.engine, state.now_s()
    vl = f'{{model_name="{state.model}"}}'
    gl = f'{{gpu="0",UUID="{state.uuid}",device="nvidia0",modelName="{state.profile.gpu_name}"}}'
    power_w = eng.power_w(now_s)
    rows = [
        ("vllm:num_requests_running", "gauge", "Requests in the running batch.", vl, eng.num_running),
        ("vllm:num_requests_waiting", "gauge", "Requests waiting to be scheduled.", vl, eng.num_waiting),
        ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage, 1 means 100 percent.", vl, eng.kv_cache_usage),
        ("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", gl, round(power_w, 3)),
        ("DCGM_FI_DEV_POWER_USAGE_INSTANT", "gauge", "Current power draw (in W).", gl, round(power_w, 3)),
        ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "counter",
         "Total energy consumption since boot (in mJ).", gl, int(eng.energy_j(now_s) * 1000.0)),
    ]
    text = "".join(f"# HELP {n} {h}\n# TYPE {n} {t}\n{n}{lbl} {v}\n" for n, t, h, lbl, v in rows)
    return web.Response(text=text, content_type="text/plain", charset="utf-8",
                        headers={"x-request-id": request[RID]})


def _record_json(state: SimState, rec: RequestRecord) -> dict[str, Any]:
    return {"request_id": rec.request_id, "joules": rec.joules, "prompt_tokens": rec.prompt_tokens,
            "completion_tokens": rec.completion_tokens, "arrival_s": state.wall_s(rec.arrival_s),
            "first_token_s": state.wall_s(rec.first_token_s), "end_s": state.wall_s(rec.end_s),
            "finished": rec.finished, "aborted": rec.aborted,
            "traceparent": state.traceparents.get(rec.request_id)}


async def sim_request(request: web.Request) -> web.Response:
    state = request.app[STATE]
    rec = state.engine.record(request.match_info["request_id"])
    if rec is None:
        raise ApiError(404, "unknown request id", param="request_id", code="not_found")
    return _json(_record_json(state, rec))


async def sim_energy(request: web.Request) -> web.Response:
    state = request.app[STATE]
    now_s = state.now_s()
    eng = state.engine
    return _json({"t": time.time(), "joules": eng.energy_j(now_s), "idle_joules": eng.idle_energy_j(now_s),
                  "attributed_joules": eng.attributed_energy_j(now_s)})


# -- app and entry point --------------------------------------------------------------------------

def make_app(profile_name: str, model: str | None = None, seed: int = 0, *,
             gpu_uuid: str | None = None, clock_skew_s: float = 0.0, wake_s: float = DEFAULT_WAKE_S) -> web.Application:
    """The simulator app for `profile_name` serving `model` (default: the profile's model).
    `clock_skew_s` puts the power API's clock that far ahead of the true one; `wake_s` is how
    long `POST /wake_up` takes (proxy/sim/sleep_api.py).
    Serve it with `handler_cancellation=True` so client disconnects abort requests."""
    state = SimState(profile_name, model, seed, gpu_uuid, clock_skew_s)
    app = web.Application(middlewares=[_errors], client_max_size=64 * 1024 * 1024)
    app[STATE] = state

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await state.start()
        yield
        await state.stop()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/power", power)
    app.router.add_get("/v1/power/stream", power_stream)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    app.router.add_get("/sim/requests/{request_id}", sim_request)
    app.router.add_get("/sim/energy", sim_energy)
    add_limit_routes(app, STATE)  # GET|PUT /v1/power/limits: proxy/sim/limits_api.py
    add_sleep_routes(app, STATE, wake_s)  # POST /sleep, /wake_up, GET /is_sleeping
    return app


async def serve(profile: str, host: str, port: int, model: str | None, seed: int,
                stop: asyncio.Event | None = None, wake_s: float | None = None) -> None:
    """Serve until `stop` is set (or SIGINT/SIGTERM). Prints one line with the bound URL.
    `wake_s` None: JOULEGATE_SIM_WAKE_S, else DEFAULT_WAKE_S."""
    skew_s = float(os.environ.get("JOULEGATE_SIM_CLOCK_SKEW_S") or 0.0)
    if wake_s is None:
        wake_s = float(os.environ.get("JOULEGATE_SIM_WAKE_S") or DEFAULT_WAKE_S)
    app = make_app(profile, model, seed, clock_skew_s=skew_s, wake_s=wake_s)
    # A proxy's power stream (/v1/power/stream) never ends by itself: waiting the default 60 s
    # for it would make a stopped simulator linger; 1 s lets answers in flight finish sending.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = runner.addresses[0][1]
        state = app[STATE]
        state.uuid = f"SIM-{profile}-{bound_port}"
        print(f"joulegate sim-backend: {profile} ({state.profile.gpu_name}) serving {state.model!r} "
              f"on http://{host}:{bound_port}/v1", flush=True)
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def run(profile: str, host: str = "127.0.0.1", port: int = 8000, model: str | None = None, seed: int = 0,
        wake_s: float | None = None) -> None:
    """Run one simulated backend until SIGINT/SIGTERM (blocking). ValueError for an unknown
    profile, before anything binds."""
    get_profile(profile)
    asyncio.run(serve(profile, host, port, model, seed, wake_s=wake_s))
