"""The weight exchange's Prometheus series."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from proxy.energy.shares.exchange import WeightExchange

__all__ = ["ExchangeMetrics"]


class ExchangeMetrics:
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
