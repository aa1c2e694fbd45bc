"""`joulegate agent`: this host's GPU power over HTTP, for a proxy on another host.

A background sampler reads NVML (proxy/energy/sources/nvml.py `NvmlReader`) every `interval_s`
on a dedicated thread and keeps the latest reading. Endpoints:
  GET /v1/power         -> {"t": <wall clock s at the read>, "gpus": [{"index", "uuid", "name",
                           "energy_mj", "power_w", "power_limit_w"}]}: a fresh read, so `t` is
                           taken while the request is in flight, which the proxy's clock-offset
                           probes rely on
  GET /v1/power/stream  -> the same objects as SSE `data:` events, one per `interval_s` (query,
                           at least the agent's own interval); `: ...` comment lines as
                           keep-alives while no fresh reading comes
  GET /metrics          -> Prometheus text in dcgm-exporter's names (DCGM_FI_DEV_POWER_USAGE W,
                           DCGM_FI_DEV_POWER_USAGE_INSTANT W, DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION
                           mJ; labels gpu, UUID, device, modelName)
  GET /healthz          -> 200 while reads succeed, else 503
Where the host's RAPL counters are readable (`--rapl-root`, default /sys/class/powercap; see
proxy/energy/rapl.py), readings also hold `"host": {"energy_mj", "power_w"}`: CPU package + DRAM
energy since the agent started (mJ) and its power over the last interval (W; null at first).
  GET /v1/power/limits  -> {"gpus": [{"index", "uuid", "power_limit_w", "min_w", "max_w", "default_w"}]}
  PUT /v1/power/limits  <- {"gpus": [{"index": 0, "power_limit_w": 420}]} (clamped to [min_w, max_w];
                           null: default_w): only with a bearer token (403 without one, even on
                           loopback); the limits found before the first PUT are restored on stop,
                           and with --limits-lease-s L also when no PUT came for L seconds;
                           one governor at a time (409 `limits_held` for another while the
                           first's claim lasts: proxy/power_limits.py)
Binds 127.0.0.1 by default. On any other address it needs a bearer token (`--token-file`, or
$JOULEGATE_AGENT_TOKEN) and then every route wants `Authorization: Bearer <token>` (401
otherwise); `--tls-cert`/`--tls-key` serve https.
Units: energy_mj millijoules (the NVML counter since driver load), power_w watts, t seconds;
power_limit_w: the GPU's enforced power limit in watts (left out where NVML does not say).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import logging
import os
import ssl
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

import orjson
from aiohttp import web

from proxy.energy.rapl import DEFAULT_ROOT, RaplReader
from proxy.energy.sources.base import select_gpus
from proxy.energy.sources.nvml import POWER_INSTANT, GpuReading, NvmlError, NvmlReader, timed_read
from proxy.power_limits import (
    PATH,
    Claim,
    GpuLimits,
    claim,
    clamp_w,
    held_json,
    limits_json,
    parse_put,
    release,
)

log = logging.getLogger("joulegate.agent")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9464
TOKEN_ENV = "JOULEGATE_AGENT_TOKEN"
DEFAULT_INTERVAL_S = 0.05
#: Consecutive failed reads after which the sampler shuts NVML down and initialises it again.
REINIT_AFTER_FAILURES = 10

#: The agent's wall clock. Tests replace it (in a child process) to fake a skewed host clock.
_clock = time.time


def _now() -> float:
    return _clock()


class AgentState:
    """The latest reading and what the handlers need; lives in app[STATE]."""

    def __init__(self, reader: NvmlReader, gpus: Sequence[int | str] | None, interval_s: float) -> None:
        self.reader = reader
        self.selectors: list[int | str] = list(gpus or [])
        self.interval_s = interval_s
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="joulegate-agent-nvml")
        self.latest: dict[str, Any] | None = None
        self.latest_body: bytes = b""
        self.latest_mono_s: float | None = None
        self.error: str | None = None
        self.reads = 0
        self.read_errors = 0
        self.new_reading = asyncio.Event()
        self.closing = False
        self.rapl: RaplReader | None = None  # host CPU + DRAM energy, where readable
        self.can_set_limits = False  # only with a bearer token
        self.original_limits_w: dict[int, float] = {}  # GPU index -> limit before our first PUT
        self.limits_lease_s = 0.0  # > 0: PUT limits revert unless a PUT renews them this often
        self.lease_until_mono_s = 0.0
        self.claim = Claim()  # which governor may PUT limits now (power_limits.claim)

    def close_streams(self) -> None:
        """End every stream now (on shutdown, so that it does not wait for them)."""
        self.closing = True
        self.new_reading.set()

    async def read(self) -> dict[str, Any]:
        """A fresh reading as the API's JSON object (runs NVML on the agent's thread)."""
        loop = asyncio.get_running_loop()
        t_s, readings = await loop.run_in_executor(self.executor, timed_read, self.reader, _now)
        obj = reading_json(t_s, self._select(readings))
        if self.rapl is not None:
            energy_j = await loop.run_in_executor(self.executor, self.rapl.read, t_s)
            power_w = self.rapl.power_w
            obj["host"] = {"energy_mj": round(energy_j * 1e3, 3),
                           "power_w": None if power_w is None else round(power_w, 3)}
        return obj

    def _select(self, readings: list[GpuReading]) -> list[GpuReading]:
        chosen = select_gpus(self.selectors, ((r.index, r.uuid) for r in readings))
        if chosen is None:
            raise NvmlError(f"GPU(s) {self.selectors} not among {[r.index for r in readings]}")
        return [readings[i] for i in chosen]

    def publish(self, obj: dict[str, Any]) -> None:
        """Make `obj` the latest reading and wake the streams."""
        self.latest = obj
        self.latest_body = orjson.dumps(obj)
        self.latest_mono_s = time.monotonic()
        self.reads += 1
        if self.error is not None:
            log.info("NVML reads recovered")
        self.error = None
        event, self.new_reading = self.new_reading, asyncio.Event()
        event.set()

    def fresh(self) -> bool:
        stale_after_s = max(2.0, 5.0 * self.interval_s)
        return self.latest_mono_s is not None and time.monotonic() - self.latest_mono_s <= stale_after_s


def reading_json(t_s: float, readings: list[GpuReading]) -> dict[str, Any]:
    return {"t": t_s, "gpus": [
        {"index": r.index, "uuid": r.uuid, "name": r.name, "energy_mj": r.energy_mj,
         "power_w": None if r.power_w is None else round(r.power_w, 3),
         **({"power_limit_w": r.power_limit_w} if r.power_limit_w is not None else {})}
        for r in readings]}


STATE = web.AppKey("joulegate_agent_state", AgentState)


def _selected_limits(state: AgentState) -> list[GpuLimits]:
    """The selected GPUs' limits (on the NVML thread)."""
    limits = state.reader.limits()
    chosen = select_gpus(state.selectors, ((g.index, g.uuid) for g in limits))
    if chosen is None:
        raise NvmlError(f"GPU(s) {state.selectors} not among {[g.index for g in limits]}")
    return [limits[i] for i in chosen]


