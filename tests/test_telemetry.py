"""OpenTelemetry tracing end to end: the openai SDK, the proxy, a simulated GPU that records the
`traceparent` it was sent, and a real OTLP/HTTP receiver decoding the exported spans."""

from __future__ import annotations

import asyncio
import gzip
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from proxy.config import Config, ConfigError, parse_config
from proxy.sse import StreamTap
from proxy.telemetry import AnswerTap, SpanStart, parse_traceparent
from tests.conftest import (
    KEYS,
    MODEL,
    REPO,
    ProxyProc,
    SimBackend,
    backend_yaml,
    sha256,
    tenants_yaml,
    wait_until,
)
from tests.faults.servers import FaultServer

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
MESSAGES = [{"role": "user", "content": "Trace the joules of this sentence, please."}]
METERED_KEY = "sk-test-metered-0004"  # a tenant allowed one request a minute
#: Attributes only a request a backend had may carry.
BOOKED_ONLY = ("gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "gen_ai.request.max_tokens",
               "gen_ai.response.id", "gen_ai.response.model", "gen_ai.response.finish_reasons",
               "joulegate.energy.joules", "joulegate.energy.method", "joulegate.backend",
               "server.address", "server.port")


class OtlpReceiver:
    """An OTLP/HTTP trace receiver (POST /v1/traces, protobuf) on a free port, in its own event
    loop on a daemon thread; `spans()` are the spans received so far, attributes decoded."""

    def __init__(self) -> None:
        self._spans: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self.port = 0
        self._thread = threading.Thread(target=self._run, name="otlp-receiver", daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "the OTLP receiver did not start"
        self.url = f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = self._runner.addresses[0][1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        export = ExportTraceServiceRequest.FromString(body)
        spans = []
        for resource_spans in export.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append({
                        "name": span.name, "kind": span.kind, "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(), "parent_span_id": span.parent_span_id.hex(),
                        "start_ns": span.start_time_unix_nano, "end_ns": span.end_time_unix_nano,
                        "status_code": span.status.code, "resource": resource,
                        "attributes": {a.key: _value(a.value) for a in span.attributes},
                    })
        with self._lock:
            self._spans.extend(spans)
        return web.Response(body=b"", content_type="application/x-protobuf")

    def spans(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._spans)

    def span_of(self, request_id: str, timeout_s: float = 20.0) -> dict[str, Any]:
        """The span of the request with this x-request-id, once it arrived."""
        found: list[dict[str, Any]] = []

        def arrived() -> bool:
            found[:] = [s for s in self.spans() if s["attributes"].get("joulegate.request_id") == request_id]
            return bool(found)

        wait_until(arrived, timeout_s, f"the span of request {request_id}")
        assert len(found) == 1, found  # one span per request
        return found[0]

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def _value(value: Any) -> Any:
    """An OTLP AnyValue as Python: a scalar, or a list for an array."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind)


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sim(session_tmp: Path) -> Iterator[SimBackend]:
    backend = SimBackend("h100-llama3.1-8b", session_tmp)
    yield backend
    backend.stop()


def _config(sim: SimBackend, telemetry: str = "") -> str:
    tenants = tenants_yaml().replace("admin_api_keys_sha256", (
        f"  - {{name: metered, api_keys_sha256: ['{sha256(METERED_KEY)}'], rate_limit: {{rpm: 1}}}}\n"
        "admin_api_keys_sha256"))
    return ("backends:\n"
            + backend_yaml("h100", sim.url, [MODEL], f", power: {{source: sim, url: '{sim.url}', interval_s: 0.05}}")
            + "ledger: memory://\n" + tenants + telemetry)


def _start_proxy(sim: SimBackend, tmp: Path, telemetry: str, env: dict[str, str]) -> ProxyProc:
    """The proxy, with `env` set (and no OTEL_* of the test run's own) while it starts."""
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("OTEL_"):
                mp.delenv(name)
        for name, value in env.items():
            mp.setenv(name, value)
        return ProxyProc(_config(sim, telemetry), tmp)


@pytest.fixture(scope="module")
def traced(sim: SimBackend, receiver: OtlpReceiver, session_tmp: Path) -> Iterator[ProxyProc]:
    # Batches leave every 100 ms (the default is 5 s), so spans arrive while the test waits.
    proc = _start_proxy(sim, session_tmp, f"telemetry: {{otlp_endpoint: '{receiver.url}', service_name: jg-test}}\n",
                        {"OTEL_BSP_SCHEDULE_DELAY": "100"})
    yield proc
    proc.stop()
    assert "Traceback" not in proc.log()


def _client(proxy: ProxyProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEYS["acme"], max_retries=0, timeout=30)


def _record(proxy: ProxyProc, request_id: str) -> dict[str, Any]:
    """The proxy's record of a request once its energy is final (`measured`)."""
    result: dict[str, Any] = {}

    def measured() -> bool:
        result.update(httpx.get(f"{proxy.url}/v1/energy/requests/{request_id}", timeout=10,
                                headers={"Authorization": f"Bearer {KEYS['acme']}"}).json())
        return result.get("method") == "measured"

    wait_until(measured, 20, f"request {request_id} to be measured")
    return result


def test_chat_span_carries_genai_attributes_energy_and_the_clients_trace(
        traced: ProxyProc, receiver: OtlpReceiver, sim: SimBackend) -> None:
    raw = _client(traced).chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=24,
        extra_headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "x-request-id": "trace-chat-1"})
    usage = raw.parse().usage
    assert usage is not None and usage.completion_tokens > 0
    span = receiver.span_of("trace-chat-1")
    record = _record(traced, "trace-chat-1")

    assert span["name"] == f"chat {MODEL}"
    assert span["kind"] == 3  # SPAN_KIND_CLIENT
    assert span["resource"]["service.name"] == "jg-test"
    attrs = span["attributes"]
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == MODEL
    assert attrs["gen_ai.request.max_tokens"] == 24
    assert attrs["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert attrs["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert attrs["http.response.status_code"] == 200
    assert attrs["joulegate.backend"] == "h100"
    assert attrs["joulegate.tenant"] == "acme"
    # The span is made when the request is booked: its joules are the final ones.
    assert attrs["joulegate.energy.method"] == "measured"
    assert attrs["joulegate.energy.joules"] > 0
    assert attrs["joulegate.energy.joules"] == pytest.approx(record["joules"], rel=1e-12)
    if raw.headers["x-energy-method"] == "measured":  # already final when it answered
        assert attrs["joulegate.energy.joules"] == pytest.approx(float(raw.headers["x-energy-joules"]), rel=1e-12)
    assert span["status_code"] == 0  # unset: not an error
    assert 0 < span["end_ns"] - span["start_ns"] < 30e9

    # A child of the client's span, in the client's trace...
    assert span["trace_id"] == CLIENT_TRACE
    assert span["parent_span_id"] == CLIENT_SPAN
    # ... and the backend was sent this span as its parent.
    seen = sim.truth("trace-chat-1")["traceparent"]
    assert seen == f"00-{CLIENT_TRACE}-{span['span_id']}-01"


def test_every_inference_route_has_its_span_and_a_new_trace_without_a_client_one(
        traced: ProxyProc, receiver: OtlpReceiver, sim: SimBackend) -> None:
    c = _client(traced)
    stream = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_headers={"x-request-id": "trace-stream"})
    usage = [chunk.usage for chunk in stream if chunk.usage is not None][-1]
    completion = c.completions.create(model=MODEL, prompt="Joules", max_tokens=6,
                                      extra_headers={"x-request-id": "trace-completion"})
    embedding = c.embeddings.create(model=MODEL, input="joules", extra_headers={"x-request-id": "trace-embedding"})
    c.responses.create(model=MODEL, input="Joules?", max_output_tokens=16,
                       extra_headers={"x-request-id": "trace-response"})

    streamed = receiver.span_of("trace-stream")
    assert streamed["attributes"]["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert streamed["attributes"]["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    done = receiver.span_of("trace-completion")
    assert done["name"] == f"text_completion {MODEL}"
    assert done["attributes"]["gen_ai.usage.output_tokens"] == completion.usage.completion_tokens
    emb = receiver.span_of("trace-embedding")
    assert emb["name"] == f"embeddings {MODEL}"
    assert emb["attributes"]["gen_ai.usage.input_tokens"] == embedding.usage.prompt_tokens
    assert "gen_ai.request.max_tokens" not in emb["attributes"]
    assert receiver.span_of("trace-response")["attributes"]["gen_ai.request.max_tokens"] == 16

    traces = set()
    for request_id, span in (("trace-stream", streamed), ("trace-completion", done), ("trace-embedding", emb)):
        assert span["parent_span_id"] == ""  # a root: the client sent no traceparent
        assert span["attributes"]["joulegate.energy.joules"] > 0
        assert sim.truth(request_id)["traceparent"] == f"00-{span['trace_id']}-{span['span_id']}-01"
        traces.add(span["trace_id"])
    assert len(traces) == 3  # a new trace per request


def test_spans_name_the_engines_answer_and_the_backend(
        traced: ProxyProc, receiver: OtlpReceiver, sim: SimBackend) -> None:
    c = _client(traced)
    whole = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5,
                                      extra_headers={"x-request-id": "trace-answer-whole"})
    chunks = list(c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, stream=True,
                                            extra_headers={"x-request-id": "trace-answer-stream"}))
    response = c.responses.create(model=MODEL, input="Joules?", max_output_tokens=8,
                                  extra_headers={"x-request-id": "trace-answer-response"})

    attrs = receiver.span_of("trace-answer-whole")["attributes"]
    assert whole.choices[0].finish_reason == "length"  # 5 tokens asked: cut short
    assert attrs["gen_ai.response.id"] == whole.id
    assert attrs["gen_ai.response.model"] == whole.model
    assert attrs["gen_ai.response.finish_reasons"] == ["length"]
    assert attrs["server.address"] == "127.0.0.1"
    assert attrs["server.port"] == sim.port

    streamed = receiver.span_of("trace-answer-stream")["attributes"]
    reasons = [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason]
    assert reasons == ["length"]
    assert streamed["gen_ai.response.id"] == chunks[0].id
    assert streamed["gen_ai.response.model"] == chunks[0].model
    assert streamed["gen_ai.response.finish_reasons"] == reasons
    assert streamed["server.port"] == sim.port

    answered = receiver.span_of("trace-answer-response")["attributes"]
    assert answered["gen_ai.response.id"] == response.id
    assert answered["gen_ai.response.model"] == response.model
    assert "gen_ai.response.finish_reasons" not in answered  # a Responses answer has a status instead


