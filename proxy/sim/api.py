"""OpenAI request parsing and response shapes for the simulated backend.

Token counts are a deterministic approximation, not a tokenizer: ceil(chars / 4) per text part,
plus 3 per chat message; token-id prompts count one token per id; media parts a fixed number
each (MEDIA_TOKENS), as engines count an image by its resolution, not its bytes.

Answer shapes (`sim_shape` in the body, or the `x-sim-shape` header; comma-separated), to test
clients and proxies against what real engines send:
- `reasoning`: chat answers think first, half the tokens as `reasoning_content` deltas (vLLM's
  reasoning parsers), and usage counts them in `completion_tokens_details.reasoning_tokens`;
- `tools`: chat answers are one tool call, each token an `arguments` delta;
- `no-usage`: streams ignore `stream_options` (no usage chunk), as several engines do.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

__all__ = ["ApiError", "EmbeddingParams", "GenerationParams", "StreamShaper", "check_model", "completion_body",
           "content_tokens", "embedding_data", "output_tokens", "parse_embeddings", "parse_generation",
           "parse_shape", "read_json", "usage_json"]

WORDS = (" lorem", " ipsum", " dolor", " sit", " amet", " consectetur", " adipiscing", " elit")
_WORDS_B = tuple(w.encode() for w in WORDS)
_MARK = "\x00MARK\x00"
_MARK_JSON = orjson.dumps(_MARK)[1:-1]
DEFAULT_EMBEDDING_DIM = 256
#: OpenAI's limit on inputs per embeddings request.
MAX_EMBEDDING_INPUTS = 2048
#: Vectors are drawn in Python on the event loop (~0.5 us a number): 2^20 numbers take ~0.5 s
#: and ~20 MB of JSON; 2048 inputs x 8192 dimensions would stall every other request for 10 s.
MAX_EMBEDDING_NUMBERS = 1 << 20
# Output length when the client gives no max_tokens: log-normal, median 128, capped at 1024.
OUTPUT_MEDIAN_TOKENS, OUTPUT_SIGMA, OUTPUT_CAP_TOKENS = 128, 0.9, 1024
#: Prompt tokens per media part: a 1024 px image at OpenAI's high detail (85 + 4 x 170), a few
#: seconds of audio, a short document. Deliberately not the proxy's estimate, so tests see the
#: engine's count replace it.
MEDIA_TOKENS = {"image_url": 765, "input_image": 765, "input_audio": 300, "file": 1000, "input_file": 1000}
SHAPES = frozenset({"reasoning", "tools", "no-usage"})
TOOL_NAME = "lookup"


class ApiError(Exception):
    """An OpenAI-shaped error: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return web.Response(status=self.status, body=orjson.dumps(body), content_type="application/json")


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"could not parse the JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _field(body: dict[str, Any], name: str, types: type | tuple[type, ...], required: bool = False) -> Any:
    """Field `name` checked against `types` (a bool is not an int here); None when absent."""
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(400, f"missing required parameter: '{name}'", param=name)
        return None
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise ApiError(400, f"invalid type for '{name}'", param=name)
    return value


def check_model(body: dict[str, Any], model: str) -> None:
    """400 without a model, 404 model_not_found for another one."""
    asked = _field(body, "model", str, required=True)
    if asked != model:
        raise ApiError(404, f"The model '{asked}' does not exist", param="model", code="model_not_found")


def _text_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def _chat_prompt_tokens(messages: Any) -> int:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    total = 0
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", param=f"messages.{i}")
        total += 3 + content_tokens(msg.get("content"), f"messages[{i}]", f"messages.{i}.content")
    return total


def content_tokens(content: Any, where: str, param: str) -> int:
    """A message's content: a string, or parts (text counted, media a fixed number each)."""
    if isinstance(content, str):
        return _text_tokens(content)
    if content is None:
        return 0
    if not isinstance(content, list):
        raise ApiError(400, f"invalid type for {where}.content", param=param)
    total = 0
    for part in content:
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise ApiError(400, f"invalid content part in {where}", param=param)
        if isinstance(part.get("text"), str):
            total += _text_tokens(part["text"])
        total += MEDIA_TOKENS.get(part["type"], 0)
    return total


def _input_items(value: Any, name: str) -> list[str | list[int]]:
    """A `prompt` / `input`: a string, token ids, or an array of either."""
    if isinstance(value, str):
        return [value]
    if _is_ids(value):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) or _is_ids(v) for v in value):
        return value
    raise ApiError(400, f"'{name}' must be a string, an array of strings or an array of token ids", param=name)


