"""Prometheus metrics, on prometheus-client's registry: names, labels, units."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from proxy.records import RequestRecord

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """The proxy's own metrics. Tenant is never a label here (unbounded cardinality)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "joulegate_requests", "Requests relayed, by backend, model and HTTP status.",
            ["backend", "model", "status"], registry=r,
        )
        self.tokens = Counter(
            "joulegate_tokens", "Tokens served, by backend, model and kind (prompt|completion).",
            ["backend", "model", "kind"], registry=r,
        )
        self.duration_s = Histogram(
            "joulegate_request_duration_seconds", "Wall time from request start to last byte.",
            ["backend", "model"], buckets=_LATENCY_BUCKETS_S, registry=r,
        )
        self.ttft_s = Histogram(
            "joulegate_time_to_first_token_seconds", "Streamed requests: start to first token.",
            ["backend", "model"], buckets=_LATENCY_BUCKETS_S, registry=r,
        )
        self.backend_up = Gauge("joulegate_backend_up", "1 when the backend is healthy.", ["backend"], registry=r)
        self.backend_in_flight = Gauge(
            "joulegate_backend_in_flight", "Requests this proxy has open on the backend.", ["backend"], registry=r,
        )

        self.energy_j = Counter(
            "joulegate_energy_joules", "Measured joules attributed to requests, by backend and model.",
            ["backend", "model"], registry=r,
        )
        self.backend_power_w = Gauge("joulegate_backend_power_watts", "Latest power reading.", ["backend"], registry=r)
        self.backend_idle_w = Gauge(
            "joulegate_backend_idle_watts", "Average power while nothing was in flight.", ["backend"], registry=r,
        )
        self.backend_tokens_per_joule = Gauge(
            "joulegate_backend_tokens_per_joule", "Completion tokens per joule over recent requests.",
            ["backend"], registry=r,
        )

        self.ledger_buffered = Gauge(
            "joulegate_ledger_buffered_records", "Ledger records not yet durable (memory and journal).", registry=r,
        )
        self.ledger_flush_lag_s = Gauge(
            "joulegate_ledger_flush_lag_seconds", "Age of the oldest record not yet flushed.", registry=r,
        )
        self.awaiting_final = Gauge(
            "joulegate_energy_awaiting_final", "Answered requests waiting for their measured energy.", registry=r,
        )

    def observe_energy(self, record: RequestRecord) -> None:
        """Count a request's final (measured) joules."""
        if record.joules is not None:
            self.energy_j.labels(record.backend or "none", record.model).inc(record.joules)

    def observe(self, record: RequestRecord) -> None:
        """Count one finished request."""
        backend = record.backend or "none"
        self.requests.labels(backend, record.model, str(record.status)).inc()
        if record.prompt_tokens:
            self.tokens.labels(backend, record.model, "prompt").inc(record.prompt_tokens)
        if record.completion_tokens:
            self.tokens.labels(backend, record.model, "completion").inc(record.completion_tokens)
        if record.end_s is not None:
            self.duration_s.labels(backend, record.model).observe(record.end_s - record.start_s)
        if record.first_token_s is not None:
            self.ttft_s.labels(backend, record.model).observe(record.first_token_s - record.start_s)

    def render(self) -> bytes:
        """Prometheus text exposition."""
        return generate_latest(self.registry)
