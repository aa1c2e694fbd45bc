"""The ASGI application: routes, lifespan, and the safety net that keeps errors OpenAI-shaped."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import orjson

from policies import make_policy
from proxy.accounting import Accounting
from proxy.admin import KeysAdmin
from proxy.auth import Authenticator, Principal
from proxy.backends import BackendPool
from proxy.config import Config, load_config
from proxy.dashboard import EnergyStream, page_html, parse_interval_s
from proxy.energy.meter import EnergyMeter
from proxy.energy.shares import make_exchange
from proxy.errors import ProxyError, bad_request
from proxy.governor.actuate import Governor
from proxy.keystore import open_keystore
from proxy.keystore.table import KeyTable
from proxy.ledger import LedgerRecord, open_ledger
from proxy.ledger.usage import parse_group_by, parse_time_s, rows_to_csv, usage_payload
from proxy.metrics import Metrics
from proxy.metrics_server import start_metrics_listener
from proxy.ratelimit import open_rate_store
from proxy.ratelimit.limiter import RateLimiter
from proxy.records import RequestRecord
from proxy.relay import REFUSAL, Receive, Relay, Scope, Send, scan_headers, send_error
from proxy.stores import parse_store
from proxy.telemetry import Telemetry

log = logging.getLogger("joulegate")

#: Inference routes and the kind of request each one carries.
_INFERENCE: dict[str, str] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/embeddings": "embedding",
    "/v1/responses": "response",  # the Responses API: billed like chat
}

#: What a tenant key sees of each backend in `GET /v1/energy/backends`; every other field
#: (power readings, idle W, sources, cluster state...) is operational detail for admin keys.
_TENANT_BACKEND_FIELDS = ("name", "healthy", "models", "tokens_per_joule")
#: Query strings forwarded upstream; aiohttp-based engines refuse request lines over 8190 bytes.
_MAX_QUERY_BYTES = 4096

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Route:
    """Where a path goes: `handler`, for the methods in `allow` (None: any method); any other
    method gets 405 naming them in its Allow header."""

    handler: Handler
    allow: tuple[str, ...] | None = None


class JouleGate:
    """The proxy as one ASGI callable."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.pool = BackendPool(config)
        self.auth = Authenticator(config)
        self.policy = make_policy(
            config.routing.policy, models={b.name: b.efficiency for b in self.pool.backends},
            slo_ttft_s=config.routing.slo.ttft_ms / 1e3, slo_tpot_s=config.routing.slo.tpot_ms / 1e3,
            objective=config.routing.objective,
        )
        self.metrics = Metrics(tenant_label=config.metrics.tenant_label)
        # OpenTelemetry spans (proxy/telemetry.py); None unless an OTLP endpoint is configured.
        self.telemetry = Telemetry.from_config(config)
        self.accounting = Accounting(config, open_ledger(config.ledger or "memory://"), self.metrics,
                                     telemetry=self.telemetry)
        self.meter = EnergyMeter(config, self.accounting.measured)
        for backend in self.pool.backends:  # its site's PUE and grid intensity, for routing
            backend.site = self.accounting.carbon.site_of(backend.name)
        for backend in self.pool.backends:  # each power sample also teaches the backend's model
            if backend.name in self.meter.meters:
                self.meter.meters[backend.name].efficiency = backend.efficiency
        # Replicas sharing a backend each bill only their share (Redis, or engine metrics).
        self.exchange = make_exchange(config, self.meter, self.pool, self.metrics.registry)
        # Managed keys and rate-limit counters live beside the ledger, in its store.
        store = parse_store(config.ledger or "memory://")
        self.keys = KeyTable(open_keystore(store), self.auth)
        self.limiter = RateLimiter(config, open_rate_store(store), self.metrics)
        self.relay = Relay(config, self.pool, self.policy, self.auth, self.meter, self.accounting,
                           self.limiter, self.telemetry)
        # Other POST routes relayed upstream: an allowlist (config.DEFAULT_PASSTHROUGH), exact paths.
        self.passthrough = config.server.passthrough_paths()
        # /v1/responses is on that allowlist too: removed there, it is not served either.
        self._kinds = {p: k for p, k in _INFERENCE.items() if k != "response" or p in self.passthrough}
        self._metrics_listener: Any = None
        self.site_of = {b.name: b.site for b in config.backends if b.site}  # usage group_by=site
        # The route table: exact paths first, then prefixes in order, then the pass-through
        # allowlist (POST only; other methods there are the 404 of an unknown path).
        self.routes: dict[str, Route] = {
            **{path: Route(self._inference, ("POST",)) for path in self._kinds},
            "/v1/models": Route(self._models),
            "/healthz": Route(self._healthz, ("GET", "HEAD")),
            "/readyz": Route(self._readyz, ("GET", "HEAD")),
        }
        admin = KeysAdmin(self.auth, self.keys,  # managed API keys (proxy/admin.py)
                          siteless=[b.name for b in config.backends if b.site is None])
        self.routes["/v1/admin/keys"] = Route(admin.keys, ("GET", "POST"))
        if config.server.metrics_port is None:  # else /metrics is served on its own port only
            self.routes["/metrics"] = Route(self._metrics)
        self.prefix_routes: tuple[tuple[str, Route], ...] = (
            ("/v1/models/", Route(self._models)),
            # GET only, never passed through: these are the proxy's own.
            ("/v1/energy/", Route(self._energy_api, ("GET",))),
            ("/v1/admin/keys/", Route(admin.key, ("GET", "DELETE"))),
        )
        self.passthrough_route = Route(self._passthrough, ("POST",))
        self.governor = Governor(config, self.pool, self.metrics)  # power caps: proxy/governor/
        if self.governor.parking is not None:  # a request with only parked backends left wakes one
            self.relay.waker = self.governor.parking.wake_for
        # The live dashboard (proxy/dashboard/): its SSE feed, and the page that reads it.
        self.energy_stream = EnergyStream(self._backend_views, _TENANT_BACKEND_FIELDS, self.accounting.ledger)
        self.routes["/v1/energy/stream"] = Route(self._energy_stream, ("GET",))
        self.routes["/dashboard"] = Route(self._dashboard, ("GET", "HEAD"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            started = False

            async def tracked_send(message: dict[str, Any]) -> None:
                nonlocal started
                if not started:
                    started = True
                    # The one place refusals are counted: every error the proxy answers itself
                    # goes out through `send_error`, which names its code here.
                    reason = message.get(REFUSAL)
                    if reason is not None and (message["status"] < 500 or message["status"] == 503):
                        self.metrics.refused.labels(reason).inc()
                await send(message)

            try:
                await self._route(scope, receive, tracked_send)
            except Exception:
                # A bug must still answer in OpenAI's shape, never with a traceback.
                log.exception("unhandled error on %s %s", scope["method"], scope["path"])
                if not started:
                    await send_error(send, ProxyError(500, "Internal error in the proxy.", code="internal_error"), "")
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        kind = self._kinds.get(path)
        if kind is not None and method == "POST" and len(scope.get("query_string", b"")) <= _MAX_QUERY_BYTES:
            await self.relay(scope, receive, send, kind)  # the hot path: it sets its own request id
            return
        send = _with_request_id(scope, send)
        route = self._find_route(path, method)
        if route is None:
            # Engine admin routes (LoRA loading, sleep, cache resets...) land here too: only the
            # allowlisted paths ever reach a backend.
            shown = path if len(path) <= 200 else path[:200] + "..."
            await send_error(send, ProxyError(404, f"No route for {method} {shown}.", code="not_found"), "")
        elif route.allow is not None and method not in route.allow:
            await send_error(send, _method_not_allowed(path, ", ".join(route.allow)), "")
        else:
            await route.handler(scope, receive, send)

    def _find_route(self, path: str, method: str) -> Route | None:
        """The route table's entry for `path`, or None (404)."""
        route = self.routes.get(path)
        if route is not None:
            return route
        for prefix, route in self.prefix_routes:
            if path.startswith(prefix):
                return route
        if method == "POST" and path in self.passthrough:
            return self.passthrough_route
        return None

    # ---- handlers: each answers one route of the table ------------------------------------------
    async def _inference(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A POST `_route` did not relay at once: its query string is too long."""
        # Forwarded upstream with the path: keep it under every engine's line limit.
        await send_error(send, _uri_too_long(), "")

    async def _passthrough(self, scope: Scope, receive: Receive, send: Send) -> None:
        if len(scope.get("query_string", b"")) > _MAX_QUERY_BYTES:
            await send_error(send, _uri_too_long(), "")
        else:
            await self.relay(scope, receive, send, "other")

    async def _healthz(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_json(send, 200, {"status": "ok"})

    async def _readyz(self, scope: Scope, receive: Receive, send: Send) -> None:
        ready = any(b.healthy for b in self.pool.backends)
        # Why each unhealthy backend is down, so a bad one is diagnosed from the probe.
        await _send_json(send, 200 if ready else 503, {"ready": ready, "backends": {
            b.name: b.healthy for b in self.pool.backends}, "errors": {
            b.name: b.last_error for b in self.pool.backends if not b.healthy}})

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send(send, 200, self.render_metrics(), b"text/plain; version=0.0.4; charset=utf-8")

    def render_metrics(self) -> bytes:
        """Prometheus text, with the backends' gauges refreshed first."""
        for view in self._backend_views():
            name = view["name"]
            self.metrics.backend_up.labels(name).set(1 if view["healthy"] else 0)
            self.metrics.backend_in_flight.labels(name).set(view["in_flight"])
            if view["power_source_up"] is not None:
                self.metrics.power_source_up.labels(name).set(1 if view["power_source_up"] else 0)
                self.metrics.observe_power(name, view)
            for gauge, key in ((self.metrics.backend_power_w, "power_w"), (self.metrics.backend_idle_w, "idle_w"),
                               (self.metrics.backend_tokens_per_joule, "tokens_per_joule")):
                if view[key] is not None:
                    gauge.labels(name).set(view[key])
        return self.metrics.render()

    async def _energy_api(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        try:
            principal = self.auth.authenticate(dict(scope["headers"]).get(b"authorization"))
            if path.startswith("/v1/energy/requests/"):
                request_id = path[len("/v1/energy/requests/"):]
                # Only the caller's own requests are searched (x-request-ids are the clients'
                # and may collide across tenants); another tenant's id then takes the same path
                # and gets the same 404 as an unknown one, so ids cannot be probed.
                record = await self.accounting.lookup(
                    request_id, tenant=None if principal.is_admin else principal.tenant)
                if record is None or not (principal.is_admin or record.tenant == principal.tenant):
                    raise ProxyError(404, f"No request `{request_id}` for this API key.",
                                     param="request_id", code="request_not_found")
                await _send_json(send, 200, request_view(record))
            elif path == "/v1/energy/usage":
                await self._usage(scope, send, principal)
            elif path == "/v1/energy/backends":
                views = self._backend_views()
                if not principal.is_admin:
                    views = [{k: v[k] for k in _TENANT_BACKEND_FIELDS} for v in views]
                await _send_json(send, 200, {"object": "list", "data": views})
            else:
                raise ProxyError(404, f"No route for GET {path}.", code="not_found")
        except ProxyError as exc:
            await send_error(send, exc, "")

    async def _usage(self, scope: Scope, send: Send, principal: Principal) -> None:
        """`GET /v1/energy/usage`: the caller's tenant; an admin sees all or `?tenant=`."""
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        arg = {k: v[-1] for k, v in query.items()}
        try:
            group_by = parse_group_by(arg.get("group_by"))
            since_s, until_s = parse_time_s(arg.get("since")), parse_time_s(arg.get("until"))
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        tenant = principal.tenant
        if principal.is_admin:
            tenant = arg.get("tenant")
        elif arg.get("tenant") not in (None, principal.tenant):
            raise ProxyError(403, "Only an admin key can read another tenant's usage.", code="forbidden")
        try:
            rows = await self.accounting.ledger.usage(tenant=tenant, since_s=since_s, until_s=until_s,
                                                      group_by=group_by, site_of=self.site_of)
        except Exception as exc:  # any store failure (redis-py's errors are not OSErrors)
            raise ProxyError(503, f"The ledger is unavailable: {type(exc).__name__}.", code="ledger_unavailable") from None
        if arg.get("format") == "csv":
            await _send(send, 200, rows_to_csv(rows, group_by).encode(), b"text/csv; charset=utf-8")
        else:
            await _send_json(send, 200, usage_payload(rows, group_by))

    async def _energy_stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`GET /v1/energy/stream`: SSE snapshots (proxy/dashboard/stream.py), scoped to the key."""
        try:
            principal = self.auth.authenticate(dict(scope["headers"]).get(b"authorization"))
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            interval_s = parse_interval_s({k: v[-1] for k, v in query.items()})
        except ProxyError as exc:
            await send_error(send, exc, "")
            return
        await self.energy_stream.serve(receive, send, principal, interval_s)

    async def _dashboard(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`GET /dashboard`: the page; it asks for a key and reads /v1/energy/stream."""
        await _send(send, 200, page_html(), b"text/html; charset=utf-8")

    def _backend_views(self) -> list[dict[str, Any]]:
        views = []
        for backend in self.pool.backends:
            meter = self.meter.meters.get(backend.name)
            source = meter.source if meter else None
            views.append({
                "name": backend.name,
                "healthy": backend.healthy,
                "parked": backend.parked,  # by the governor: asleep, not routed to (governor.parking says more)
                "in_flight": backend.in_flight,
                "models": sorted(backend.models),
                "power_source": backend.config.power.source,
                "power_source_healthy": source.healthy if source else None,
                # False while readings are missing and the energy is modelled (`estimated`).
                "power_source_up": meter.source_up if meter else None,
                "power_source_down_since": _iso(meter.down_since_s) if meter and not meter.source_up else None,
                "energy_modelled_j": meter.modelled_j if meter else None,
                "power_w": meter.last_power_w if meter else None,
                "idle_w": meter.idle_w() if meter else None,
                # The learned split weights (energy.learn); admin keys only, like power and idle.
                "split_weights": meter.learner.weights.as_dict() if meter and meter.learner else None,
                # How many finals a cold start holds for the learned weights (0: none held).
                "finals_held": meter.held_n if meter else None,
                "tokens_per_joule": meter.recent_tokens_per_joule() if meter else None,
                "cluster": self.exchange.backend_state(backend.name) if self.exchange else None,
                # Can the readings be trusted: clock offset, sample gaps, discards, resets.
                **self.meter.power_health(backend.name),
                "governor": self.governor.view(backend.name),
            })
        return views

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        headers = dict(scope["headers"])
        try:
            self.auth.authenticate(headers.get(b"authorization"))
        except ProxyError as exc:
            await send_error(send, exc, "")
            return
        models = [
            {"id": m, "object": "model", "created": 0, "owned_by": "joulegate",
             "backends": [b.name for b in self.pool.for_model(m)]}
            for m in self.pool.model_ids()
        ]
        if path == "/v1/models":
            await _send_json(send, 200, {"object": "list", "data": models})
            return
        wanted = path[len("/v1/models/"):]
        for model in models:
            if model["id"] == wanted:
                await _send_json(send, 200, model)
                return
        await send_error(send, ProxyError(404, f"The model `{wanted}` does not exist.", param="model",
                                          code="model_not_found"), "")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.accounting.start()
                    await self.keys.start()
                    await self.limiter.start()
                    await self.pool.start()
                    if self.config.energy.state_file is not None:
                        self.meter.load_state(self.config.energy.state_file, time.time())
                    await self.meter.start()
                    await self.governor.start()
                    await self.energy_stream.start()
                    if self.exchange is not None:
                        await self.exchange.start()
                    if self.config.server.metrics_port is not None:
                        self._metrics_listener = await start_metrics_listener(
                            self.config.server.host, self.config.server.metrics_port, self.render_metrics,
                            reuse_port=self.metrics.multiprocess)
                except Exception as exc:
                    log.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                _tune_gc()
                log.info("joulegate ready: %d backends, policy %s", len(self.pool.backends), self.policy.name)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._metrics_listener is not None:
                    await self._metrics_listener.cleanup()
                if self.exchange is not None:
                    await self.exchange.close()
                await self.energy_stream.close()
                await self.governor.close()  # puts back the power limits it changed
                await self.relay.watchdog.close()
                await self.meter.close()
                if self.config.energy.state_file is not None:
                    self.meter.save_state(self.config.energy.state_file)
                await self.pool.close()
                await self.accounting.close()
                await self.limiter.close()
                await self.keys.close()
                if self.telemetry is not None:  # after accounting booked the last requests
                    await asyncio.to_thread(self.telemetry.close)
                await send({"type": "lifespan.shutdown.complete"})
                return


def _tune_gc() -> None:
    """Keep full collections off the tail latency.

    Measured with bench/overhead: at c=32 the default thresholds ran a 35-50 ms full collection
    about every 0.5 s over ~70k long-lived objects (imports, pools) and freed nothing; that
    doubled p99. Freezing what exists after start-up and collecting young objects less often
    removes those pauses; request garbage is acyclic and freed by reference counting anyway.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def request_view(record: RequestRecord | LedgerRecord) -> dict[str, Any]:
    """`GET /v1/energy/requests/{id}`: the energy object plus who, what and when."""
    if isinstance(record, LedgerRecord):
        tokens = record.completion_tokens or record.prompt_tokens
        energy: dict[str, Any] = {
            "joules": record.joules, "tokens_per_joule": tokens / record.joules if record.joules > 0 else 0.0,
            "backend": record.backend, "method": record.method,
            "joules_all_in": record.joules_all_in, "gco2e": record.gco2e,
        }
    else:
        energy = record.energy() or {"joules": None, "tokens_per_joule": None, "backend": record.backend,
                                     "method": None}
        if record.host_joules is not None:  # the all-in breakdown: host J, and where it ran
            energy = {**energy, "host_joules": record.host_joules, "site": record.site}
    return {
        "request_id": record.request_id, **energy, "tenant": record.tenant, "model": record.model,
        "prompt_tokens": record.prompt_tokens, "completion_tokens": record.completion_tokens,
        "reasoning_tokens": record.reasoning_tokens, "start": _iso(record.start_s), "end": _iso(record.end_s), "status": record.status,
    }


def _iso(t_s: float | None) -> str | None:
    if t_s is None:
        return None
    return datetime.fromtimestamp(t_s, tz=UTC).isoformat(timespec="milliseconds")


def _with_request_id(scope: Scope, send: Send) -> Send:
    """`send`, adding an `x-request-id` (the client's, else a new one) to an answer without one:
    every response carries one, the control endpoints' too."""
    request_id = (scan_headers(scope["headers"])[1] or os.urandom(12).hex()).encode()

    async def send_with_id(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers = message.get("headers", [])
            if not any(name == b"x-request-id" and value for name, value in headers):
                headers = [h for h in headers if h[0] != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id)]}
        await send(message)

    return send_with_id


def _method_not_allowed(path: str, allowed: str) -> ProxyError:
    shown = path if len(path) <= 200 else path[:200] + "..."
    return ProxyError(405, f"Only {allowed} is allowed on {shown}.", code="method_not_allowed",
                      headers=[(b"allow", allowed.encode())])


def _uri_too_long() -> ProxyError:
    return ProxyError(414, f"The query string is longer than {_MAX_QUERY_BYTES} bytes.", code="uri_too_long")


async def _send(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]})
    await send({"type": "http.response.body", "body": body})


async def _send_json(send: Send, status: int, obj: Any) -> None:
    await _send(send, status, orjson.dumps(obj), b"application/json")


def create_app(config: Config) -> JouleGate:
    return JouleGate(config)


def app_from_env() -> JouleGate:
    """Factory for `uvicorn --factory` with several workers: config path in $JOULEGATE_CONFIG."""
    config = load_config(os.environ["JOULEGATE_CONFIG"])
    overrides = os.environ.get("JOULEGATE_SERVER_OVERRIDES")
    if overrides:
        config.server = config.server.model_copy(update=orjson.loads(overrides))
    return JouleGate(config)

