"""Non-streamed answers gathered from the engine's stream (proxy/gather.py).

Where a backend streams upstream, a non-streamed chat or completion goes to the engine as a
stream, so the proxy sees each token's time; the client must still get the whole answer the
engine would have given, with the engine's usage booked.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from openai.types.chat import ChatCompletion

from proxy.gather import Gatherer, final_response, gatherable, streamed_body
from tests.conftest import (
    KEYS,
    MODEL,
    ProxyProc,
    SimBackend,
    backend_yaml,
    sdk_client,
    tenants_yaml,
    wait_until,
)

TEXT = [{"role": "user", "content": "Tell me something about the weather in Lisbon."}]


def sse(*chunks: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def chunk(*choices: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
            "system_fingerprint": "fp", "choices": list(choices), **extra}


# -- pure: which requests, and what the gathered answer holds ----------------------------------

def test_only_non_streamed_chat_and_completions_whose_answer_a_stream_can_give_are_gathered() -> None:
    assert gatherable({"model": "m", "messages": []}, "chat")
    assert gatherable({"model": "m", "prompt": "x", "best_of": 1, "stream": False}, "completion")
    assert not gatherable({"model": "m", "messages": [], "stream": True}, "chat")
    assert not gatherable({"model": "m", "input": "x"}, "embedding")
    assert not gatherable({"model": "m", "prompt": "x", "best_of": 2}, "completion")
    assert not gatherable({"model": "m", "prompt": "x", "prompt_logprobs": 0}, "completion")
    assert not gatherable({"model": "m", "messages": [], "stream_options": {}}, "chat")  # the engine's error to give
    body = orjson.loads(streamed_body({"model": "m", "messages": [], "stream": False}, "chat"))
    assert body == {"model": "m", "messages": [], "stream": True, "stream_options": {"include_usage": True}}
    assert gatherable({"model": "m", "input": "x"}, "response")
    assert orjson.loads(streamed_body({"model": "m", "input": "x"}, "response")) == {
        "model": "m", "input": "x", "stream": True}


def test_a_chat_stream_gathers_into_the_whole_answer() -> None:
    g = Gatherer(chat=True)
    g.feed(sse(
        chunk({"index": 0, "delta": {"role": "assistant", "reasoning_content": "Let"}, "finish_reason": None}),
        chunk({"index": 1, "delta": {"role": "assistant", "content": "Hi"}, "finish_reason": None,
               "logprobs": {"content": [{"token": "Hi", "logprob": -0.1, "top_logprobs": []}]}}),
        chunk({"index": 0, "delta": {"reasoning_content": " me"}}),
        chunk({"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                     "function": {"name": "get_weather", "arguments": ""}}]}}),
        chunk({"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}}),
        chunk({"index": 0, "delta": {"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                                                     "function": {"name": "f", "arguments": "{}"}}]}}),
        chunk({"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Lisbon"}'}}]},
               "finish_reason": "tool_calls", "stop_reason": None}),
        chunk({"index": 1, "delta": {"content": " there"}, "finish_reason": "stop", "stop_reason": 42,
               "logprobs": {"content": [{"token": " there", "logprob": -0.2, "top_logprobs": []}]}}),
    ))
    g.add(chunk(usage={"prompt_tokens": 9, "completion_tokens": 8, "total_tokens": 17,
                       "completion_tokens_details": {"reasoning_tokens": 2}}))
    status, body = g.answer()
    answer = orjson.loads(body)
    assert status == 200
    assert (answer["id"], answer["object"], answer["created"], answer["model"], answer["system_fingerprint"]) == \
        ("chatcmpl-1", "chat.completion", 7, "m", "fp")
    first, second = answer["choices"]
    assert first == {"index": 0, "logprobs": None, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "refusal": None, "reasoning_content": "Let me",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Lisbon"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}
    assert second == {"index": 1, "finish_reason": "stop", "stop_reason": 42,
                      "message": {"role": "assistant", "content": "Hi there", "refusal": None},
                      "logprobs": {"content": [{"token": "Hi", "logprob": -0.1, "top_logprobs": []}, {"token": " there", "logprob": -0.2, "top_logprobs": []}]}}
    assert answer["usage"]["completion_tokens_details"] == {"reasoning_tokens": 2}
    # The SDK reads it as a whole answer.
    parsed = ChatCompletion.model_validate(answer)
    assert parsed.choices[0].message.tool_calls[0].function.arguments == '{"city":"Lisbon"}'  # type: ignore[index]


def test_a_completion_stream_gathers_text_and_logprobs() -> None:
    g = Gatherer(chat=False)
    for text, offset in (("Once", 0), (" upon", 4)):
        g.add({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "choices": [
            {"index": 0, "text": text, "finish_reason": None if offset == 0 else "length",
             "logprobs": {"tokens": [text], "token_logprobs": [-0.5], "top_logprobs": [{text: -0.5}],
                          "text_offset": [offset]}}]})
    status, body = g.answer()
    answer = orjson.loads(body)
    assert status == 200 and answer["object"] == "text_completion" and "usage" not in answer
    assert answer["choices"] == [{"index": 0, "text": "Once upon", "finish_reason": "length", "logprobs": {
        "tokens": ["Once", " upon"], "token_logprobs": [-0.5, -0.5],
        "top_logprobs": [{"Once": -0.5}, {" upon": -0.5}], "text_offset": [0, 4]}}]


def test_an_error_event_mid_stream_is_the_answer() -> None:
    g = Gatherer(chat=True)
    g.feed(sse(chunk({"index": 0, "delta": {"content": "Hi"}}),
               {"error": {"message": "KV cache exhausted", "type": "InternalServerError", "code": 500}}))
    status, body = g.answer()
    assert status == 500 and orjson.loads(body)["error"]["message"] == "KV cache exhausted"
    g = Gatherer(chat=False)
    g.feed(sse({"object": "error", "message": "bad", "type": "BadRequestError", "code": "x"}))
    status, body = g.answer()
    assert status == 502 and orjson.loads(body)["error"]["type"] == "BadRequestError"
    # A Responses stream's last event is the answer; a failed one is the engine's error.
    done = {"type": "response.completed", "response": {"id": "resp_1", "status": "completed", "output": []}}
    assert final_response(done) == (200, orjson.dumps(done["response"]))
    failed = {"type": "response.failed", "response": {"status": "failed", "error": {"code": "server_error",
                                                                                    "message": "engine died"}}}
    status, body = final_response(failed)
    assert status == 502 and orjson.loads(body)["error"]["message"] == "engine died"


# -- through the proxy, against a simulated engine -----------------------------------------------

@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimBackend]:
    backend = SimBackend("h100-llama3.1-8b", tmp_path_factory.mktemp("gather"))
    yield backend
    backend.stop()


@pytest.fixture(scope="module")
def proxy(sim: SimBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProc]:
    config = "server: {access_log: true}\nbackends:\n" + backend_yaml("h100", sim.url, [MODEL],
                                          f", power: {{source: sim, url: '{sim.url}', interval_s: 0.05}}")
    config += "ledger: 'memory://?flush_interval_s=0.05'\n" + tenants_yaml()
    proc = ProxyProc(config, tmp_path_factory.mktemp("gather-proxy"))
    yield proc
    proc.stop()
    assert "Traceback" not in proc.log()


def booked(proxy: ProxyProc, request_id: str) -> dict[str, Any]:
    resp = httpx.get(f"{proxy.url}/v1/energy/requests/{request_id}", timeout=10,
                     headers={"Authorization": f"Bearer {KEYS['acme']}"})
    assert resp.status_code == 200, resp.text
    return resp.json()


def ttft_ms(proxy: ProxyProc, request_id: str) -> float | None:
    """The access log's time to first token: only seen where the engine streamed."""
    def line() -> dict[str, Any] | None:
        for text in proxy.log().splitlines():
            if f'"request_id":"{request_id}"' in text:
                return orjson.loads(text[text.index("{"):])
        return None
    wait_until(lambda: line() is not None, what=f"the access log line of {request_id}")
    found = line()
    assert found is not None
    return found["ttft_ms"]


