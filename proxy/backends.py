"""Upstream backends: where they are, which models they serve, whether they are up, their load.

Data-plane traffic goes through one pooled aiohttp session (see shared/reference/dataplane.md);
health checks, model discovery and engine-metrics scrapes are low-rate control traffic on httpx.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp
import httpx
import orjson

from policies import BackendView
from policies.model import EfficiencyModel
from proxy.carbon import Site
from proxy.config import BackendConfig, Config
from proxy.engine_metrics import EngineLoad, parse_engine_load
from proxy.redact import redact_text

log = logging.getLogger("joulegate.backends")
# httpx logs every control request at INFO; health checks would flood the log.
logging.getLogger("httpx").setLevel(logging.WARNING)

#: Below the 5 s idle timeout of uvicorn and vLLM, so a pooled connection is never reused
#: just as the server closes it.
UPSTREAM_KEEPALIVE_S = 4.0


class Backend:
    """One OpenAI-compatible inference server and what the proxy knows of it now."""

    def __init__(self, config: BackendConfig, circuit_failures: int = 5,
                 circuit_cooldown_s: float = 10.0) -> None:
        self.config = config
        self.circuit_failures = circuit_failures
        self.circuit_cooldown_s = circuit_cooldown_s
        self.consecutive_failures = 0
        self.circuit_open_until_s = 0.0  # monotonic seconds; in the past: closed or half-open
        self.name = config.name
        self.url = config.url
        self.models: set[str] = set(config.models or [])
        self.healthy = True
        # Parked by the governor (proxy/governor/park.py): asleep, so never routed to.
        self.parked = False
        # Draining (the governor's carbon swap woke a cleaner backend to take its load): awake,
        # routed to only when no other backend has room, parked once empty.
        self.draining = False
        self.in_flight = 0
        # Learned power, token rate and latency vs load: fed by the relay and the power
        # meter (time.time() seconds), read by the efficiency policy.
        self.efficiency = EfficiencyModel()
        self.engine_load: EngineLoad | None = None
        self.site: Site | None = None  # set by the app: PUE and grid intensity (carbon routing)
        self.last_error: str | None = None
        self.last_check_s: float | None = None
        # Non-streamed chat, completions and responses go upstream as streams (proxy/gather.py):
        # the energy split then sees their tokens' times. Only worth it where energy is split.
        self.stream_upstream = (config.stream_upstream if config.stream_upstream is not None
                                else config.power.source != "none")
        self.upstream_headers: dict[str, str] = {"Content-Type": "application/json"}
        if config.api_key:
            self.upstream_headers["Authorization"] = f"Bearer {config.api_key}"

    def view(self, draining_ok: bool = False) -> BackendView:
        """The policy's snapshot of this backend (a draining one as unhealthy unless
        `draining_ok`)."""
        load = self.engine_load
        return BackendView(
            name=self.name,
            healthy=(self.healthy and not self.parked and not self.circuit_open()
                     and (draining_ok or not self.draining)),
            in_flight=self.in_flight,
            queued=load.waiting if load else 0,
            running=load.running if load else None,
            max_concurrency=self.config.max_concurrency,
            **({"pue": self.site.pue, "gco2e_per_kwh": self.site.gco2e_per_kwh()} if self.site else {}),
        )

    def circuit_open(self) -> bool:
        """True while the breaker refuses traffic: during its cooldown, and after it (half-open)
        while a request is out there as the probe; the probe's outcome closes or re-opens it."""
        if self.circuit_open_until_s <= 0:
            return False
        return time.monotonic() < self.circuit_open_until_s or self.in_flight > 0

    def record_failure(self, reason: str) -> None:
        """A connect failure, garbage or a 5xx (never a time-out: a request that ran past its own
        limit says nothing about the backend): past the threshold (or half-open) open the circuit."""
        self.consecutive_failures += 1
        if self.consecutive_failures >= self.circuit_failures:
            if self.circuit_open_until_s <= 0:
                log.warning("backend %s: circuit open for %.0f s after %d failures (%s)", self.name,
                            self.circuit_cooldown_s, self.consecutive_failures, reason)
            self.circuit_open_until_s = time.monotonic() + self.circuit_cooldown_s

    def record_success(self) -> None:
        if self.circuit_open_until_s:
            log.info("backend %s: circuit closed", self.name)
        self.consecutive_failures = 0
        self.circuit_open_until_s = 0.0

    def mark_down(self, reason: str) -> None:
        """Passive health: the relay saw it refuse a connection; the health loop brings it back."""
        reason = redact_text(reason)  # error texts may quote the backend's URL
        if self.healthy:
            log.warning("backend %s marked down: %s", self.name, reason)
        self.healthy = False
        self.last_error = reason


