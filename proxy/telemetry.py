"""Optional OpenTelemetry tracing: one span per inference request, after the GenAI semantic
conventions, with the request's joules on it, exported over OTLP/HTTP.

Off unless `telemetry.otlp_endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set; then the
`otel` extra must be installed (`pip install 'joulegate[otel]'`). The relay takes the span's
ids before the request goes upstream (`Telemetry.start`: they travel to the backend in a W3C
`traceparent`, as the child of the client's own `traceparent` if it sent one); accounting
makes the span when it books the request (`Telemetry.book`), once its energy is final, with the
request's own start and end times. A request the relay refuses before any backend had it (bad
key, bad body, a rate limit or budget, no backend) gets its span at once (`Telemetry.refused`),
an error with no tokens or joules. The OpenTelemetry packages are imported only when tracing
is on, and nothing here runs per request while it is off.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from proxy.config import Config, ConfigError
from proxy.records import RequestRecord
from proxy.sse import StreamTap
from proxy.usage import requested_max_tokens

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

log = logging.getLogger("joulegate.telemetry")

#: The environment variables that turn tracing on when the config names no endpoint (the
#: exporter reads them, and its other OTEL_EXPORTER_OTLP_* settings, itself).
ENV_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
#: `gen_ai.operation.name` per kind of request; pass-through requests ("other") have none: their
#: spans are named and told apart by their route instead.
OPERATIONS = {"chat": "chat", "completion": "text_completion", "embedding": "embeddings",
              "response": "chat"}
#: The longest engine-given string kept on a span (an id, a model name): longer ones are cut
#: from a JSON answer, and left out where a stream's bytes are searched.
_MAX_VALUE = 256
#: The most finish reasons kept: one per choice, and `n` is the client's to choose.
_MAX_REASONS = 64
_MISSING = ("tracing is configured ({how}) but the OpenTelemetry packages are not installed: "
            "pip install 'joulegate[otel]' (opentelemetry-sdk, opentelemetry-exporter-otlp-proto-http)")


@dataclass(slots=True)
class SpanStart:
    """What a request's span needs that its record does not keep: the W3C `traceparent` sent
    upstream (the span's own trace and span ids), the client's span id it is a child of, the
    request's max_tokens, its path (pass-through spans are named by it), and what the engine's
    answer said of itself, filled in as it passes (only where the span is sampled)."""

    traceparent: str
    parent_span_id: str | None
    max_tokens: int | None
    path: str = ""
    response_id: str | None = None
    response_model: str | None = None
    finish_reasons: list[str] | None = None

    @property
    def sampled(self) -> bool:
        return not self.traceparent.endswith("-00")

    def take_answer(self, answer: dict[str, Any]) -> None:
        """The id, model and finish reasons of a whole JSON answer the relay parsed anyway."""
        if not self.sampled:
            return
        self.response_id = _short(answer.get("id"))
        self.response_model = _short(answer.get("model"))
        choices = answer.get("choices")
        if isinstance(choices, list):
            reasons = [c["finish_reason"] for c in choices[:_MAX_REASONS]
                       if isinstance(c, dict) and isinstance(c.get("finish_reason"), str)]
            self.finish_reasons = reasons or None

    def tap(self, responses: bool, max_event_bytes: int) -> StreamTap:
        """The stream tap for this request: one that also reads the answer's id, model and
        finish reasons off the bytes where the span is sampled, the plain one elsewhere."""
        if not self.sampled:
            return StreamTap(responses, max_event_bytes)
        return AnswerTap(self, responses, max_event_bytes)


class AnswerTap(StreamTap):
    """A StreamTap that also fills a sampled span's `response_*` fields, by byte search, never by
    parsing a chunk: the id and model from the first events (every chunk repeats them; a
    Responses stream's `response.created` has its own first), the finish reasons as they come."""

    __slots__ = ("_span", "_first")

    def __init__(self, span: SpanStart, responses: bool, max_event_bytes: int) -> None:
        super().__init__(responses, max_event_bytes)
        self._span = span
        self._first = True

    def _count(self, complete: bytes) -> None:
        super()._count(complete)
        span = self._span
        if self._first and b"data:" in complete:
            self._first = False
            # The first `"id"` is the chunk's own: it comes before the choices (and their tool
            # call ids) in every engine's serialisation; a quote inside text is escaped, so
            # these markers never match generated text.
            span.response_id = _string_at(complete, complete.find(b'"id":'), 5)
            span.response_model = _string_at(complete, complete.find(b'"model":'), 8)
        at = complete.find(_FINISH)
        while at >= 0:  # `null` on every chunk but a choice's last
            reason = _string_at(complete, at, len(_FINISH))
            if reason is not None:
                if span.finish_reasons is None:
                    span.finish_reasons = []
                if len(span.finish_reasons) < _MAX_REASONS:
                    span.finish_reasons.append(reason)
            at = complete.find(_FINISH, at + len(_FINISH))


_FINISH = b'"finish_reason":'


def _string_at(data: bytes, at: int, skip: int) -> str | None:
    """The JSON string value `skip` bytes after `at` (where a key and its colon start) in
    `data`; None where `at` < 0, or it is not a plain string, or too long to keep."""
    if at < 0:
        return None
    at += skip
    while data[at:at + 1] == b" ":
        at += 1
    if data[at:at + 1] != b'"':
        return None
    end = data.find(b'"', at + 1, at + 2 + _MAX_VALUE)
    if end < 0 or b"\\" in data[at + 1:end]:  # escapes: not the plain name expected here
        return None
    return data[at + 1:end].decode("utf-8", "replace")


def _short(value: Any) -> str | None:
    """A string the engine gave, cut to a span attribute's size; None where it is no string."""
    return value[:_MAX_VALUE] if isinstance(value, str) else None


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
    """The tracer, its batch exporter, and the calls the proxy makes per request: `start` and
    `book` for a request a backend had, `refused` for one refused before."""

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
        # Each backend's host and port (`server.*` on its spans), read once from its URL.
        self._servers = {b.name: _server(b.url) for b in config.backends}
        log.info("tracing on: spans to %s", url or "the OTEL_EXPORTER_OTLP_* endpoint")

    @classmethod
    def from_config(cls, config: Config) -> Telemetry | None:
        """Tracing as configured; None when it is off."""
        endpoint = endpoint_of(config)
        return None if endpoint is None else cls(config, endpoint)

    def start(self, record: RequestRecord, scope: dict[str, Any], payload: dict[str, Any]) -> None:
        """Take the span's ids before the request goes upstream (`record.trace`): the client's
        trace, if its `traceparent` is valid, else a new one."""
        record.trace = self._ids_for(scope, requested_max_tokens(payload))

    def book(self, record: RequestRecord) -> None:
        """Make and end the request's span, from its record as booked (energy final)."""
        start = record.trace
        if start is None or not start.sampled:
            return  # not traced, or the client's trace is not sampled
        attributes = self._common(record, start)
        if record.kind in OPERATIONS or record.usage_reported:  # pass-through: only an engine's own count
            attributes["gen_ai.usage.input_tokens"] = record.prompt_tokens
            attributes["gen_ai.usage.output_tokens"] = record.completion_tokens
        attributes["joulegate.backend"] = record.backend or ""
        server = self._servers.get(record.backend or "")
        if server is not None:
            attributes["server.address"], attributes["server.port"] = server
        if start.max_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = start.max_tokens
        if start.response_id is not None:
            attributes["gen_ai.response.id"] = start.response_id
        if start.response_model is not None:
            attributes["gen_ai.response.model"] = start.response_model
        if start.finish_reasons:
            attributes["gen_ai.response.finish_reasons"] = start.finish_reasons
        if record.joules is not None:
            attributes["joulegate.energy.joules"] = record.joules
        if record.energy_method is not None:
            attributes["joulegate.energy.method"] = record.energy_method
        error = None
        if record.status >= 500:
            attributes["error.type"] = str(record.status)
            error = record.error or f"HTTP {record.status}"
        self._emit(record, start, attributes, error)

    def refused(self, record: RequestRecord, scope: dict[str, Any], error_type: str) -> None:
        """Make and end the span of a request refused before any backend had it (`error_type`:
        the error's code), if its trace is sampled: an error span with no tokens or energy."""
        start = record.trace or self._ids_for(scope, None)
        if not start.sampled:
            return
        attributes = self._common(record, start)
        attributes["error.type"] = error_type
        self._emit(record, start, attributes, error_type)

    def _ids_for(self, scope: dict[str, Any], max_tokens: int | None) -> SpanStart:
        """A request's span ids, in the client's trace where its `traceparent` is valid."""
        parent = None
        for name, value in scope["headers"]:
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
        return SpanStart(traceparent, parent_span_id, max_tokens, scope["path"])

    @staticmethod
    def _common(record: RequestRecord, start: SpanStart) -> dict[str, Any]:
        """The attributes of every span: what was asked, by whom, and the status answered."""
        attributes: dict[str, Any] = {
            "http.response.status_code": record.status,
            "joulegate.request_id": record.request_id,
        }
        operation = OPERATIONS.get(record.kind)
        if operation is not None:
            attributes["gen_ai.operation.name"] = operation
        else:  # pass-through: an allowlisted path, so a route of few values
            attributes["http.request.method"] = "POST"
            attributes["http.route"] = start.path
        if record.model:
            attributes["gen_ai.request.model"] = record.model
        if record.tenant:
            attributes["joulegate.tenant"] = record.tenant
        return attributes

    def _emit(self, record: RequestRecord, start: SpanStart, attributes: dict[str, Any],
              error: str | None) -> None:
        """Start and end the span with its preset ids, over the request's own time."""
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
        operation = OPERATIONS.get(record.kind)
        if operation is None:
            name = f"POST {start.path}"
        else:
            name = f"{operation} {record.model}" if record.model else operation
        self._ids.trace_id, self._ids.span_id = trace_id, int(span_hex, 16)
        span = self.tracer.start_span(name, context=context, kind=SpanKind.CLIENT,
                                      attributes=attributes, start_time=round(record.start_s * 1e9))
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        end_s = record.end_s if record.end_s is not None else time.time()
        span.end(end_time=round(end_s * 1e9))

    def close(self) -> None:
        """Export the spans still queued, then stop the exporter (blocks up to its time-out)."""
        self.provider.shutdown()


def _server(url: str) -> tuple[str, int]:
    """A backend URL's host and port (the scheme's default where it names none)."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