def _set_limits(state: AgentState, wanted: dict[int, float | None]) -> list[GpuLimits]:
    """Apply {index: W or None} clamped to each GPU's range, remembering the first originals."""
    by_index = {g.index: g for g in _selected_limits(state)}
    for index, watts in wanted.items():
        gpu = by_index[index]
        target_w = clamp_w(watts, gpu)
        state.original_limits_w.setdefault(index, gpu.power_limit_w)
        if target_w != gpu.power_limit_w:
            state.reader.set_limit_w(index, target_w)
            log.info("GPU %d power limit %.0f W -> %.0f W", index, gpu.power_limit_w, target_w)
    return _selected_limits(state)


def _restore_limits(state: AgentState) -> None:
    """Put back the limits found before the first PUT (on stop)."""
    for index, watts in sorted(state.original_limits_w.items()):
        try:
            state.reader.set_limit_w(index, watts)
            log.info("GPU %d power limit restored to %.0f W", index, watts)
        except NvmlError as exc:
            log.error("GPU %d: could not restore its power limit of %.0f W: %s", index, watts, exc)
    state.original_limits_w.clear()


async def power_limits(request: web.Request) -> web.Response:
    state = request.app[STATE]
    loop = asyncio.get_running_loop()
    try:
        if request.method == "GET":
            gpus = await loop.run_in_executor(state.executor, _selected_limits, state)
            return _json(limits_json(gpus))
        if not state.can_set_limits:
            return _json({"error": {"message": "Setting power limits needs an agent started with a bearer token "
                                    "(--token-file or $JOULEGATE_AGENT_TOKEN).", "type": "permission_error",
                                    "code": "token_required"}}, 403)
        known = {g.index for g in await loop.run_in_executor(state.executor, _selected_limits, state)}
        try:
            wanted = parse_put(orjson.loads(await request.read()), known)
        except (ValueError, orjson.JSONDecodeError) as exc:
            return _json({"error": {"message": str(exc).splitlines()[0], "type": "invalid_request_error",
                                    "code": "invalid_power_limits"}}, 400)
        refused = claim(state.claim, request.headers, time.monotonic())
        if refused is not None:
            return _json(held_json(refused), 409)
        gpus = await loop.run_in_executor(state.executor, _set_limits, state, wanted)
        state.lease_until_mono_s = time.monotonic() + state.limits_lease_s
        release(state.claim, request.headers, request.query)
        return _json(limits_json(gpus))
    except NvmlError as exc:
        return _json({"error": {"message": f"NVML: {exc}", "type": "unavailable"}}, 503)