def whole_from_engine(sim: SimBackend, path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = httpx.post(f"{sim.url}/v1{path}", json=body, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.mark.parametrize("shape", ["", "reasoning", "tools", "reasoning,tools"])
def test_a_gathered_chat_answer_is_the_engines_whole_answer(proxy: ProxyProc, sim: SimBackend, shape: str) -> None:
    body = {"model": MODEL, "messages": TEXT, "max_tokens": 9, "sim_shape": shape}
    rid = f"gather-chat-{shape or 'plain'}"
    client = sdk_client(proxy)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=TEXT, max_tokens=9, extra_body={"sim_shape": shape}, extra_headers={"x-request-id": rid})
    gathered = orjson.loads(raw.content)
    whole = whole_from_engine(sim, "/chat/completions", body)
    for answer in (gathered, whole):
        answer.pop("id"), answer.pop("created")
        answer["choices"][0]["message"].setdefault("refusal", None)
    assert gathered == whole
    assert raw.headers["x-energy-joules"]
    view = booked(proxy, rid)
    assert view["completion_tokens"] == 9 == sim.truth(rid)["completion_tokens"]
    first_ms = ttft_ms(proxy, rid)  # its first token was seen on the way: the engine streamed it
    assert first_ms is not None and first_ms > 0


def test_a_gathered_completion_is_the_engines_whole_answer(proxy: ProxyProc, sim: SimBackend) -> None:
    client = sdk_client(proxy)
    resp = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=7,
                                      extra_headers={"x-request-id": "gather-completion"})
    whole = whole_from_engine(sim, "/completions", {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 7})
    assert resp.choices[0].text == whole["choices"][0]["text"]
    assert resp.choices[0].finish_reason == whole["choices"][0]["finish_reason"] == "length"
    assert resp.usage is not None and resp.usage.model_dump(exclude_none=True) == whole["usage"]
    assert booked(proxy, "gather-completion")["completion_tokens"] == 7
    assert ttft_ms(proxy, "gather-completion") is not None