def test_refused_requests_get_one_error_span_without_usage(traced: ProxyProc, receiver: OtlpReceiver) -> None:
    bad_key = openai.OpenAI(base_url=traced.url + "/v1", api_key="sk-wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad_key.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=4,
            extra_headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "x-request-id": "refused-401"})
    metered = openai.OpenAI(base_url=traced.url + "/v1", api_key=METERED_KEY, max_retries=0, timeout=30)
    metered.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                    extra_headers={"x-request-id": "metered-1"})
    with pytest.raises(openai.RateLimitError):
        metered.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                        extra_headers={"x-request-id": "refused-429"})

    unauthorised = receiver.span_of("refused-401")
    assert unauthorised["name"] == "chat"  # the body was never read: no model
    assert unauthorised["status_code"] == 2  # STATUS_CODE_ERROR
    assert unauthorised["trace_id"] == CLIENT_TRACE and unauthorised["parent_span_id"] == CLIENT_SPAN
    attrs = unauthorised["attributes"]
    assert attrs["http.response.status_code"] == 401
    assert attrs["error.type"] == "invalid_api_key"
    assert attrs["gen_ai.operation.name"] == "chat"
    assert "joulegate.tenant" not in attrs and "gen_ai.request.model" not in attrs
    assert not [name for name in BOOKED_ONLY if name in attrs]
    assert "sk-wrong" not in repr(unauthorised)

    limited = receiver.span_of("refused-429")
    assert limited["name"] == f"chat {MODEL}"
    assert limited["status_code"] == 2
    assert limited["parent_span_id"] == ""  # no client trace: a root of its own
    attrs = limited["attributes"]
    assert attrs["http.response.status_code"] == 429
    assert attrs["error.type"] == "rate_limit_exceeded"
    assert attrs["joulegate.tenant"] == "metered"
    assert attrs["gen_ai.request.model"] == MODEL
    assert not [name for name in BOOKED_ONLY if name in attrs]
    assert limited["end_ns"] >= limited["start_ns"]
    # The admitted request's span is the usual one.
    assert receiver.span_of("metered-1")["attributes"]["gen_ai.usage.output_tokens"] > 0