class BackendPool:
    """All backends, the model → backends map, the shared upstream session, the health loop."""

    def __init__(self, config: Config) -> None:
        self.config = config
        server = config.server
        self.backends: list[Backend] = [
            Backend(b, server.circuit_failures, server.circuit_cooldown_s) for b in config.backends
        ]
        self.by_name: dict[str, Backend] = {b.name: b for b in self.backends}
        self.session: aiohttp.ClientSession | None = None
        # One connection per request, closed after it: where a pooled connection turned out stale.
        self.fresh_session: aiohttp.ClientSession | None = None
        self._control: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._by_model: dict[str, list[Backend]] = {}
        self._rebuild_model_map()

    async def start(self) -> None:
        """Open the upstream pool, discover models once, start the health loop."""
        connector = aiohttp.TCPConnector(
            limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE_S, ttl_dns_cache=300, enable_cleanup_closed=True,
        )
        # Bytes are relayed untouched: never ask the backend to compress them.
        options = {"skip_auto_headers": ("Accept-Encoding", "User-Agent"), "auto_decompress": False}
        self.session = aiohttp.ClientSession(connector=connector, **options)  # type: ignore[arg-type]
        self.fresh_session = aiohttp.ClientSession(  # type: ignore[arg-type]
            connector=aiohttp.TCPConnector(limit=0, force_close=True), **options)
        self._control = httpx.AsyncClient(timeout=self.config.server.connect_timeout_s)
        await self.check_all()
        self._task = asyncio.create_task(self._health_loop(), name="joulegate-health")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for session in (self.session, self.fresh_session):
            if session:
                await session.close()
        if self._control:
            await self._control.aclose()

    def for_model(self, model: str) -> list[Backend]:
        """Backends that serve `model` (healthy or not); empty if nobody does."""
        return self._by_model.get(model, [])

    def model_ids(self) -> list[str]:
        return sorted(self._by_model)

    def _rebuild_model_map(self) -> None:
        by_model: dict[str, list[Backend]] = {}
        for backend in self.backends:
            for model in backend.models:
                by_model.setdefault(model, []).append(backend)
        self._by_model = by_model

    async def _health_loop(self) -> None:
        interval_s = self.config.server.health_interval_s
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.check_all()
            except Exception:  # a bug here must not stop health checks for good
                log.exception("health check round failed")

    async def check_all(self) -> None:
        """One round: each backend's /models (health and discovery) and engine metrics."""
        await asyncio.gather(*(self._check(b) for b in self.backends))
        self._rebuild_model_map()

    async def _check(self, backend: Backend) -> None:
        """Probe one backend; whatever it answers (or not), mark it and never raise: a
        malformed, slow or refusing backend must not stop the proxy, only itself."""
        assert self._control is not None
        headers = {k: v for k, v in backend.upstream_headers.items() if k == "Authorization"}
        try:
            # httpx's timeout is per phase; this caps a server that answers a byte at a time.
            async with asyncio.timeout(2 * self.config.server.connect_timeout_s):
                resp = await self._control.get(f"{backend.url}/models", headers=headers)
            reason = None if resp.status_code == 200 else f"GET /models answered HTTP {resp.status_code}"
            if reason is None and backend.config.models is None:
                models = discovered_models(resp.content)
                if models is None:
                    reason = "GET /models answered no OpenAI model list ({\"data\": [{\"id\": ...}]})"
                else:
                    backend.models = models
        except (TimeoutError, httpx.TimeoutException):
            reason = "GET /models timed out"
        except Exception as exc:  # any transport or decoding failure: this backend is down
            # Redacted before it is cut: a URL cut inside its userinfo would keep the password.
            reason = redact_text(f"GET /models failed: {type(exc).__name__}: {exc}")[:240]
        ok = reason is None
        if ok and not backend.healthy:
            log.info("backend %s is back", backend.name)
        elif not ok and (backend.healthy or backend.last_error != reason):
            log.warning("backend %s failed its health check: %s", backend.name, reason)
        backend.healthy = ok
        backend.last_error = reason
        backend.last_check_s = time.time()
        if backend.config.metrics_url:
            try:
                page = await self._control.get(backend.config.metrics_url)
                backend.engine_load = parse_engine_load(page.text) if page.status_code == 200 else None
            except Exception:  # a bad metrics page only costs the load figures
                backend.engine_load = None


def discovered_models(body: bytes) -> set[str] | None:
    """Model ids in an OpenAI `/models` answer; None when the body is not that shape."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        return None
    return {m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"]}
