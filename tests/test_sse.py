"""proxy/sse.py StreamTap: byte-exact relay, usage capture, energy injection, delta counting on
every answer shape (chat, completions, reasoning, tool calls, the Responses API), and the bounded
event buffer."""

from __future__ import annotations

import json
import time

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.sse import StreamOverflow, StreamTap
from proxy.usage import Usage, read_usage

ENERGY = {"joules": 12.5, "tokens_per_joule": 0.4, "backend": "h100-a", "method": "measured"}
USAGE = {"prompt_tokens": 12, "total_tokens": 17, "completion_tokens": 5}


def _compact(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _chat_chunk(delta: dict, finish: str | None = None, **extra: object) -> dict:
    return {
        "id": "chatcmpl-8f3a", "object": "chat.completion.chunk", "created": 1718000000,
        "model": "llama-3.1-8b",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        **extra,
    }


def _usage_chunk(usage: dict | None = None) -> dict:
    return {
        "id": "chatcmpl-8f3a", "object": "chat.completion.chunk", "created": 1718000000,
        "model": "llama-3.1-8b", "choices": [], "usage": dict(usage or USAGE),
    }


def vllm_stream(tokens: list[str], sep: bytes = b"\n\n") -> tuple[bytes, bytes, dict]:
    """A vLLM-like chat stream: (ordinary events, usage event + [DONE], the usage chunk object)."""
    events = [_chat_chunk({"role": "assistant", "content": ""})]
    events += [_chat_chunk({"content": t}) for t in tokens]
    events.append(_chat_chunk({"content": ""}, finish="stop"))
    ordinary = b"".join(b"data: " + _compact(e) + sep for e in events)
    usage = _usage_chunk({"prompt_tokens": 12, "completion_tokens": len(tokens),
                          "total_tokens": 12 + len(tokens)})
    closing = b"data: " + _compact(usage) + sep + b"data: [DONE]" + sep
    return ordinary, closing, usage


def feed_all(tap: StreamTap, pieces: list[bytes]) -> bytes:
    return b"".join(tap.feed(p) for p in pieces)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def events_of(data: bytes, sep: bytes = b"\n\n") -> list[bytes]:
    assert data.endswith(sep), data[-40:]
    return data[: -len(sep)].split(sep)


def assert_usage_closing(rest: bytes, usage_obj: dict, sep: bytes = b"\n\n") -> None:
    """`rest` is the usage chunk with energy inside `usage`, then [DONE]."""
    usage_event, done = events_of(rest, sep)
    assert done == b"data: [DONE]"
    assert usage_event.startswith(b"data:")
    got = json.loads(usage_event[5:])
    expected = json.loads(json.dumps(usage_obj))
    expected["usage"]["energy"] = ENERGY
    assert got == expected


def assert_comment_closing(rest: bytes, sep: bytes = b"\n\n") -> None:
    """`rest` is the `: energy {...}` comment, then [DONE]; no usage chunk."""
    comment, done = events_of(rest, sep)
    assert done == b"data: [DONE]"
    assert comment.startswith(b": energy ")
    assert json.loads(comment[len(b": energy "):]) == ENERGY
    assert b"usage" not in rest


# -- byte-exact pass-through under any fragmentation ---------------------------------------------

TOKEN = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=6,
)
CUTS = st.lists(st.integers(min_value=1, max_value=4000), max_size=40)
HYP = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@HYP
@given(tokens=st.lists(TOKEN, min_size=0, max_size=25), cuts=CUTS, wants_usage=st.booleans())
def test_any_fragmentation_relays_bytes_exactly(tokens: list[str], cuts: list[int], wants_usage: bool) -> None:
    ordinary, closing, usage_obj = vllm_stream(tokens)
    stream = ordinary + closing
    tap = StreamTap()
    out = feed_all(tap, split_at(stream, cuts))
    assert out == ordinary  # every ordinary event, byte for byte; usage and [DONE] held back
    assert tap.delta_chunks == len(tokens)
    assert tap.first_token_seen == bool(tokens)
    assert tap.usage == read_usage(usage_obj["usage"])
    assert tap.done
    assert tap.pending == b""
    rest = tap.finish(dict(ENERGY), client_wants_usage=wants_usage)
    if wants_usage:
        assert_usage_closing(rest, usage_obj)
    else:
        assert_comment_closing(rest)


