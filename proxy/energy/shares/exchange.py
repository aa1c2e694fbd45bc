"""The heartbeat that trades weights with the other replicas through Redis, or falls back.

See the package docstring for the protocol. `make_exchange` builds one from the config.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from proxy.energy.shares.metrics import ExchangeMetrics
from proxy.energy.shares.peer_weights import Chunk, PeerWeights
from proxy.energy.shares.wire import decode_chunks, encode_chunks, id_ms, xread_streams
from proxy.engine_metrics import parse_engine_load
from proxy.redact import redact_text

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from proxy.energy.meter import BackendMeter

__all__ = ["WeightExchange", "make_exchange", "new_replica_id"]

log = logging.getLogger("joulegate.cluster")


def new_replica_id() -> str:
    """hostname-pid-random: unique per process start (a restarted replica is a new peer)."""
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}"


@dataclass(slots=True)
class _Backend:
    """What the exchange knows of one metered backend."""

    name: str
    meter: BackendMeter
    key: bytes
    metrics_url: str | None
    peers: PeerWeights
    outbox: list[Chunk] = field(default_factory=list)
    last_id: bytes = b"0-0"
    source: str = "none"  # where its foreign weights come from now: redis|engine_metrics|none
    # From the last engine-metrics scrape: (when, the others' requests running), or None.
    engine_foreign: tuple[float, int] | None = None
    foreign_j_seen: float = 0.0


class WeightExchange:
    """Publishes this replica's weights per backend and feeds the others' to its attributors."""

    #: Longest an outbox holds unsent chunks while Redis is down (peers no longer wait for them).
    OUTBOX_MAX = 100

    def __init__(
        self,
        meters: dict[str, BackendMeter],
        *,
        redis_url: str | None,
        heartbeat_s: float = 0.1,
        peer_timeout_s: float = 1.0,
        max_wait_s: float = 30.0,
        key_prefix: str = "joulegate:",
        metrics_urls: dict[str, str | None] | None = None,
        in_flight: Callable[[str], int] | None = None,
        engine_scrape_s: float = 0.25,
        replica_id: str | None = None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not heartbeat_s > 0 or not peer_timeout_s > 0 or not max_wait_s >= 0:
            raise ValueError("heartbeat_s and peer_timeout_s must be > 0, max_wait_s >= 0")
        self.redis_url = redis_url
        self.heartbeat_s = heartbeat_s
        self.peer_timeout_s = peer_timeout_s
        self.max_wait_s = max_wait_s
        self.key_prefix = key_prefix
        self.replica_id = replica_id or new_replica_id()
        self.engine_scrape_s = engine_scrape_s
        self.retain_s = max(30.0, 10.0 * peer_timeout_s)
        self._clock = clock
        self._in_flight = in_flight or (lambda _name: 0)
        self._rid = self.replica_id.encode()
        now_s = clock()
        urls = metrics_urls or {}
        self.backends: list[_Backend] = []
        for name, meter in meters.items():
            attributor = meter.attributor
            # Intervals from now on wait for the others' weights (a lone proxy waits one
            # heartbeat at most); with Redis, this replica's own weights are published.
            attributor.foreign_until_s = now_s
            attributor.foreign_max_wait_s = max_wait_s
            attributor.publish_local = redis_url is not None
            self.backends.append(_Backend(
                name, meter, f"{key_prefix}w:{name}".encode(), urls.get(name),
                PeerWeights(now_s)))
        self.redis_ok: bool | None = None  # None: not tried yet (or no Redis configured)
        self.rounds = 0
        self._redis: Any = None
        self._http: Any = None
        self._task: asyncio.Task[None] | None = None
        self._retry_at_s = 0.0
        self._retry_delay_s = 0.0
        self._redis_now_ms = 0
        self._last_scrape_s = -math.inf
        self._metrics = ExchangeMetrics(registry) if registry is not None else None

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the heartbeat (returns at once; Redis trouble never stops the proxy)."""
        if self.redis_url is not None:
            from redis.asyncio import Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            timeout_s = max(0.5, 5 * self.heartbeat_s)
            self._redis = Redis.from_url(
                self.redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                retry=Retry(NoBackoff(), 0))
        if any(b.metrics_url for b in self.backends):
            import httpx

            self._http = httpx.AsyncClient(timeout=httpx.Timeout(1.0))
        self._task = asyncio.create_task(self._run(), name="joulegate-weight-exchange")
        log.info("weight exchange: replica %s, %s, %d backends", self.replica_id,
                 "Redis" if self.redis_url else "engine metrics only (no Redis URL)",
                 len(self.backends))

    async def close(self) -> None:
        """Stop; tell the peers this replica is gone; let the attributors settle the rest."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._redis is not None:
            if self.redis_ok:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._publish_and_read(leaving=True), 1.0)
            with contextlib.suppress(Exception):
                await self._redis.aclose()
        if self._http is not None:
            with contextlib.suppress(Exception):
                await self._http.aclose()
        for b in self.backends:
            b.meter.attributor.foreign_until_s = math.inf  # the last known values from here on
            b.meter.settle(self._clock())

    def state(self) -> dict[str, Any]:
        """For /v1/energy/backends and logs: the replica, Redis, each backend's foreign source."""
        return {
            "replica_id": self.replica_id,
            "redis": None if self.redis_url is None else bool(self.redis_ok),
            "backends": {b.name: self.backend_state(b.name) for b in self.backends},
        }

    def backend_state(self, name: str) -> dict[str, Any] | None:
        for b in self.backends:
            if b.name == name:
                attributor = b.meter.attributor
                return {
                    "foreign_source": b.source,
                    "replicas": b.peers.live_peers() + 1 if b.source == "redis" else None,
                    "foreign_density": attributor.foreign_density,
                    "foreign_in_flight": attributor.foreign_count,
                    "foreign_joules": attributor.finalized_joules_foreign,
                    "foreign_lag_s": max(0.0, self._clock() - attributor.foreign_until_s),
                }
        return None

    # -- the heartbeat ------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_s = loop.time()
        while True:
            next_s += self.heartbeat_s
            delay_s = next_s - loop.time()
            if delay_s < -self.heartbeat_s:
                next_s = loop.time()  # far behind (a stalled loop): no burst of catch-up rounds
            await asyncio.sleep(max(delay_s, 0.0))
            try:
                await self.round()
            except Exception:  # a bug here must not end the exchange
                log.exception("weight exchange round failed")

    async def round(self) -> None:
        """One heartbeat: publish and read through Redis, or fall back; then settle."""
        self.rounds += 1
        for b in self.backends:
            chunk = b.meter.attributor.take_local() if self.redis_url is not None else None
            if chunk is not None:
                b.outbox.append(chunk)
                if len(b.outbox) > self.OUTBOX_MAX:
                    del b.outbox[:len(b.outbox) - self.OUTBOX_MAX]
        if self._redis is not None and time.monotonic() >= self._retry_at_s:
            try:
                await asyncio.wait_for(self._publish_and_read(), max(1.0, 10 * self.heartbeat_s))
            except Exception as exc:  # redis-py's errors, timeouts, a malformed answer
                self._redis_failed(exc)
            else:
                if self.redis_ok is False:
                    log.warning("weight exchange: Redis is back; peers' weights from Redis again")
                self.redis_ok = True
                self._retry_delay_s = 0.0
                self._feed_from_peers()
                self._observe()
                return
        await self._fallback()
        self._observe()

    def _redis_failed(self, exc: BaseException) -> None:
        if self.redis_ok is not False:
            sources = sorted({"engine metrics" if b.metrics_url else "nothing"
                              for b in self.backends})
            log.warning("weight exchange: Redis unreachable (%s: %s); other replicas' weights "
                        "from %s until it is back", type(exc).__name__, redact_text(str(exc)), " or ".join(sources))
        self.redis_ok = False
        self._retry_delay_s = min(2.0, max(0.25, 2 * self._retry_delay_s))
        self._retry_at_s = time.monotonic() + self._retry_delay_s

    async def _publish_and_read(self, leaving: bool = False) -> None:
        """One pipelined round trip: every backend's XADD + PEXPIRE, then one XREAD of all."""
        redis = self._redis
        pipe = redis.pipeline(transaction=False)
        retain_ms = int(self.retain_s * 1000)
        trim_ms = self._redis_now_ms - retain_ms if self._redis_now_ms else None
        for b in self.backends:
            entry: dict[str, Any] = {"c": encode_chunks(b.outbox),
                                     "e": b.meter.attributor.load_density}
            if leaving:
                entry["x"] = 1
            pipe.xadd(b.key, {b"r": self._rid, b"d": orjson.dumps(entry)},
                      minid=trim_ms, approximate=True)
            pipe.pexpire(b.key, retain_ms)
        if not self._redis_now_ms:  # the first read starts a few seconds back
            start = f"{int((self._clock() - 5.0) * 1000)}-0".encode()
            for b in self.backends:
                b.last_id = start
        pipe.xread({b.key: b.last_id for b in self.backends})
        replies = await pipe.execute()
        if not self.backends:
            return
        self._redis_now_ms = id_ms(replies[0])
        for b in self.backends:
            b.outbox.clear()
        by_key = {b.key: b for b in self.backends}
        for key, entries in xread_streams(replies[-1]):
            found = by_key.get(key)
            if found is None:
                continue
            for entry_id, fields in entries:
                found.last_id = entry_id
                peer = fields.get(b"r")
                if peer is None or peer == self._rid:
                    continue
                try:
                    data = orjson.loads(fields.get(b"d", b"{}"))
                    chunks = decode_chunks(data.get("c", []))
                    load_density = float(data.get("e", 0.0))
                except (ValueError, TypeError, AttributeError, orjson.JSONDecodeError):
                    log.debug("weight exchange: skipping a malformed entry %r", entry_id)
                    continue
                found.peers.add(peer.decode("utf-8", "replace"), chunks, id_ms(entry_id),
                            leaving=bool(data.get("x")), load_density=load_density)

    def _feed_from_peers(self) -> None:
        now_s = self._clock()
        timeout_ms = int(self.peer_timeout_s * 1000)
        for b in self.backends:
            attributor = b.meter.attributor
            if b.source != "redis":
                b.source = "redis"
                b.peers.skip_to(attributor.foreign_until_s)
            steps, until_s = b.peers.merge(now_s, self._redis_now_ms, timeout_ms)
            for t_s, density, count in steps:
                attributor.set_foreign(t_s, density, count)
            attributor.foreign_until_s = until_s
            attributor.foreign_estimate_density = b.peers.load_density()
            b.meter.settle(now_s)

    async def _fallback(self) -> None:
        """No Redis: engine metrics (or nothing) stand in for the other replicas."""
        now_s = self._clock()
        if self._http is not None and now_s - self._last_scrape_s >= self.engine_scrape_s:
            self._last_scrape_s = now_s
            await asyncio.gather(*(self._scrape(b) for b in self.backends if b.metrics_url))
        for b in self.backends:
            attributor = b.meter.attributor
            if b.engine_foreign is not None:
                b.source = "engine_metrics"
                t_s, count = b.engine_foreign
                attributor.set_foreign(t_s, count * attributor.density_in_flight, count)
            else:
                b.source = "none"
                attributor.set_foreign(now_s, 0.0, 0)
            attributor.foreign_until_s = now_s
            attributor.foreign_estimate_density = None  # engine figures are current already
            b.peers.skip_to(now_s)
            b.meter.settle(now_s)

    async def _scrape(self, b: _Backend) -> None:
        """The engine's requests minus ours: the others' (running ones at most).

        Ours are counted before and after the scrape and the larger count taken, so a request
        that ended or started while the page was on its way is not taken for another's.
        """
        mine_before = self._in_flight(b.name)
        try:
            page = await self._http.get(b.metrics_url)
            load = parse_engine_load(page.text) if page.status_code == 200 else None
        except Exception as exc:  # noqa: BLE001 - any failure: no engine figures
            if b.engine_foreign is not None:
                log.warning("weight exchange: engine metrics of %s unreadable: %s", b.name, exc)
            b.engine_foreign = None
            return
        if load is None:
            b.engine_foreign = None
            return
        mine = max(mine_before, self._in_flight(b.name))
        count = min(load.running, max(0, load.running + load.waiting - mine))
        b.engine_foreign = (self._clock(), count)

    def _observe(self) -> None:
        if self._metrics is not None:
            self._metrics.observe(self)


