"""Many replicas, one backend: each proxy bills only its share of the backend's energy.

Every proxy replica (or uvicorn worker) that sends requests to a backend measures the same GPU
energy but sees only its own requests. Left alone, each would split the whole measured energy
among its own requests, and N replicas would bill the fleet N times over. So the replicas
exchange their weights through Redis, off the request path:

- Each replica's attributor fixes its local weight density (weight/s, the units of
  attribution.py) over each sample interval before it splits the interval ("weighing"). Every
  `heartbeat_s` the exchange takes what was weighed since the last heartbeat (`take_local`: a
  step function of (density, in-flight count) over [from_s, until_s)) for every backend and
  sends it in ONE pipelined round trip: per backend an XADD to the stream
  `<prefix>w:<backend>` (entry `r` = replica id, `d` = the steps), a PEXPIRE, and one XREAD of
  all those streams since the last entry read.
- The other replicas' steps for a backend are merged into one step function (`PeerWeights`)
  and fed to the local attributor (`set_foreign`) up to the watermark `foreign_until_s`: the
  earliest time up to which every live peer has published. An interval is split once the
  watermark passes its end (or `max_wait_s` after it, with the last known values). Each
  replica then splits with the same global weights a single proxy holding every request would
  use, so the replicas' shares add up to the backend's busy energy, whatever their number
  (tests/test_shares.py checks it against one attributor holding every request). A replica
  weighs an interval only once its own requests' weights are known (a non-streamed request's
  at its end), so the fleet finalizes as late as one proxy holding every request would.
- Each entry also carries the replica's rough load now (requests in flight x recent weight
  per request), summed into `foreign_estimate_density`: estimates made before the final
  split (response headers, budgets) count the others' open requests too.
- A peer whose newest entry is older than `peer_timeout_s` (Redis's clock: the stream ids) is
  dead: its weight is 0 after what it published, and it stops holding the watermark back. A
  replica that shuts down says so in its last entry.
- Redis unreachable: engine metrics stand in (per backend with `metrics_url`): foreign running
  requests = min(running, running + waiting - in flight here), each weighing what one request in
  flight here recently weighed (scraped every `engine_scrape_s`); without engine metrics the others count for nothing (a lone proxy's
  behaviour). Logged once per change; `state()` and the metrics say which source is in use.
  Without any Redis URL, engine metrics are the only source (e.g. `serve --workers N`).

Redis load: 10 round trips a second per replica, whatever the request rate; entries are trimmed
to `retain_s` (XADD MINID) and the keys expire when every replica is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import orjson

from proxy.engine_metrics import parse_engine_load
from proxy.redact import redact_text

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from proxy.energy.meter import BackendMeter

__all__ = ["PeerWeights", "WeightExchange", "make_exchange", "new_replica_id"]

log = logging.getLogger("joulegate.cluster")

Step = tuple[float, float, int]  # (t_s, weight density per s, requests in flight)
Chunk = tuple[float, float, list[Step]]  # over [from_s, until_s): these steps

_ZERO_STEP = (0.0, 0)
_FIRST_t = itemgetter(0)


def new_replica_id() -> str:
    """hostname-pid-random: unique per process start (a restarted replica is a new peer)."""
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}"


# -- the other replicas' weights for one backend (pure) -----------------------------------------


@dataclass(slots=True)
class _Peer:
    steps: list[Step] = field(default_factory=list)  # sorted by time
    until_s: float | None = None  # its weights are published up to here; None: no samples yet
    seen_ms: int = 0  # Redis time (stream id) of its newest entry
    dead: bool = False
    load_density: float = 0.0  # its rough weight density now (for estimates only)

    def push(self, t_s: float, density: float, count: int) -> None:
        steps = self.steps
        while steps and steps[-1][0] >= t_s:  # a newer word on the same time
            steps.pop()
        steps.append((t_s, density, count))

    def die(self) -> None:
        """From the end of what it published on, it weighs nothing."""
        self.dead = True
        if self.until_s is not None and (not self.steps or self.steps[-1][1:] != _ZERO_STEP):
            self.push(self.until_s, 0.0, 0)


class PeerWeights:
    """Other replicas' published weights for one backend, merged into one step function.

    Pure: no I/O, no clock reads. `add` takes each peer's chunks as they are read; `merge`
    hands out the sum over peers as steps (t_s, density, count) from `fed_until_s` to the
    watermark: the earliest `until_s` of the live peers (`now_s` when there is none).
    """

    def __init__(self, since_s: float) -> None:
        self.fed_until_s = since_s
        self.peers: dict[str, _Peer] = {}
        self._fed: tuple[float, int] | None = _ZERO_STEP  # the sum in force at fed_until_s

    def add(self, peer_id: str, chunks: Iterable[Chunk], seen_ms: int, leaving: bool = False,
            load_density: float = 0.0) -> None:
        """One entry of `peer_id`, written at `seen_ms` (Redis time, ms); `load_density`: its
        rough weight density at the time (weight/s), for estimates."""
        peer = self.peers.get(peer_id)
        if peer is None:
            peer = self.peers[peer_id] = _Peer()
        if seen_ms >= peer.seen_ms:
            peer.load_density = load_density
        peer.seen_ms = max(peer.seen_ms, seen_ms)
        if peer.dead and not leaving:
            peer.dead = False  # only slow, not gone: what it publishes from now on counts
        for _from_s, until_s, steps in chunks:
            for t_s, density, count in steps:
                peer.push(t_s, density, count)
            if peer.until_s is None or until_s > peer.until_s:
                peer.until_s = until_s
        if leaving:
            peer.die()

    def skip_to(self, t_s: float) -> None:
        """Something else stood in for the peers up to `t_s` (a Redis outage): resume there."""
        if t_s > self.fed_until_s:
            self.fed_until_s = t_s
            self._fed = None  # re-send the sum at the next merge

    def live_peers(self) -> int:
        return sum(1 for p in self.peers.values() if not p.dead)

    def load_density(self) -> float:
        """The live peers' rough weight density now (weight/s), for estimates."""
        return math.fsum(p.load_density for p in self.peers.values() if not p.dead)

    def merge(self, now_s: float, now_ms: int, peer_timeout_ms: int
              ) -> tuple[list[Step], float]:
        """The summed steps over [fed_until_s, watermark), and the watermark."""
        peers = self.peers
        for peer in peers.values():
            if not peer.dead and now_ms - peer.seen_ms > peer_timeout_ms:
                peer.die()
        waits = [p.until_s for p in peers.values() if not p.dead and p.until_s is not None]
        until_s = min(waits) if waits else now_s
        lo_s = self.fed_until_s
        out: list[Step] = []
        if until_s <= lo_s:
            return out, lo_s
        values: dict[str, tuple[float, int]] = {}
        changes: list[tuple[float, str, float, int]] = []
        for peer_id, peer in peers.items():
            steps = peer.steps
            k = bisect_right(steps, lo_s, key=_FIRST_t)
            values[peer_id] = steps[k - 1][1:] if k > 0 else _ZERO_STEP
            for m in range(k, len(steps)):
                t_s, density, count = steps[m]
                if t_s >= until_s:
                    break
                changes.append((t_s, peer_id, density, count))
            if k > 1:
                del steps[:k - 1]  # keep the step in force at lo_s

        def emit(t_s: float) -> None:
            total = (math.fsum(v[0] for v in values.values()), sum(v[1] for v in values.values()))
            if total != self._fed:
                out.append((t_s, *total))
                self._fed = total

        emit(lo_s)
        changes.sort(key=_FIRST_t)
        i, n = 0, len(changes)
        while i < n:
            t_s = changes[i][0]
            while i < n and changes[i][0] == t_s:
                _, peer_id, density, count = changes[i]
                values[peer_id] = (density, count)
                i += 1
            emit(t_s)
        for peer_id in [pid for pid, p in peers.items()
                        if p.dead and (p.until_s is None or p.until_s <= until_s)]:
            del peers[peer_id]
            if values.get(peer_id, _ZERO_STEP) != _ZERO_STEP:
                self._fed = None  # its last value leaves the sum at the next merge
        self.fed_until_s = until_s
        return out, until_s