@HYP
@given(tokens=st.lists(TOKEN, min_size=1, max_size=15), cuts=CUTS)
def test_any_fragmentation_of_a_crlf_stream(tokens: list[str], cuts: list[int]) -> None:
    ordinary, closing, usage_obj = vllm_stream(tokens, sep=b"\r\n\r\n")
    tap = StreamTap()
    out = feed_all(tap, split_at(ordinary + closing, cuts))
    assert out == ordinary
    assert tap.delta_chunks == len(tokens)
    assert tap.done and tap.usage == read_usage(usage_obj["usage"])
    assert_usage_closing(tap.finish(dict(ENERGY), client_wants_usage=True), usage_obj, sep=b"\r\n\r\n")


def test_crlf_stream_in_one_piece() -> None:
    ordinary, closing, usage_obj = vllm_stream(["Hel", "lo"], sep=b"\r\n\r\n")
    tap = StreamTap()
    assert tap.feed(ordinary + closing) == ordinary
    assert tap.delta_chunks == 2 and tap.done
    rest = tap.finish(dict(ENERGY), client_wants_usage=False)
    assert_comment_closing(rest, sep=b"\r\n\r\n")


def test_crlf_stream_event_by_event() -> None:
    ordinary, closing, usage_obj = vllm_stream(["a", "b", "c"], sep=b"\r\n\r\n")
    tap = StreamTap()
    pieces = [e + b"\r\n\r\n" for e in events_of(ordinary + closing, b"\r\n\r\n")]
    assert feed_all(tap, pieces) == ordinary
    assert tap.delta_chunks == 3 and tap.done


def test_crlf_stream_whose_first_read_ends_mid_event() -> None:
    """The first read rarely holds a whole event; CRLF framing must still be recognised."""
    ordinary, closing, _ = vllm_stream(["x", "y"], sep=b"\r\n\r\n")
    stream = ordinary + closing
    tap = StreamTap()
    out = tap.feed(stream[:10]) + tap.feed(stream[10:])
    assert out == ordinary
    assert tap.done and tap.delta_chunks == 2


def test_byte_at_a_time() -> None:
    ordinary, closing, usage_obj = vllm_stream(["é", "😀", " world"])
    stream = ordinary + closing
    tap = StreamTap()
    out = feed_all(tap, [stream[i:i + 1] for i in range(len(stream))])
    assert out == ordinary
    assert tap.delta_chunks == 3
    assert_usage_closing(tap.finish(dict(ENERGY), True), usage_obj)


def test_feed_returns_only_whole_events() -> None:
    event = b"data: " + _compact(_chat_chunk({"content": "hi"})) + b"\n\n"
    tap = StreamTap()
    assert tap.feed(event[:-1]) == b""
    assert tap.pending == event[:-1]
    assert tap.feed(event[-1:]) == event
    assert tap.pending == b""


# -- the usage chunk ---------------------------------------------------------------------------------


def test_usage_chunk_gains_energy_when_client_asked() -> None:
    ordinary, closing, usage_obj = vllm_stream(["Hi"])
    tap = StreamTap()
    assert tap.feed(ordinary + closing) == ordinary
    rest = tap.finish(dict(ENERGY), client_wants_usage=True)
    assert_usage_closing(rest, usage_obj)
    assert b": energy" not in rest


def test_usage_chunk_replaced_by_comment_when_client_did_not_ask() -> None:
    ordinary, closing, _ = vllm_stream(["Hi"])
    tap = StreamTap()
    assert tap.feed(ordinary + closing) == ordinary
    assert_comment_closing(tap.finish(dict(ENERGY), client_wants_usage=False))


def test_no_energy_known_client_asked_usage() -> None:
    ordinary, closing, usage_obj = vllm_stream(["Hi"])
    tap = StreamTap()
    tap.feed(ordinary + closing)
    usage_event, done = events_of(tap.finish(None, client_wants_usage=True))
    assert json.loads(usage_event[5:]) == usage_obj
    assert done == b"data: [DONE]"


def test_no_energy_known_client_did_not_ask_usage() -> None:
    ordinary, closing, _ = vllm_stream(["Hi"])
    tap = StreamTap()
    tap.feed(ordinary + closing)
    assert tap.finish(None, client_wants_usage=False) == b"data: [DONE]\n\n"


def test_usage_and_done_in_separate_reads() -> None:
    ordinary, closing, usage_obj = vllm_stream(["a", "b"])
    usage_event, done = events_of(closing)
    tap = StreamTap()
    assert tap.feed(ordinary) == ordinary
    assert tap.feed(usage_event + b"\n\n") == b""
    assert tap.usage == read_usage(usage_obj["usage"]) and not tap.done
    assert tap.feed(done + b"\n\n") == b""
    assert tap.done