async def _sampler(state: AgentState) -> None:
    loop = asyncio.get_running_loop()
    failures = 0
    while True:
        deadline_s = loop.time() + state.interval_s
        try:
            if not state.reader.initialised:
                await loop.run_in_executor(state.executor, state.reader.init)
            state.publish(await state.read())
            failures = 0
            if state.original_limits_w and state.limits_lease_s > 0 and time.monotonic() > state.lease_until_mono_s:
                log.warning("power limits lease of %g s ran out (no PUT renewed it): restoring", state.limits_lease_s)
                await loop.run_in_executor(state.executor, _restore_limits, state)
                state.claim = Claim()  # the silent governor's caps are gone: so is its claim
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - NvmlError, or a bug: the sampler must go on
            failures += 1
            state.read_errors += 1
            message = str(exc) if isinstance(exc, NvmlError) else f"{type(exc).__name__}: {exc}"
            if message != state.error:
                log.warning("NVML read failed: %s", message)
            state.error = message
            if failures >= REINIT_AFTER_FAILURES and state.reader.initialised:
                await loop.run_in_executor(state.executor, state.reader.shutdown)
                failures = 0
            deadline_s = max(deadline_s, loop.time() + min(1.0, 5.0 * state.interval_s))
        await asyncio.sleep(max(0.0, deadline_s - loop.time()))


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