# -- the exchange --------------------------------------------------------------------------------


def encode_chunks(chunks: Sequence[Chunk]) -> list[Any]:
    """[[from_s, until_s, [t, density, count, t, ...]], ...]: compact, exact floats (orjson)."""
    out = []
    for from_s, until_s, steps in chunks:
        flat: list[float | int] = []
        for step in steps:
            flat.extend(step)
        out.append([from_s, until_s, flat])
    return out


def decode_chunks(raw: Any) -> list[Chunk]:
    """The inverse of `encode_chunks`; ValueError on anything malformed."""
    chunks: list[Chunk] = []
    if not isinstance(raw, list):
        raise ValueError("chunks must be a list")
    for item in raw:
        from_s, until_s, flat = item
        if len(flat) % 3:
            raise ValueError("steps must be triples")
        steps = [(float(flat[i]), float(flat[i + 1]), int(flat[i + 2]))
                 for i in range(0, len(flat), 3)]
        chunks.append((float(from_s), float(until_s), steps))
    return chunks


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
        self._metrics = _ExchangeMetrics(registry) if registry is not None else None

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
        self._redis_now_ms = _id_ms(replies[0])
        for b in self.backends:
            b.outbox.clear()
        by_key = {b.key: b for b in self.backends}
        for key, entries in _streams(replies[-1]):
            b = by_key.get(key)
            if b is None:
                continue
            for entry_id, fields in entries:
                b.last_id = entry_id
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
                b.peers.add(peer.decode("utf-8", "replace"), chunks, _id_ms(entry_id),
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


class _ExchangeMetrics:
    """The exchange's Prometheus series (registered on the proxy's registry)."""

    SOURCES = ("redis", "engine_metrics", "none")

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Gauge

        self.source = Gauge(
            "joulegate_cluster_foreign_source",
            "1 for where other replicas' weights on a backend come from now (redis, "
            "engine_metrics, none).", ["backend", "source"], multiprocess_mode="livemax",
            registry=registry)
        self.replicas = Gauge(
            "joulegate_cluster_replicas", "Live proxy replicas sending to the backend (Redis).",
            ["backend"], multiprocess_mode="livemax", registry=registry)
        self.lag_s = Gauge(
            "joulegate_cluster_foreign_lag_seconds",
            "How far behind now other replicas' weights are known.", ["backend"],
            multiprocess_mode="livemax", registry=registry)
        self.foreign_j = Counter(
            "joulegate_energy_foreign_joules",
            "Measured joules of the backend that other replicas' requests took (billed there).",
            ["backend"], registry=registry)
        self.redis_up = Gauge("joulegate_cluster_redis_up",
                              "1 while the weight exchange reaches Redis.",
                              multiprocess_mode="livemin", registry=registry)

    def observe(self, exchange: WeightExchange) -> None:
        self.redis_up.set(1 if exchange.redis_ok else 0)
        now_s = exchange._clock()
        for b in exchange.backends:
            for source in self.SOURCES:
                self.source.labels(b.name, source).set(1 if b.source == source else 0)
            self.replicas.labels(b.name).set(b.peers.live_peers() + 1 if b.source == "redis"
                                             else 1)
            attributor = b.meter.attributor
            self.lag_s.labels(b.name).set(max(0.0, now_s - attributor.foreign_until_s))
            foreign_j = attributor.finalized_joules_foreign
            if foreign_j > b.foreign_j_seen:
                self.foreign_j.labels(b.name).inc(foreign_j - b.foreign_j_seen)
                b.foreign_j_seen = foreign_j


def _id_ms(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])


def _streams(reply: Any) -> list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]:
    """XREAD's answer as (key, entries) pairs, RESP2 (a list) or RESP3 (a dict)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        items = [(k, v[0] if v and isinstance(v[0], list) and len(v) == 1 else v)
                 for k, v in reply.items()]
    else:
        items = [(k, v) for k, v in reply]
    return [(k if isinstance(k, bytes) else str(k).encode(), v) for k, v in items]


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