def make_exchange(config: Any, meter: Any, pool: Any = None,
                  registry: CollectorRegistry | None = None) -> WeightExchange | None:
    """The exchange a config asks for, or None (a lone proxy: no Redis, no engine metrics).

    Redis: `cluster.redis_url`, else the ledger's URL when it is redis:// or rediss://.
    `pool` (a BackendPool) gives each backend's metrics_url and in-flight count.
    """
    cluster = getattr(config, "cluster", None)
    if cluster is not None and not cluster.enabled:
        return None
    meters = meter.meters
    if not meters:
        return None
    redis_url = cluster.redis_url if cluster is not None else None
    ledger = config.ledger or ""
    if redis_url is None and ledger.startswith(("redis://", "rediss://")):
        redis_url = ledger.partition("?")[0]  # the query holds ledger options, not redis-py's
    metrics_urls = {b.name: b.metrics_url for b in config.backends}
    if redis_url is None and not any(metrics_urls.get(name) for name in meters):
        return None
    in_flight = None
    if pool is not None:
        by_name = pool.by_name

        def in_flight(name: str) -> int:
            backend = by_name.get(name)
            return backend.in_flight if backend is not None else 0

    opts: dict[str, Any] = {}
    if cluster is not None:
        opts = dict(heartbeat_s=cluster.heartbeat_s, peer_timeout_s=cluster.peer_timeout_s,
                    max_wait_s=cluster.max_wait_s, key_prefix=cluster.key_prefix)
    return WeightExchange(meters, redis_url=redis_url, metrics_urls=metrics_urls,
                          in_flight=in_flight, registry=registry, **opts)
