"""Prometheus metrics, on prometheus-client's registry: names, labels, units.

With several uvicorn workers, `joulegate serve` sets PROMETHEUS_MULTIPROC_DIR before the
workers start; every worker then writes its samples there and any worker's /metrics answers
for all of them (gauges say how workers combine: summed or the latest maximum).
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from proxy.records import RequestRecord

_CHILDREN_CACHE_MAX = 10_000  # labelled series whose lookup is remembered (Metrics._child)
_STATUS_TEXT = {status: str(status) for status in range(100, 600)}


def _status_text(status: int) -> str:
    return _STATUS_TEXT.get(status) or str(status)


_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """The proxy's own metrics. Tenant is never a label here (unbounded cardinality)."""

    def __init__(self, tenant_label: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        # Tenant as a label only when asked: tenants are unbounded, Prometheus series are not.
        self.tenant_label = tenant_label
        t = ["tenant"] if tenant_label else []
        r = self.registry
        self.requests = Counter(
            "joulegate_requests", "Requests relayed, by backend, model and HTTP status.",
            ["backend", "model", "status", *t], registry=r,
        )
        self.tokens = Counter(
            "joulegate_tokens", "Tokens served, by backend, model and kind (prompt|completion).",
            ["backend", "model", "kind", *t], registry=r,
        )
        self.duration_s = Histogram(
            "joulegate_request_duration_seconds", "Wall time from request start to last byte.",
            ["backend", "model"], buckets=_LATENCY_BUCKETS_S, registry=r,
        )
        self.ttft_s = Histogram(
            "joulegate_time_to_first_token_seconds", "Streamed requests: start to first token.",
            ["backend", "model"], buckets=_LATENCY_BUCKETS_S, registry=r,
        )
        self.backend_up = Gauge("joulegate_backend_up", "1 when the backend is healthy.", ["backend"], multiprocess_mode="livemax", registry=r)
        self.backend_in_flight = Gauge(
            "joulegate_backend_in_flight", "Requests this proxy has open on the backend.", ["backend"], multiprocess_mode="livesum", registry=r,
        )

        self.energy_j = Counter(
            "joulegate_energy_joules", "Joules attributed to requests (as booked), by backend and model.",
            ["backend", "model", *t], registry=r,
        )
        self.energy_estimated = Counter(
            "joulegate_energy_estimated_requests",
            "Requests booked with estimated energy (no power readings covered them), by backend.",
            ["backend"], registry=r,
        )
        self.power_source_up = Gauge(
            "joulegate_power_source_up", "1 while the backend's power source answers; 0 while its energy is modelled.",
            ["backend"], multiprocess_mode="livemin", registry=r,
        )
        self.backend_power_w = Gauge("joulegate_backend_power_watts", "Latest power reading.", ["backend"], multiprocess_mode="livemax", registry=r)
        self.backend_idle_w = Gauge(
            "joulegate_backend_idle_watts", "Average power while nothing was in flight.", ["backend"], multiprocess_mode="livemax", registry=r,
        )
        self.backend_tokens_per_joule = Gauge(
            "joulegate_backend_tokens_per_joule", "Completion tokens per joule over recent requests.",
            ["backend"], multiprocess_mode="livemax", registry=r,
        )

        self.ledger_buffered = Gauge(
            "joulegate_ledger_buffered_records", "Ledger records not yet durable (memory and journal).", multiprocess_mode="livesum", registry=r,
        )
        self.ledger_flush_lag_s = Gauge(
            "joulegate_ledger_flush_lag_seconds", "Age of the oldest record not yet flushed.", multiprocess_mode="livemax", registry=r,
        )
        self.awaiting_final = Gauge(
            "joulegate_energy_awaiting_final", "Answered requests waiting for their measured energy.", multiprocess_mode="livesum", registry=r,
        )
        self.refused = Counter(
            "joulegate_requests_refused", "Requests the proxy refused itself (4xx, 503), by error code.", ["reason"], registry=r,
        )
        # Budget reservations the store did not answer in time: let through (open) or refused (closed).
        self.budget_store_failures = Counter(
            "joulegate_energy_budget_store_failures", "Budget checks the ledger store failed to answer.", ["mode"], registry=r,
        )
        # Rate limits (proxy/ratelimit/): refusals by tenant (only tenants with limits, which an
        # operator configured or an admin gave a managed key), and store failures by mode.
        self.rate_limited = Counter(
            "joulegate_rate_limited_requests", "Requests refused by a rate limit, by tenant, kind "
            "(requests|tokens) and scope (key|tenant).", ["tenant", "kind", "scope"], registry=r,
        )
        self.rate_limit_store_failures = Counter(
            "joulegate_rate_limit_store_failures", "Rate-limit checks the shared store failed to answer.",
            ["mode"], registry=r,
        )

        # Whether a backend's power readings can be trusted (set from its view at each scrape).
        self.power_clock_offset_s = Gauge(
            "joulegate_power_clock_offset_seconds", "Power host's clock minus the proxy's (agent/sim sources).",
            ["backend"], multiprocess_mode="livemax", registry=r,
        )
        self.power_sample_gap_s = Gauge(
            "joulegate_power_sample_gap_seconds", "Largest gap between power samples in the last 5 min, silence so far included.",
            ["backend"], multiprocess_mode="livemax", registry=r,
        )
        self.power_discarded = Counter(
            "joulegate_power_samples_discarded", "Power readings discarded as implausible (over 1.5x the power limit).",
            ["backend"], registry=r,
        )
        self.power_resets = Counter(
            "joulegate_power_counter_resets", "GPU energy counter restarts seen (driver reloads, wraps without a modulus).",
            ["backend"], registry=r,
        )
        self._power_counted: dict[tuple[str, str], int] = {}
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        # Carbon (proxy/carbon.py): all-in joules ((GPU + host) x PUE) and their grams CO2e.
        self.energy_all_in_j = Counter(
            "joulegate_energy_joules_all_in", "All-in joules ((GPU + host) x PUE) of requests, by backend.",
            ["backend"], registry=r,
        )
        self.energy_gco2e = Counter(
            "joulegate_energy_gco2e", "Grams CO2e of requests' all-in energy at their site's grid, by backend.",
            ["backend"], registry=r,
        )
        # The governor (proxy/governor/): its cap per backend, advised or applied by its mode.
        self.governor_cap_w = Gauge(
            "joulegate_governor_cap_watts", "Per-GPU power cap the governor advises (mode advise) or applied (apply).",
            ["backend"], multiprocess_mode="livemax", registry=r,
        )
        # With governor.slo_target (proxy/governor/clock.py): the fleet's clock ratio, 1 = uncapped.
        self.governor_clock = Gauge(
            "joulegate_governor_clock_ratio", "Clock ratio the governor holds the fleet's GPUs to under its "
            "attainment target (1: uncapped).", multiprocess_mode="livemax", registry=r,
        )
        self.governor_decisions = Counter(
            "joulegate_governor_decisions", "Governor decisions, by backend and action (lower|raise|hold|park).",
            ["backend", "action"], registry=r,
        )
        # Parking (proxy/governor/park.py): 1 while a backend is parked (asleep, not routed to).
        self.governor_parked = Gauge(
            "joulegate_governor_parked", "1 while the governor has the backend parked (asleep, not routed to).",
            ["backend"], multiprocess_mode="livemax", registry=r,
        )
        self.governor_wakes = Counter(
            "joulegate_governor_wakes", "Wake-ups of parked backends, by backend and outcome (ok|failed).",
            ["backend", "outcome"], registry=r,
        )
        self.governor_wake_s = Histogram(
            "joulegate_governor_wake_seconds", "Seconds a parked backend took to wake up, by backend.",
            ["backend"], buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120), registry=r,
        )

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered: `labels()` costs more than the increment
        itself, and a finished request touches up to nine series."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            if len(self._children) >= _CHILDREN_CACHE_MAX:
                self._children.clear()  # prometheus keeps the series; this only forgets lookups
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_energy(self, record: RequestRecord) -> None:
        """Count a request's booked joules (and whether they were estimated)."""
        if record.joules is not None:
            backend = record.backend or "none"
            t = (record.tenant,) if self.tenant_label else ()
            self._child(self.energy_j, backend, record.model, *t).inc(record.joules)
            if record.energy_method == "estimated":
                self._child(self.energy_estimated, backend).inc()
            if record.joules_all_in is not None:
                self._child(self.energy_all_in_j, backend).inc(record.joules_all_in)
            if record.gco2e is not None:
                self._child(self.energy_gco2e, backend).inc(record.gco2e)

    def observe(self, record: RequestRecord) -> None:
        """Count one finished request."""
        backend = record.backend or "none"
        model = record.model
        t = (record.tenant,) if self.tenant_label else ()
        self._child(self.requests, backend, model, _status_text(record.status), *t).inc()
        if record.prompt_tokens:
            self._child(self.tokens, backend, model, "prompt", *t).inc(record.prompt_tokens)
        if record.completion_tokens:
            self._child(self.tokens, backend, model, "completion", *t).inc(record.completion_tokens)
        if record.end_s is not None:
            self._child(self.duration_s, backend, model).observe(record.end_s - record.start_s)
        if record.first_token_s is not None:
            self._child(self.ttft_s, backend, model).observe(record.first_token_s - record.start_s)

    def render(self) -> bytes:
        """Prometheus text exposition (all workers' samples when several run)."""
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)

    def observe_power(self, backend: str, view: dict[str, Any]) -> None:
        """Power-health gauges and counters from a backend's /v1/energy/backends view."""
        for gauge, key in ((self.power_clock_offset_s, "power_clock_offset_s"),
                           (self.power_sample_gap_s, "power_sample_gap_s")):
            if view.get(key) is not None:
                gauge.labels(backend).set(view[key])
        for counter, key in ((self.power_discarded, "power_samples_discarded"),
                             (self.power_resets, "power_counter_resets")):
            total = int(view.get(key) or 0)
            seen = self._power_counted.get((key, backend), 0)
            counter.labels(backend).inc(max(0, total - seen))  # the meter counts; we add its news
            self._power_counted[(key, backend)] = max(total, seen)
