"""Optional OpenTelemetry tracing: one span per inference request, after the GenAI semantic
conventions, with the request's joules on it, exported over OTLP/HTTP.

Off unless `telemetry.otlp_endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set; then the
`otel` extra must be installed (`pip install 'joulegate[otel]'`). The relay takes the span's
ids before the request goes upstream (`Telemetry.start`: they travel to the backend in a W3C
`traceparent`, as the child of the client's own `traceparent` if it sent one); accounting
makes the span when it books the request (`Telemetry.book`), once its energy is final, with the
request's own start and end times. The OpenTelemetry packages are imported only when tracing
is on, and nothing here runs per request while it is off.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.config import Config, ConfigError
from proxy.records import RequestRecord

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

log = logging.getLogger("joulegate.telemetry")

#: The environment variables that turn tracing on when the config names no endpoint (the
#: exporter reads them, and its other OTEL_EXPORTER_OTLP_* settings, itself).
ENV_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
#: `gen_ai.operation.name` per kind of request; pass-through requests ("other") get no span.
OPERATIONS = {"chat": "chat", "completion": "text_completion", "embedding": "embeddings",
              "response": "chat"}
_MISSING = ("tracing is configured ({how}) but the OpenTelemetry packages are not installed: "
            "pip install 'joulegate[otel]' (opentelemetry-sdk, opentelemetry-exporter-otlp-proto-http)")


@dataclass(slots=True, frozen=True)
class SpanStart:
    """What a request's span needs that its record does not keep: the W3C `traceparent` sent
    upstream (the span's own trace and span ids), the client's span id it is a child of, and
    the request's max_tokens."""

    traceparent: str
    parent_span_id: str | None
    max_tokens: int | None


def parse_traceparent(value: bytes) -> tuple[str, str, str] | None:
    """(trace id, span id, flags) in lower-case hex from a W3C `traceparent`; None when it is
    not a valid one (then the span starts a trace of its own)."""
    text = value.decode("latin-1").strip().lower()
    parts = text.split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff" or (parts[0] == "00" and len(parts) != 4):
        return None
    version, trace_id, span_id, flags = parts[:4]
    if len(trace_id) != 32 or len(span_id) != 16 or len(flags) != 2:
        return None
    try:
        int(version + trace_id + span_id + flags, 16)
    except ValueError:
        return None
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return trace_id, span_id, flags


def endpoint_of(config: Config) -> str | None:
    """Where spans go: the config's OTLP base URL, or "env" where only the environment names
    one, or None: tracing is off."""
    if config.telemetry.otlp_endpoint is not None:
        return config.telemetry.otlp_endpoint
    return "env" if any(os.environ.get(name) for name in ENV_ENDPOINTS) else None


def check_available(config: Config) -> None:
    """ConfigError naming the `otel` extra when tracing is on and its packages are missing."""
    endpoint = endpoint_of(config)
    if endpoint is None:
        return
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        how = "OTEL_EXPORTER_OTLP_ENDPOINT" if endpoint == "env" else "telemetry.otlp_endpoint"
        raise ConfigError(_MISSING.format(how=how)) from None


class _PresetIds:
    """An OpenTelemetry IdGenerator that hands out the ids set just before `start_span` (the
    ones already sent upstream). Spans are started one at a time, on the event loop."""

    def __init__(self) -> None:
        self.trace_id = 0
        self.span_id = 0

    def generate_trace_id(self) -> int:
        return self.trace_id

    def generate_span_id(self) -> int:
        return self.span_id

    def is_trace_id_random(self) -> bool:
        return True


class Telemetry:
    """The tracer, its batch exporter, and the two calls the proxy makes per request."""

    def __init__(self, config: Config, endpoint: str) -> None:
        check_available(config)
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

        url = None if endpoint == "env" else endpoint.rstrip("/") + "/v1/traces"
        self._ids = _PresetIds()
        self.sample_ratio = config.telemetry.sample_ratio  # of new traces; a client's flag rules its own
        # Every request is traced unless the client's traceparent says it is not sampled: the
        # flag sent upstream is decided before the span exists, so no sampler may overrule it.
        self.provider: TracerProvider = TracerProvider(
            resource=Resource.create({"service.name": config.telemetry.service_name}),
            # _PresetIds has every method of the SDK's IdGenerator; subclassing it would import
            # the SDK with this module, tracing on or off.
            sampler=ParentBased(ALWAYS_ON), id_generator=self._ids,  # type: ignore[arg-type]
            shutdown_on_exit=False)  # flushed by `close`, at the lifespan's end, after the last booking
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        self.tracer: Tracer = self.provider.get_tracer("joulegate")
        log.info("tracing on: spans to %s", url or "the OTEL_EXPORTER_OTLP_* endpoint")

    @classmethod
    def from_config(cls, config: Config) -> Telemetry | None:
        """Tracing as configured; None when it is off."""
        endpoint = endpoint_of(config)
        return None if endpoint is None else cls(config, endpoint)

    def start(self, record: RequestRecord, headers: list[tuple[bytes, bytes]],
              payload: dict[str, Any]) -> None:
        """Take the span's ids before the request goes upstream (`record.trace`): the client's
        trace, if its `traceparent` is valid, else a new one."""
        if record.kind not in OPERATIONS:
            return
        parent = None
        for name, value in headers:
            if name == b"traceparent":
                parent = parse_traceparent(value)
                break
        span_id = os.urandom(8).hex()
        if parent is None:
            sampled = "01" if self.sample_ratio >= 1.0 or random.random() < self.sample_ratio else "00"
            traceparent, parent_span_id = f"00-{os.urandom(16).hex()}-{span_id}-{sampled}", None
        else:
            # The sampled bit as the client decided; the other flags are not ours to pass on.
            sampled = "01" if int(parent[2], 16) & 1 else "00"
            traceparent, parent_span_id = f"00-{parent[0]}-{span_id}-{sampled}", parent[1]
        record.trace = SpanStart(traceparent, parent_span_id, _max_tokens(payload))

    def book(self, record: RequestRecord) -> None:
        """Make and end the request's span, from its record as booked (energy final)."""
        start = record.trace
        if start is None or start.traceparent.endswith("-00"):
            return  # not traced, or the client's trace is not sampled
        from opentelemetry import trace
        from opentelemetry.trace import (
            NonRecordingSpan,
            SpanContext,
            SpanKind,
            Status,
            StatusCode,
            TraceFlags,
        )

        _, trace_hex, span_hex, _ = start.traceparent.split("-")
        trace_id = int(trace_hex, 16)
        context = None
        if start.parent_span_id is not None:
            parent = SpanContext(trace_id, int(start.parent_span_id, 16), is_remote=True,
                                 trace_flags=TraceFlags(TraceFlags.SAMPLED))
            context = trace.set_span_in_context(NonRecordingSpan(parent))
        operation = OPERATIONS[record.kind]
        attributes: dict[str, str | int | float] = {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": record.model,
            "gen_ai.usage.input_tokens": record.prompt_tokens,
            "gen_ai.usage.output_tokens": record.completion_tokens,
            "http.response.status_code": record.status,
            "joulegate.backend": record.backend or "",
            "joulegate.tenant": record.tenant,
            "joulegate.request_id": record.request_id,
        }
        if start.max_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = start.max_tokens
        if record.joules is not None:
            attributes["joulegate.energy.joules"] = record.joules
        if record.energy_method is not None:
            attributes["joulegate.energy.method"] = record.energy_method
        self._ids.trace_id, self._ids.span_id = trace_id, int(span_hex, 16)
        span = self.tracer.start_span(f"{operation} {record.model}", context=context, kind=SpanKind.CLIENT,
                                      attributes=attributes, start_time=round(record.start_s * 1e9))
        if record.status >= 500:
            span.set_status(Status(StatusCode.ERROR, record.error or f"HTTP {record.status}"))
        span.end(end_time=round((record.end_s or record.start_s) * 1e9))

    def close(self) -> None:
        """Export the spans still queued, then stop the exporter (blocks up to its time-out)."""
        self.provider.shutdown()


def _max_tokens(payload: dict[str, Any]) -> int | None:
    """The request's own limit on generated tokens (per choice), if it gives one."""
    for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = payload.get(field)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None