@pytest.mark.parametrize("shape", ["", "reasoning", "tools"])
def test_a_gathered_responses_answer_is_the_engines_whole_answer(proxy: ProxyProc, sim: SimBackend,
                                                                 shape: str) -> None:
    rid = f"gather-response-{shape or 'plain'}"
    client = sdk_client(proxy)
    raw = client.responses.with_raw_response.create(model=MODEL, input="Tell me about Lisbon.",
                                                    max_output_tokens=8, extra_body={"sim_shape": shape},
                                                    extra_headers={"x-request-id": rid})
    gathered = orjson.loads(raw.content)
    whole = whole_from_engine(sim, "/responses", {"model": MODEL, "input": "Tell me about Lisbon.",
                                                  "max_output_tokens": 8, "sim_shape": shape})
    assert set(gathered) == set(whole)
    for answer in (gathered, whole):
        for volatile in ("id", "created_at"):
            answer.pop(volatile)
        for item in answer["output"]:
            item.pop("id", None)
            item.pop("call_id", None)
    assert gathered == whole
    parsed = raw.parse()
    assert parsed.usage is not None and parsed.usage.output_tokens == 8
    view = booked(proxy, rid)
    assert (view["prompt_tokens"], view["completion_tokens"]) == (parsed.usage.input_tokens, 8)
    assert ttft_ms(proxy, rid) is not None  # its tokens were seen on the way


def test_a_client_leaving_a_gathered_answer_stops_the_engine_and_is_booked(proxy: ProxyProc, sim: SimBackend) -> None:
    rid = "gather-left"
    payload = {"model": MODEL, "messages": TEXT, "max_tokens": 3000}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 1 s and hangs up
        httpx.post(f"{proxy.url}/v1/chat/completions", json=payload, timeout=httpx.Timeout(10.0, read=1.0),
                   headers={"Authorization": f"Bearer {KEYS['acme']}", "x-request-id": rid})
    left_s = time.time()
    wait_until(lambda: sim.truth(rid).get("end_s") is not None, 10, "the engine to drop the request")
    truth = sim.truth(rid)
    assert truth["end_s"] - left_s < 1.0  # the proxy closed the engine's stream at once
    view: dict[str, Any] = {}

    def booked_now() -> bool:
        resp = httpx.get(f"{proxy.url}/v1/energy/requests/{rid}", timeout=10,
                         headers={"Authorization": f"Bearer {KEYS['acme']}"})
        view.update(resp.json() if resp.status_code == 200 else {})
        return resp.status_code == 200

    wait_until(booked_now, 10, "the request to be booked")
    # What the engine generated until the hang-up, counted from the stream's deltas.
    assert view["status"] == 499 and 0 < view["completion_tokens"] < 3000
    assert abs(view["completion_tokens"] - truth["completion_tokens"]) <= 2, (view, truth)
    assert view["joules"] is not None and view["joules"] > 0


def test_an_engine_whose_streams_carry_no_usage_gets_whole_requests_again(proxy: ProxyProc, sim: SimBackend) -> None:
    """Last in this module: it turns gathering off for the backend."""
    client = sdk_client(proxy)
    first = client.chat.completions.create(model=MODEL, messages=TEXT, max_tokens=6,
                                           extra_body={"sim_shape": "no-usage"},
                                           extra_headers={"x-request-id": "gather-no-usage-1"})
    assert first.choices[0].message.content and first.usage is None  # the stream had none to give
    assert booked(proxy, "gather-no-usage-1")["completion_tokens"] == 6  # every delta counted
    second = client.chat.completions.create(model=MODEL, messages=TEXT, max_tokens=6,
                                            extra_body={"sim_shape": "no-usage"},
                                            extra_headers={"x-request-id": "gather-no-usage-2"})
    assert second.usage is not None and second.usage.completion_tokens == 6
    view = booked(proxy, "gather-no-usage-2")
    assert (view["prompt_tokens"], view["completion_tokens"]) == (second.usage.prompt_tokens, 6)
    assert ttft_ms(proxy, "gather-no-usage-2") is None  # asked whole
    assert "streams carry no usage" in proxy.log()