def test_pass_through_span_is_named_by_its_route(traced: ProxyProc, receiver: OtlpReceiver) -> None:
    # The simulator serves no moderations: its 404 is still an answer a backend gave.
    answer = httpx.post(f"{traced.url}/v1/moderations", json={"model": MODEL, "input": "joules"}, timeout=30,
                        headers={"Authorization": f"Bearer {KEYS['acme']}", "x-request-id": "trace-other"})
    span = receiver.span_of("trace-other")
    assert span["name"] == "POST /v1/moderations"
    attrs = span["attributes"]
    assert "gen_ai.operation.name" not in attrs
    assert attrs["http.route"] == "/v1/moderations"
    assert attrs["http.request.method"] == "POST"
    assert attrs["http.response.status_code"] == answer.status_code
    assert attrs["gen_ai.request.model"] == MODEL
    assert attrs["joulegate.backend"] == "h100"
    assert "gen_ai.usage.input_tokens" not in attrs  # no usage from the engine: bytes are no tokens


def test_a_5xx_answer_is_an_error_span(receiver: OtlpReceiver, session_tmp: Path) -> None:
    broken = FaultServer("not_json")  # 200 with a body that is no JSON: the proxy answers 502
    try:
        config = ("backends:\n" + backend_yaml("broken", broken.url, [MODEL]) + "ledger: memory://\n"
                  + tenants_yaml() + f"telemetry: {{otlp_endpoint: '{receiver.url}'}}\n")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
            proc = ProxyProc(config, session_tmp)
        try:
            with pytest.raises(openai.InternalServerError):
                _client(proc).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                                      extra_headers={"x-request-id": "trace-502"})
            span = receiver.span_of("trace-502")
        finally:
            proc.stop()
    finally:
        broken.stop()
    assert span["status_code"] == 2  # STATUS_CODE_ERROR
    assert span["attributes"]["http.response.status_code"] == 502
    assert span["attributes"]["joulegate.backend"] == "broken"
    assert "joulegate.energy.joules" not in span["attributes"]  # no power source: no energy