async def power(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        obj = await state.read()
    except NvmlError as exc:
        return _json({"error": {"message": f"NVML read failed: {exc}", "type": "unavailable"}}, 503)
    return web.Response(body=orjson.dumps(obj), content_type="application/json")


async def power_stream(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    raw = request.query.get("interval_s")
    try:
        interval_s = state.interval_s if raw is None else float(raw)
        if not interval_s > 0:
            raise ValueError
    except ValueError:
        return _json({"error": {"message": "'interval_s' must be a positive number",
                                "type": "invalid_request_error", "param": "interval_s"}}, 400)
    interval_s = min(max(interval_s, state.interval_s), 3600.0)
    keepalive_s = max(1.0, 2.0 * state.interval_s)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    last_sent_t: float | None = None
    try:
        while not state.closing:
            wake = state.new_reading
            latest = state.latest
            # Every reading at the agent's own interval; at a slower asked interval, the first
            # reading at least interval_s (less half a sampling period of jitter) after the last.
            if latest is not None and state.fresh() and (
                    last_sent_t is None or latest["t"] >= last_sent_t + interval_s - state.interval_s / 2):
                await resp.write(b"data: " + state.latest_body + b"\n\n")
                last_sent_t = latest["t"]
            try:
                await asyncio.wait_for(wake.wait(), keepalive_s)
            except TimeoutError:
                why = f": no reading: {state.error}" if state.error else ": no reading"
                await resp.write(why.replace("\n", " ").encode() + b"\n\n")
    except ConnectionResetError:
        pass
    return resp


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\"", r"\"").replace("\n", r"\n")


def metrics_text(latest: dict[str, Any] | None, power_methods: dict[int, str | None]) -> str:
    """The latest reading in dcgm-exporter's metric names and labels."""
    rows: dict[str, list[str]] = {"DCGM_FI_DEV_POWER_USAGE": [], "DCGM_FI_DEV_POWER_USAGE_INSTANT": [],
                                  "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": []}
    for gpu in (latest or {}).get("gpus", []):
        labels = (f'{{gpu="{gpu["index"]}",UUID="{_escape(gpu["uuid"])}",device="nvidia{gpu["index"]}",'
                  f'modelName="{_escape(gpu["name"])}"}}')
        if gpu["power_w"] is not None:
            rows["DCGM_FI_DEV_POWER_USAGE"].append(f"DCGM_FI_DEV_POWER_USAGE{labels} {gpu['power_w']}")
            if power_methods.get(gpu["index"]) == POWER_INSTANT:
                rows["DCGM_FI_DEV_POWER_USAGE_INSTANT"].append(
                    f"DCGM_FI_DEV_POWER_USAGE_INSTANT{labels} {gpu['power_w']}")
        if gpu["energy_mj"] is not None:
            rows["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"].append(
                f"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{labels} {gpu['energy_mj']}")
    meta = {
        "DCGM_FI_DEV_POWER_USAGE": ("gauge", "Power draw (in W)."),
        "DCGM_FI_DEV_POWER_USAGE_INSTANT": ("gauge", "Current instantaneous power draw (in W)."),
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": ("counter", "Total energy consumption since boot (in mJ)."),
    }
    out: list[str] = []
    for name, lines in rows.items():
        kind, help_text = meta[name]
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *lines]
    return "\n".join(out) + "\n"


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    text = metrics_text(state.latest, state.reader.power_methods)
    return web.Response(body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def healthz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = {"status": "ok" if state.fresh() else "unhealthy", "gpus": len((state.latest or {}).get("gpus", [])),
            "interval_s": state.interval_s, "reads": state.reads, "read_errors": state.read_errors,
            "error": state.error}
    return _json(body, 200 if state.fresh() else 503)


def _bearer_auth(token: str) -> Any:
    """Middleware: 401 unless `Authorization: Bearer <token>` (compared in constant time)."""
    expected = b"Bearer " + token.encode()

    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        presented = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(presented, expected):
            return _json({"error": {"message": "Missing or wrong bearer token.",
                                    "type": "authentication_error", "code": "invalid_token"}}, 401)
        return await handler(request)

    return check


def make_app(reader: NvmlReader, gpus: Sequence[int | str] | None, interval_s: float,
             token: str | None = None, rapl_root: str | None = DEFAULT_ROOT,
             limits_lease_s: float = 0.0) -> web.Application:
    """The agent's aiohttp app. `reader` is an NvmlReader (initialised or not: the sampler
    initialises it, retrying); `gpus` selects among its GPUs (indices or UUIDs, None = all);
    with `token`, every route needs `Authorization: Bearer <token>`."""
    if not interval_s > 0:
        raise ValueError("interval_s must be positive")
    app = web.Application(middlewares=[_bearer_auth(token)] if token else [])

    async def lifecycle(app: web.Application):  # type: ignore[no-untyped-def]
        state = AgentState(reader, gpus, interval_s)
        state.rapl = RaplReader.open(rapl_root) if rapl_root else None
        state.can_set_limits = bool(token)
        state.limits_lease_s = limits_lease_s
        app[STATE] = state
        task = asyncio.create_task(_sampler(state), name="joulegate-agent-sampler")
        yield
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        if state.original_limits_w:
            await asyncio.get_running_loop().run_in_executor(state.executor, _restore_limits, state)
        state.executor.shutdown(wait=False)

    async def on_shutdown(app: web.Application) -> None:
        app[STATE].close_streams()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(on_shutdown)
    app.router.add_get("/v1/power", power)
    app.router.add_get("/v1/power/stream", power_stream)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_route("GET", PATH, power_limits)
    app.router.add_route("PUT", PATH, power_limits)
    return app


def parse_gpus(text: str | None) -> list[int | str] | None:
    """`--gpus 0,1` or `--gpus GPU-8d3c...,1` -> [0, 1] / ["GPU-8d3c...", 1]; empty/None = all."""
    if not text:
        return None
    out: list[int | str] = []
    for part in text.split(","):
        part = part.strip()
        if part:
            out.append(int(part) if part.isdigit() else part)
    return out or None


def is_loopback(host: str) -> bool:
    """True for addresses only this host can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token(token_file: str | None, env: dict[str, str] | None = None) -> str | None:
    """The bearer token: the file's first line if given (SystemExit(2) if unreadable), else
    $JOULEGATE_AGENT_TOKEN, else None."""
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.readline().strip()
        except OSError as exc:
            _die(f"cannot read --token-file {token_file}: {exc.strerror or exc}")
        if not token:
            _die(f"--token-file {token_file} is empty")
        return token
    return (os.environ if env is None else env).get(TOKEN_ENV) or None


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """A server TLS context from a PEM certificate and key, both or neither (else exit 2)."""
    if not cert and not key:
        return None
    if not (cert and key):
        _die("--tls-cert and --tls-key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        _die(f"cannot load --tls-cert/--tls-key: {exc}")
    return context


def run(host: str, port: int, gpus: list[int | str] | None, interval_s: float, token: str | None = None,
        tls: ssl.SSLContext | None = None, rapl_root: str | None = DEFAULT_ROOT,
        limits_lease_s: float = 0.0) -> None:
    """Serve the agent until SIGINT/SIGTERM (blocking).

    If NVML cannot initialise (no GPU or driver, a bad GPU selection), the port cannot be
    bound, or `host` is not a loopback address and there is no `token`, prints one line
    `joulegate agent: error: ...` on stderr and raises SystemExit(2).
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not interval_s > 0:
        _die(f"--interval-s must be positive, not {interval_s}")
    if not limits_lease_s >= 0:
        _die(f"--limits-lease-s must be 0 or more, not {limits_lease_s}")
    if not token and not is_loopback(host):
        # Power readings reveal the load (and so the traffic) of every tenant on the host.
        _die(f"refusing to listen on {host} without a bearer token: pass --token-file FILE or set "
             f"${TOKEN_ENV} (or listen on 127.0.0.1)")
    reader = NvmlReader(gpus)
    try:
        reader.init()
    except NvmlError as exc:
        _die(str(exc))
    gpu_list = ", ".join(f"{i} {name} ({uuid})" for i, uuid, name in reader.gpus)
    log.info("joulegate agent: GPUs %s; counters %s; power %s; every %.3f s on %s://%s:%d%s",
             gpu_list, reader.counters, reader.power_methods, interval_s, "https" if tls else "http", host,
             port, " (bearer token required)" if token else "")
    try:
        web.run_app(make_app(reader, gpus, interval_s, token, rapl_root, limits_lease_s), host=host, port=port, access_log=None,
                    print=None, shutdown_timeout=2.0, ssl_context=tls)
    except OSError as exc:
        _die(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    finally:
        reader.shutdown()


def _die(message: str) -> NoReturn:
    print(f"joulegate agent: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m proxy.agent [--host H] [--port P] [--gpus 0,1] [--interval-s 0.05] [--token-file F]
    [--tls-cert C --tls-key K]`."""
    parser = argparse.ArgumentParser(prog="joulegate agent", description="NVML power agent for a GPU host.")
    add_agent_arguments(parser)
    args = parser.parse_args(argv)
    run_from_args(args)


def add_agent_arguments(parser: argparse.ArgumentParser) -> None:
    """The agent's flags, shared by `joulegate agent` and `python -m proxy.agent`."""
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"listen address (default {DEFAULT_HOST}; any other needs a token)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"listen port (default {DEFAULT_PORT})")
    parser.add_argument("--gpus", default=None, help="GPU indices or UUIDs, comma-separated (default all)")
    parser.add_argument("--interval-s", type=float, default=DEFAULT_INTERVAL_S,
                        help=f"sampling interval in s (default {DEFAULT_INTERVAL_S})")
    parser.add_argument("--token-file", default=None,
                        help=f"file whose first line is the bearer token clients must send (default ${TOKEN_ENV})")
    parser.add_argument("--tls-cert", default=None, help="PEM certificate: serve https")
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--rapl-root", default=DEFAULT_ROOT,
                        help="powercap directory for host CPU/DRAM energy ('' to skip; default %(default)s)")
    parser.add_argument("--limits-lease-s", type=float, default=0.0,
                        help="restore the original power limits when no PUT /v1/power/limits renewed them for "
                             "this many s (a dead-man switch for a governor that vanished; default 0: never)")


def run_from_args(args: argparse.Namespace) -> None:
    """Run with parsed `add_agent_arguments` flags."""
    run(args.host, args.port, parse_gpus(args.gpus), args.interval_s, token=read_token(args.token_file),
        tls=tls_context(args.tls_cert, args.tls_key), rapl_root=args.rapl_root or None,
        limits_lease_s=args.limits_lease_s)


if __name__ == "__main__":
    main()