def test_openai_style_usage_null_on_every_chunk_is_forwarded_untouched() -> None:
    events = [_chat_chunk({"role": "assistant", "content": ""}, usage=None)]
    events += [_chat_chunk({"content": t}, usage=None) for t in ["The", " sky", " is", " blue"]]
    events.append(_chat_chunk({}, finish="stop", usage=None))
    # OpenAI's own spacing differs from vLLM's; keep one event in the spaced form to be sure.
    ordinary = b"".join(b"data: " + _compact(e) + b"\n\n" for e in events)
    ordinary += b'data: {"id": "x", "choices": [{"index": 0, "delta": {"content": "!"}}], "usage": null}\n\n'
    usage_obj = _usage_chunk()
    stream = ordinary + b"data: " + _compact(usage_obj) + b"\n\ndata: [DONE]\n\n"
    for cut in (1, 57, len(ordinary) - 3, len(ordinary) + 20):
        tap = StreamTap()
        out = tap.feed(stream[:cut]) + tap.feed(stream[cut:])
        assert out == ordinary
        assert tap.delta_chunks == 5
        assert tap.usage == read_usage(USAGE)
        assert_usage_closing(tap.finish(dict(ENERGY), True), usage_obj)


def test_usage_null_on_every_chunk_parses_no_json(monkeypatch: pytest.MonkeyPatch) -> None:
    # The hot path parses JSON only where a usage object may be, never `"usage":null` chunks.
    parsed: list[bytes] = []
    loads = orjson.loads
    monkeypatch.setattr("proxy.sse.orjson.loads", lambda b: parsed.append(bytes(b)) or loads(b))
    tap = StreamTap()
    for t in ["The", " sky", " is", " blue"]:
        tap.feed(b"data: " + _compact(_chat_chunk({"content": t}, usage=None)) + b"\n\n")
    tap.feed(b"data: " + _compact(_usage_chunk()) + b"\n\ndata: [DONE]\n\n")
    assert len(parsed) == 1 and tap.usage == read_usage(USAGE) and tap.delta_chunks == 4


def test_continuous_usage_stats_are_forwarded_and_the_last_usage_kept() -> None:
    """vLLM's continuous_usage_stats: usage on every content chunk, then the final usage chunk."""
    events = [
        _chat_chunk({"content": "a"}, usage={"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}),
        _chat_chunk({"content": "b"}, usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}),
    ]
    ordinary = b"".join(b"data: " + _compact(e) + b"\n\n" for e in events)
    final = _usage_chunk({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
    tap = StreamTap()
    out = tap.feed(ordinary + b"data: " + _compact(final) + b"\n\ndata: [DONE]\n\n")
    assert out == ordinary
    assert tap.usage == read_usage(final["usage"])
    assert_comment_closing(tap.finish(dict(ENERGY), False))


def test_tgi_style_data_without_space() -> None:
    """TGI (axum) writes `data:{...}` and `data:[DONE]`, with no space after the colon."""
    events = [
        _chat_chunk({"role": "assistant", "content": "Hello"}, usage=None),
        _chat_chunk({"role": "assistant", "content": " there"}, finish="stop", usage=None),
    ]
    ordinary = b"".join(b"data:" + _compact(e) + b"\n\n" for e in events)
    usage_obj = _usage_chunk()
    tap = StreamTap()
    out = tap.feed(ordinary + b"data:" + _compact(usage_obj) + b"\n\ndata:[DONE]\n\n")
    assert out == ordinary  # neither the usage chunk nor [DONE] forwarded early
    assert tap.delta_chunks == 2
    assert tap.usage == read_usage(USAGE)
    assert tap.done
    assert_usage_closing(tap.finish(dict(ENERGY), True), usage_obj)


# -- delta counting -----------------------------------------------------------------------------------


def _count(*events: bytes) -> StreamTap:
    tap = StreamTap()
    tap.feed(b"".join(b"data: " + e + b"\n\n" for e in events))
    return tap


def test_role_only_first_chunk_does_not_count() -> None:
    tap = _count(_compact(_chat_chunk({"role": "assistant"})),
                 _compact(_chat_chunk({"role": "assistant", "content": ""})))
    assert tap.delta_chunks == 0
    assert not tap.first_token_seen


def test_empty_content_does_not_count() -> None:
    tap = _count(_compact(_chat_chunk({"content": ""})), _compact(_chat_chunk({"content": "x"})),
                 _compact(_chat_chunk({"content": ""}, finish="stop")))
    assert tap.delta_chunks == 1
    assert tap.first_token_seen


def test_empty_content_does_not_count_in_spaced_json() -> None:
    """Servers that serialise with Python's json.dumps write `"content": ""`."""
    spaced = [json.dumps(_chat_chunk({"role": "assistant", "content": ""})).encode(),
              json.dumps(_chat_chunk({"content": "Hi"})).encode(),
              json.dumps(_chat_chunk({"content": ""}, finish="stop")).encode()]
    assert b'"content": ""' in spaced[0]
    tap = _count(*spaced)
    assert tap.delta_chunks == 1


def test_llama_cpp_content_null_first_chunk_does_not_count() -> None:
    first = (b'{"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}],'
             b'"created":1718000000,"id":"chatcmpl-x","model":"m","system_fingerprint":"b4000-abc",'
             b'"object":"chat.completion.chunk"}')
    tap = _count(first)
    assert tap.delta_chunks == 0 and not tap.first_token_seen
    tap.feed(b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"Hi"}}],'
             b'"object":"chat.completion.chunk"}\n\n')
    assert tap.delta_chunks == 1 and tap.first_token_seen