def test_tracing_off_sends_no_traceparent_upstream(sim: SimBackend, session_tmp: Path) -> None:
    proc = _start_proxy(sim, session_tmp, "", {})
    try:
        _client(proc).chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=4,
            extra_headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "x-request-id": "untraced-1"})
        assert sim.truth("untraced-1")["traceparent"] is None
    finally:
        proc.stop()


def test_sample_ratio_traces_a_share_of_new_traces_and_every_sampled_client_trace(
        sim: SimBackend, receiver: OtlpReceiver, session_tmp: Path) -> None:
    proc = _start_proxy(sim, session_tmp, f"telemetry: {{otlp_endpoint: '{receiver.url}', sample_ratio: 0}}\n",
                        {"OTEL_BSP_SCHEDULE_DELAY": "100"})
    try:
        c = _client(proc)
        for i in range(3):  # new traces: none sampled, sent upstream as not sampled
            c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                      extra_headers={"x-request-id": f"unsampled-{i}"})
            assert sim.truth(f"unsampled-{i}")["traceparent"].endswith("-00")
        bad_key = openai.OpenAI(base_url=proc.url + "/v1", api_key="sk-wrong", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError):  # refused: sampled as any new trace
            bad_key.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                            extra_headers={"x-request-id": "unsampled-refused"})
        with pytest.raises(openai.AuthenticationError):
            bad_key.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, extra_headers={
                "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "x-request-id": "client-sampled-refused"})
        c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, extra_headers={
            "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "x-request-id": "client-sampled"})
        assert receiver.span_of("client-sampled")["trace_id"] == CLIENT_TRACE
        refused = receiver.span_of("client-sampled-refused")
        assert refused["trace_id"] == CLIENT_TRACE and refused["attributes"]["http.response.status_code"] == 401
        # The client-sampled span was exported after the others were ended: they would be here.
        assert not [s for s in receiver.spans()
                    if str(s["attributes"].get("joulegate.request_id", "")).startswith("unsampled-")]
    finally:
        proc.stop()


def test_env_endpoint_turns_it_on_and_shutdown_flushes(sim: SimBackend, receiver: OtlpReceiver,
                                                       session_tmp: Path) -> None:
    # A batch delay longer than the test: these spans leave only through the flush at shutdown.
    proc = _start_proxy(sim, session_tmp, "", {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
                                               "OTEL_BSP_SCHEDULE_DELAY": "600000"})
    try:
        c = _client(proc)
        c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                  extra_headers={"x-request-id": "flushed-1"})
        # The client's trace is not sampled: the backend still joins it, no span is exported.
        c.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=4,
            extra_headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00", "x-request-id": "unsampled-1"})
        unsampled = parse_traceparent(sim.truth("unsampled-1")["traceparent"].encode())
        assert unsampled is not None and unsampled[0] == CLIENT_TRACE and unsampled[2] == "00"
        assert not [s for s in receiver.spans() if s["attributes"].get("joulegate.request_id") == "flushed-1"]
    finally:
        proc.stop()
    span = receiver.span_of("flushed-1", timeout_s=0.1)  # there once the proxy has stopped
    assert span["resource"]["service.name"] == "joulegate"
    assert not [s for s in receiver.spans() if s["attributes"].get("joulegate.request_id") == "unsampled-1"]
    assert "Traceback" not in proc.log()


@pytest.mark.parametrize("how", ["config", "env"])
def test_configured_without_the_packages_exits_at_start_saying_so(
        how: str, tmp_path: Path, sim: SimBackend) -> None:
    telemetry = "telemetry: {otlp_endpoint: 'http://127.0.0.1:4318'}\n" if how == "config" else ""
    config_path = tmp_path / "joulegate.yaml"
    config_path.write_text(_config(sim, telemetry))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if how == "env":
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:4318"
    # `opentelemetry` made unimportable, as where the otel extra is not installed.
    code = ("import sys; sys.modules['opentelemetry'] = None; from proxy.cli import main; "
            f"sys.exit(main(['serve', '-c', {str(config_path)!r}, '--port', '0']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done.stderr
    assert "pip install 'joulegate[otel]'" in done.stderr
    assert ("OTEL_EXPORTER_OTLP_ENDPOINT" if how == "env" else "telemetry.otlp_endpoint") in done.stderr


def _span_start(flags: str = "01") -> SpanStart:
    return SpanStart(f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-{flags}", None, None, "/v1/chat/completions")


def test_answer_tap_reads_id_model_and_finish_reasons_off_the_bytes() -> None:
    span = _span_start()
    tap = span.tap(False, 1 << 20)
    assert isinstance(tap, AnswerTap)
    events = [  # spaced JSON, two choices, a tool call's own id, text that looks like a key
        b'data: {"id": "chatcmpl-9", "model": "llama-x", "choices": [{"index": 0, "delta": {"content": '
        b'"say \\"finish_reason\\": \\"stop\\""}, "finish_reason": null}]}',
        b'data: {"id":"chatcmpl-9","model":"llama-x","choices":[{"index":1,"delta":{"tool_calls":'
        b'[{"id":"call_1","function":{"arguments":"{}"}}]},"finish_reason":"tool_calls"}]}',
        b'data: {"id":"chatcmpl-9","model":"llama-x","choices":[{"index":0,"delta":{},"finish_reason":"length"}]}',
        b'data: {"id":"chatcmpl-9","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}',
        b"data: [DONE]",
    ]
    body = b"\n\n".join(events) + b"\n\n"
    for i in range(0, len(body), 5):  # events split anywhere
        tap.feed(body[i:i + 5])
    assert tap.done and tap.usage is not None and tap.delta_chunks == 2
    assert (span.response_id, span.response_model) == ("chatcmpl-9", "llama-x")
    assert span.finish_reasons == ["tool_calls", "length"]


def test_only_a_sampled_span_reads_the_answer() -> None:
    span = _span_start("00")
    assert type(span.tap(False, 1 << 20)) is StreamTap
    span.take_answer({"id": "x", "model": "m", "choices": [{"finish_reason": "stop"}]})
    assert (span.response_id, span.response_model, span.finish_reasons) == (None, None, None)
    sampled = _span_start()
    sampled.take_answer({"id": "x", "model": "m" * 300, "choices": [{"finish_reason": "stop"}, {"finish_reason": None}]})
    assert sampled.response_id == "x" and sampled.response_model == "m" * 256
    assert sampled.finish_reasons == ["stop"]


@pytest.mark.parametrize(("header", "parsed"), [
    (f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", (CLIENT_TRACE, CLIENT_SPAN, "01")),
    (f"00-{CLIENT_TRACE.upper()}-{CLIENT_SPAN}-00", (CLIENT_TRACE, CLIENT_SPAN, "00")),
    (f"01-{CLIENT_TRACE}-{CLIENT_SPAN}-01-future", (CLIENT_TRACE, CLIENT_SPAN, "01")),  # a later version
    (f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01-extra", None),  # version 00 has exactly four fields
    (f"ff-{CLIENT_TRACE}-{CLIENT_SPAN}-01", None),
    (f"00-{'0' * 32}-{CLIENT_SPAN}-01", None),
    (f"00-{CLIENT_TRACE}-{'0' * 16}-01", None),
    (f"00-{CLIENT_TRACE[:-1]}x-{CLIENT_SPAN}-01", None),
    (f"00-{CLIENT_TRACE}-{CLIENT_SPAN}", None),
    ("", None),
])
def test_parse_traceparent(header: str, parsed: tuple[str, str, str] | None) -> None:
    assert parse_traceparent(header.encode()) == parsed


def test_config_keys() -> None:
    base = {"backends": [{"name": "a", "url": "http://127.0.0.1:1/v1"}]}
    assert Config.model_validate(base).telemetry.otlp_endpoint is None
    assert Config.model_validate(base).telemetry.service_name == "joulegate"
    assert Config.model_validate(base).telemetry.sample_ratio == 1.0
    with pytest.raises(ConfigError, match="sample_ratio"):
        parse_config("backends: [{name: a, url: 'http://127.0.0.1:1/v1'}]\n"
                     "telemetry: {sample_ratio: 1.5}\n")
    with pytest.raises(ConfigError, match="otlp_endpoint"):
        parse_config("backends: [{name: a, url: 'http://127.0.0.1:1/v1'}]\n"
                     "telemetry: {otlp_endpoint: 'grpc://collector:4317'}\n")