def _items_tokens(items: list[str | list[int]]) -> int:
    return max(1, sum(_text_tokens(i) if isinstance(i, str) else len(i) for i in items))


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """A parsed chat or text completion request."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    stream: bool
    include_usage: bool
    reasoning_tokens: int = 0  # the first ones of completion_tokens (shape `reasoning`)
    tools: bool = False  # the answer is one tool call (shape `tools`)


def parse_shape(value: Any) -> frozenset[str]:
    """A `sim_shape` / `x-sim-shape` value: comma-separated names from SHAPES."""
    if value is None:
        return frozenset()
    if not isinstance(value, str):
        raise ApiError(400, "'sim_shape' must be a string", param="sim_shape")
    names = frozenset(v.strip() for v in value.split(",") if v.strip())
    if names - SHAPES:
        raise ApiError(400, f"unknown sim_shape {sorted(names - SHAPES)}; expected some of {sorted(SHAPES)}",
                       param="sim_shape")
    return names


def parse_generation(body: dict[str, Any], chat: bool, rng: random.Random,
                     max_context_tokens: int, shape: frozenset[str] = frozenset()) -> GenerationParams:
    """Token counts and streaming options; exactly max(_completion)_tokens when given, else a
    seeded log-normal draw. A list of prompts counts as one request (one choice)."""
    if chat:
        prompt_tokens = _chat_prompt_tokens(body.get("messages"))
    else:
        prompt_tokens = _items_tokens(_input_items(body.get("prompt"), "prompt"))
    limit = _field(body, "max_completion_tokens", int)
    if limit is None:
        limit = _field(body, "max_tokens", int)
    if limit is not None and limit < 1:
        raise ApiError(400, "max_tokens must be at least 1", param="max_tokens")
    n = _field(body, "n", int)
    if n is not None and n != 1:
        raise ApiError(400, "only n=1 is supported by the simulator", param="n")
    tokens = output_tokens(limit, rng)
    if prompt_tokens + tokens > max_context_tokens:
        raise ApiError(400, f"This model's maximum context length is {max_context_tokens} tokens; the "
                       f"request has {prompt_tokens} prompt and {tokens} completion tokens",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    stream = bool(_field(body, "stream", bool))
    opts = _field(body, "stream_options", dict) or {}
    tools = chat and "tools" in shape
    finish = "tool_calls" if tools else "length" if limit is not None else "stop"
    return GenerationParams(prompt_tokens, tokens, finish, stream,
                            stream and opts.get("include_usage") is True and "no-usage" not in shape,
                            tokens // 2 if chat and "reasoning" in shape else 0, tools)


def output_tokens(limit: int | None, rng: random.Random) -> int:
    """Exactly `limit` when given, else a seeded log-normal draw."""
    if limit is not None:
        return limit
    draw = rng.lognormvariate(math.log(OUTPUT_MEDIAN_TOKENS), OUTPUT_SIGMA)
    return min(OUTPUT_CAP_TOKENS, max(1, round(draw)))


def usage_json(prompt: int, completion: int, reasoning: int = 0) -> dict[str, Any]:
    """Chat/completions usage; the reasoning part as OpenAI reports it, when there is one."""
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion}
    if reasoning:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return out


def _words(start: int, stop: int) -> str:
    return "".join(WORDS[i % len(WORDS)] for i in range(start, stop))


def _tool_call(arguments: str | None) -> dict[str, Any]:
    call: dict[str, Any] = {"index": 0, "id": "call_sim0", "type": "function",
                            "function": {"name": TOOL_NAME, "arguments": arguments}}
    return call


def _base(chat: bool, model: str) -> dict[str, Any]:
    prefix = "chatcmpl" if chat else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model}


def completion_body(chat: bool, model: str, p: GenerationParams) -> bytes:
    """A non-streamed chat.completion / text_completion with `p.completion_tokens` filler words."""
    r = p.reasoning_tokens
    text = _words(r, p.completion_tokens)
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": p.finish_reason}
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": None if p.tools else text}
        if r:
            message["reasoning_content"] = _words(0, r)
        if p.tools:
            tool = _tool_call(text)
            del tool["index"]
            message["tool_calls"] = [tool]
        choice["message"] = message
    else:
        choice["text"] = text
    return orjson.dumps({**_base(chat, model), "choices": [choice],
                         "usage": usage_json(p.prompt_tokens, p.completion_tokens, r)})


class StreamShaper:
    """SSE bytes for one streamed request: one chunk per token, the first carrying the role and
    the last the finish_reason, then the usage chunk (if asked) and `[DONE]`. Chunks are
    pre-serialised around a marker so each token costs one bytes join. Shapes: the first
    `reasoning_tokens` are `reasoning_content` deltas; with `tools`, a chunk naming the call
    comes first and each token is an `arguments` delta."""

    __slots__ = ("_base", "_ends", "_mid", "_mid_reasoning", "_header", "_params", "sent")

    def __init__(self, chat: bool, model: str, p: GenerationParams) -> None:
        base = _base(chat, model)
        base["object"] = "chat.completion.chunk" if chat else "text_completion"
        if p.include_usage:
            base["usage"] = None  # as OpenAI does on every chunk but the usage one
        self._base, self._params, self.sent = base, p, 0
        last, r = p.completion_tokens - 1, p.reasoning_tokens

        def chunk(delta: dict[str, Any], final: bool) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": p.finish_reason if final else None}
            return orjson.dumps({**base, "choices": [choice]})

        def template(i: int) -> tuple[bytes, bytes]:
            role = {"role": "assistant"} if i == 0 and not (p.tools and r == 0) else {}
            final = i == last
            if not chat:
                choice = {"index": 0, "text": _MARK, "logprobs": None,
                          "finish_reason": p.finish_reason if final else None}
                data = orjson.dumps({**base, "choices": [choice]})
            elif i < r:
                data = chunk({**role, "reasoning_content": _MARK}, final)
            elif p.tools:
                data = chunk({"tool_calls": [{"index": 0, "function": {"arguments": _MARK}}]}, final)
            else:
                data = chunk({**role, "content": _MARK}, final)
            pre, post = data.split(_MARK_JSON)
            return b"data: " + pre, post + b"\n\n"

        self._mid = template(max(r, 1) if last > r else last)
        self._mid_reasoning = template(1) if r > 1 else self._mid
        self._ends = {i: template(i) for i in {0, last, r - 1, r} if 0 <= i <= last}
        self._header = b""
        if p.tools:  # the call's id and name, with empty arguments, before its first token
            head = {"role": "assistant"} if r == 0 else {}
            self._header = b"data: " + chunk({**head, "content": None, "tool_calls": [_tool_call("")]}, False) + b"\n\n"

    def render(self, tokens: int, done: bool) -> bytes:
        """The next `tokens` chunks, and the trailer when `done`."""
        parts: list[bytes] = []
        ends, mid, mid_r, r = self._ends, self._mid, self._mid_reasoning, self._params.reasoning_tokens
        for i in range(self.sent, self.sent + tokens):
            if i == r and self._header:
                parts.append(self._header)
            pre, post = ends.get(i) or (mid_r if i < r else mid)
            parts += (pre, _WORDS_B[i % len(_WORDS_B)], post)
        self.sent += tokens
        if done:
            if self._params.include_usage:
                usage = usage_json(self._params.prompt_tokens, self.sent, min(r, self.sent))
                parts += (b"data: ", orjson.dumps({**self._base, "choices": [], "usage": usage}), b"\n\n")
            parts.append(b"data: [DONE]\n\n")
        return b"".join(parts)


@dataclass(frozen=True, slots=True)
class EmbeddingParams:
    """A parsed embeddings request."""

    items: list[str | list[int]]
    prompt_tokens: int
    dimensions: int
    encoding_format: str


def parse_embeddings(body: dict[str, Any]) -> EmbeddingParams:
    items = _input_items(body.get("input"), "input")
    if len(items) > MAX_EMBEDDING_INPUTS:
        raise ApiError(400, f"'input' must have at most {MAX_EMBEDDING_INPUTS} items", param="input")
    dim = _field(body, "dimensions", int) or DEFAULT_EMBEDDING_DIM
    if not 1 <= dim <= 8192:
        raise ApiError(400, "'dimensions' must be between 1 and 8192", param="dimensions")
    if len(items) * dim > MAX_EMBEDDING_NUMBERS:
        raise ApiError(400, f"the simulator returns at most {MAX_EMBEDDING_NUMBERS} numbers per request "
                       f"({len(items)} inputs x {dim} dimensions)", param="dimensions")
    fmt = _field(body, "encoding_format", str) or "float"
    if fmt not in ("float", "base64"):
        raise ApiError(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    return EmbeddingParams(items, _items_tokens(items), dim, fmt)


def _unit_vector(item: str | list[int], dim: int, seed: int) -> list[float]:
    """A deterministic unit vector for `item` (same input, same seed: same vector)."""
    key = item if isinstance(item, str) else ",".join(map(str, item))
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    rng = random.Random(int.from_bytes(digest, "little"))
    vec = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def embedding_data(p: EmbeddingParams, seed: int) -> list[dict[str, Any]]:
    """The `data` list: floats, or little-endian float32 base64 as the OpenAI SDK expects."""
    data = []
    for i, item in enumerate(p.items):
        vec = _unit_vector(item, p.dimensions, seed)
        out: Any = vec
        if p.encoding_format == "base64":
            out = base64.b64encode(struct.pack(f"<{p.dimensions}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": out})
    return data