def test_completions_text_counts() -> None:
    def chunk(text: str, finish: str | None = None) -> bytes:
        return _compact({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
                         "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]})

    tap = _count(chunk(" Once"), chunk(" upon"), chunk(" a"), chunk("", finish="length"))
    assert tap.delta_chunks == 3


def test_content_that_looks_like_a_marker_counts_once() -> None:
    tricky = 'he said "content":"x" and "text":"y"'
    tap = _count(_compact(_chat_chunk({"content": tricky})))
    assert tap.delta_chunks == 1


def test_first_token_seen_flips_on_the_first_content() -> None:
    tap = StreamTap()
    tap.feed(b"data: " + _compact(_chat_chunk({"role": "assistant", "content": ""})) + b"\n\n")
    assert not tap.first_token_seen
    tap.feed(b"data: " + _compact(_chat_chunk({"content": "A"}))[:20])
    assert not tap.first_token_seen  # not a whole event yet
    tap.feed(_compact(_chat_chunk({"content": "A"}))[20:] + b"\n\n")
    assert tap.first_token_seen


# -- a stream cut short ------------------------------------------------------------------------------


@pytest.mark.parametrize("tail", [b"", b'data: {"id":"chatcmpl-8f3a","choices":[{"delta":{"con'])
def test_stream_cut_before_usage(tail: bytes) -> None:
    ordinary, _, _ = vllm_stream(["one", " two", " three"])
    ordinary = ordinary[: ordinary.rfind(b"data: ")]  # drop the finish chunk too
    tap = StreamTap()
    out = tap.feed(ordinary + tail)
    assert out == ordinary
    assert tap.usage is None
    assert tap.delta_chunks == 3
    assert tap.done is False
    assert tap.pending == tail
    assert tap.finish(None, client_wants_usage=True) == b""


def test_comments_and_keepalives_pass_through() -> None:
    stream = b": keep-alive\n\n" + b"data: " + _compact(_chat_chunk({"content": "z"})) + b"\n\n: ping\n\n"
    tap = StreamTap()
    assert tap.feed(stream) == stream
    assert tap.delta_chunks == 1


# -- every answer shape -------------------------------------------------------------------------------


def raw_chunk(delta: dict | None = None, text: str | None = None, usage: dict | None = None,
          choices: bool = True) -> bytes:
    """One chat (delta) or completion (text) chunk as an engine sends it."""
    obj: dict = {"id": "c1", "object": "chat.completion.chunk", "model": "m"}
    if choices:
        choice: dict = {"index": 0, "finish_reason": None}
        if delta is not None:
            choice["delta"] = delta
        if text is not None:
            choice["text"] = text
        obj["choices"] = [choice]
    else:
        obj["choices"] = []
    if usage is not None:
        obj["usage"] = usage
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def resp_event(kind: str, **fields: object) -> bytes:
    """One Responses API event: an `event:` line and its `data:` line."""
    return f"event: {kind}\n".encode() + b"data: " + orjson.dumps({"type": kind, **fields}) + b"\n\n"


def feed_steps(tap: StreamTap, data: bytes, step: int) -> bytes:
    return b"".join(tap.feed(data[i:i + step]) for i in range(0, len(data), step))


CHAT_SHAPES = {
    "content": [raw_chunk({"role": "assistant", "content": ""}), raw_chunk({"content": "Hi"}), raw_chunk({"content": " there"})],
    "reasoning_content": [raw_chunk({"role": "assistant", "reasoning_content": "Let"}),
                          raw_chunk({"reasoning_content": " me think"}), raw_chunk({"content": "Yes"})],
    "reasoning": [raw_chunk({"reasoning": "hmm"}), raw_chunk({"reasoning": ""}), raw_chunk({"content": "ok"})],
    "refusal": [raw_chunk({"role": "assistant", "refusal": "I"}), raw_chunk({"refusal": " can't"}),
                raw_chunk({"content": None, "refusal": None})],
    "tool_calls": [
        raw_chunk({"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}]}),
        raw_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city"'}}]}),
        raw_chunk({"tool_calls": [{"index": 0, "function": {"arguments": ': "Paris"}'}}]}),
    ],
    "completion": [raw_chunk(text="Once"), raw_chunk(text=""), raw_chunk(text=" upon")],
    # vLLM (since `reasoning` replaced `reasoning_content`) sends both, same text, in each delta.
    "reasoning_both": [raw_chunk({"role": "assistant", "reasoning": "", "reasoning_content": ""}),
                       raw_chunk({"reasoning": "Let", "reasoning_content": "Let"}),
                       raw_chunk({"reasoning": " me", "reasoning_content": " me"}), raw_chunk({"content": "Yes"})],
}
#: Generated tokens in each shape above: empty strings and nulls are none.
CHAT_TOKENS = {"content": 2, "reasoning_content": 3, "reasoning": 2, "refusal": 2, "tool_calls": 2,
               "completion": 2, "reasoning_both": 3}


@pytest.mark.parametrize("shape", sorted(CHAT_SHAPES))
@pytest.mark.parametrize("step", [1, 7, 1 << 20])
def test_every_delta_kind_counts_one_token(shape: str, step: int) -> None:
    data = b"".join(CHAT_SHAPES[shape]) + b"data: [DONE]\n\n"
    tap = StreamTap()
    out = feed_steps(tap, data, step)
    assert tap.delta_chunks == CHAT_TOKENS[shape]
    assert tap.done and tap.usage is None
    assert out + tap.finish(None, client_wants_usage=False) == data  # untouched, [DONE] last


SPACED_CRLF = (b'data: {"choices": [{"delta": {"reasoning_content": "a"}}]}\r\n\r\n'
               b'data: {"choices": [{"delta": {"content": ""}}]}\r\n\r\n'
               b'data: {"choices": [{"delta": {"content": "b"}}]}\r\n\r\ndata: [DONE]\r\n\r\n')
#: vLLM's two reasoning fields in spaced JSON: one token a delta, none for empty ones.
SPACED_BOTH = (b'data: {"choices": [{"delta": {"reasoning": "", "reasoning_content": ""}}]}\n\n'
               b'data: {"choices": [{"delta": {"reasoning": "a", "reasoning_content": "a"}}]}\n\n'
               b'data: {"choices": [{"delta": {"content": "b"}}]}\n\ndata: [DONE]\n\n')


@pytest.mark.parametrize("data", [SPACED_CRLF, SPACED_BOTH])
def test_spaced_json_and_crlf_boundaries_count_the_same(data: bytes) -> None:
    for step in (1, 3, len(data)):
        tap = StreamTap()
        out = feed_steps(tap, data, step)
        assert tap.delta_chunks == 2 and tap.done
        assert out + tap.finish(None, False) == data


def test_text_that_looks_like_a_marker_is_no_token() -> None:
    # Inside a JSON string quotes are escaped, so generated text never matches a marker.
    tap = StreamTap()
    tap.feed(raw_chunk({"content": 'say "content":"x" and "usage"'}))
    assert tap.delta_chunks == 1 and tap.usage is None


def test_usage_chunk_with_reasoning_tokens_is_held_back_and_read() -> None:
    usage = {"prompt_tokens": 11, "completion_tokens": 9, "total_tokens": 20,
             "completion_tokens_details": {"reasoning_tokens": 6}}
    data = b"".join(CHAT_SHAPES["reasoning_content"]) + raw_chunk(usage=usage, choices=False) + b"data: [DONE]\n\n"
    tap = StreamTap()
    out = feed_steps(tap, data, 5)
    assert b'"usage"' not in out
    assert tap.usage == Usage(11, 9, 6)
    closing = tap.finish({"joules": 1.0}, client_wants_usage=True)
    assert closing.endswith(b"data: [DONE]\n\n") and b'"energy":{"joules":1.0}' in closing


def responses_stream(final: str = "response.completed", usage: dict | None = None) -> list[bytes]:
    response = {"id": "resp_1", "object": "response", "status": "completed", "output": [],
                "usage": usage}
    return [
        resp_event("response.created", sequence_number=0, response={**response, "status": "in_progress", "usage": None}),
        resp_event("response.reasoning_text.delta", sequence_number=1, item_id="rs_1", output_index=0,
              content_index=0, delta="Think"),
        resp_event("response.reasoning_summary_text.delta", sequence_number=2, item_id="rs_1", output_index=0,
              summary_index=0, delta="Sum"),
        resp_event("response.content_part.added", sequence_number=3, item_id="msg_1", output_index=1,
              content_index=0, part={"type": "output_text", "text": "", "annotations": []}),
        resp_event("response.output_text.delta", sequence_number=4, item_id="msg_1", output_index=1,
              content_index=0, delta="Hello", logprobs=[]),
        resp_event("response.output_text.delta", sequence_number=5, item_id="msg_1", output_index=1,
              content_index=0, delta="", logprobs=[]),
        resp_event("response.function_call_arguments.delta", sequence_number=6, item_id="fc_1", output_index=2,
              delta='{"a":1}'),
        resp_event("response.refusal.delta", sequence_number=7, item_id="msg_1", output_index=1, content_index=1,
              delta="No"),
        resp_event("response.output_text.done", sequence_number=8, item_id="msg_1", output_index=1,
              content_index=0, text="Hello", logprobs=[]),
        resp_event(final, sequence_number=9, response=response),
    ]


@pytest.mark.parametrize("final", ["response.completed", "response.failed", "response.incomplete"])
def test_responses_stream_ends_with_its_final_resp_event(final: str) -> None:
    usage = {"input_tokens": 12, "output_tokens": 30, "total_tokens": 42,
             "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 20}}
    data = b"".join(responses_stream(final, usage))
    for step in (1, 13, len(data)):
        tap = StreamTap(responses=True)
        out = feed_steps(tap, data, step)
        assert out == data  # every event forwarded, the final one too
        assert tap.delta_chunks == 5  # reasoning, summary, text, arguments, refusal; not "" nor .done
        assert tap.done and tap.usage == Usage(12, 30, 20)
        closing = tap.finish({"joules": 2.5, "method": "measured"}, client_wants_usage=False)
        assert closing == b': energy {"joules":2.5,"method":"measured"}\n\n'  # no [DONE] invented


def test_responses_stream_cut_before_its_final_event_is_not_done() -> None:
    tap = StreamTap(responses=True)
    feed_steps(tap, b"".join(responses_stream()[:-1]), 64)
    assert not tap.done and tap.usage is None and tap.delta_chunks == 5


def test_an_endless_event_is_cut_at_the_limit_in_linear_time() -> None:
    limit = 1 << 20
    tap = StreamTap(max_event_bytes=limit)
    assert tap.feed(raw_chunk({"content": "a"})) != b""
    fragment = b"data: " + b"x" * 1018  # 1 KiB, never a boundary
    sent = 0
    with pytest.raises(StreamOverflow):
        for _ in range(4096):  # 4 MiB
            sent += len(fragment)
            tap.feed(fragment)
    assert tap.overflow and limit < sent <= limit + len(fragment)  # cut by the first fragment past it
    assert tap.delta_chunks == 1


def test_a_long_event_costs_linear_time() -> None:
    """16 MiB in 1 KiB fragments, then a boundary: re-joining the tail per fragment (quadratic)
    would copy ~128 GiB; a linear buffer copies it once."""
    tap = StreamTap(max_event_bytes=64 << 20)
    fragment = b"y" * 1024
    started = time.perf_counter()
    tap.feed(b'data: {"choices":[{"delta":{"content":"')
    for _ in range(16 * 1024):
        assert tap.feed(fragment) == b""
    out = tap.feed(b'"}}]}\n\n')
    elapsed_s = time.perf_counter() - started
    assert len(out) > 16 << 20 and out.endswith(b"\n\n") and tap.delta_chunks == 1
    assert elapsed_s < 5.0, elapsed_s
