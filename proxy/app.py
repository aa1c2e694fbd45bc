"""The ASGI application: routes, lifespan, and the safety net that keeps errors OpenAI-shaped."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Any

import orjson

from policies import make_policy
from proxy.auth import Authenticator
from proxy.backends import BackendPool
from proxy.config import Config, load_config
from proxy.errors import ProxyError
from proxy.metrics import Metrics
from proxy.records import RequestRecord
from proxy.relay import Receive, Relay, Scope, Send, send_error

log = logging.getLogger("joulegate")

#: Inference routes and the kind of request each one carries.
_INFERENCE: dict[str, str] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/embeddings": "embedding",
}
_RECENT_LIMIT = 10_000


class JouleGate:
    """The proxy as one ASGI callable."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.pool = BackendPool(config)
        self.auth = Authenticator(config)
        self.policy = make_policy(config.routing.policy)
        self.metrics = Metrics()
        # Recently finished requests by id, bounded; the ledger keeps them for good.
        self.recent: OrderedDict[str, RequestRecord] = OrderedDict()
        self.relay = Relay(config, self.pool, self.policy, self.auth, self._finished)

    def _finished(self, record: RequestRecord) -> dict[str, Any] | None:
        """Book-keeping for one finished request; returns its energy object (none yet)."""
        self.metrics.observe(record)
        self.recent[record.request_id] = record
        if len(self.recent) > _RECENT_LIMIT:
            self.recent.popitem(last=False)
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            started = False

            async def tracked_send(message: dict[str, Any]) -> None:
                nonlocal started
                started = True
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
        kind = _INFERENCE.get(path)
        if kind is not None:
            if method != "POST":
                await send_error(send, _method_not_allowed(path), "")
                return
            await self.relay(scope, receive, send, kind)
            return
        if path == "/v1/models" or path.startswith("/v1/models/"):
            await self._models(scope, send, path)
        elif path == "/healthz":
            await _send_json(send, 200, {"status": "ok"})
        elif path == "/readyz":
            ready = any(b.healthy for b in self.pool.backends)
            await _send_json(send, 200 if ready else 503, {"ready": ready, "backends": {
                b.name: b.healthy for b in self.pool.backends}})
        elif path == "/metrics":
            for backend in self.pool.backends:
                self.metrics.backend_up.labels(backend.name).set(1 if backend.healthy else 0)
                self.metrics.backend_in_flight.labels(backend.name).set(backend.in_flight)
            await _send(send, 200, self.metrics.render(), b"text/plain; version=0.0.4; charset=utf-8")
        elif path.startswith("/v1/") and method == "POST":
            # Any other OpenAI-style call that names a model is passed through to a backend.
            await self.relay(scope, receive, send, "other")
        else:
            await send_error(send, ProxyError(404, f"No route for {method} {path}.", code="not_found"), "")

    async def _models(self, scope: Scope, send: Send, path: str) -> None:
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
                    await self.pool.start()
                except Exception as exc:
                    log.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                log.info("joulegate ready: %d backends, policy %s", len(self.pool.backends), self.policy.name)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.pool.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _method_not_allowed(path: str) -> ProxyError:
    return ProxyError(405, f"Only POST is allowed on {path}.", code="method_not_allowed")


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

