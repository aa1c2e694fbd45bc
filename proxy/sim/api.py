"""OpenAI request parsing and response shapes for the simulated backend.

Token counts are a deterministic approximation, not a tokenizer: ceil(chars / 4) per text part,
plus 3 per chat message; token-id prompts count one token per id.
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
           "embedding_data", "parse_embeddings", "parse_generation", "read_json"]

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
        content = msg.get("content")
        total += 3
        if isinstance(content, str):
            total += _text_tokens(content)
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise ApiError(400, f"invalid content part in messages[{i}]", param=f"messages.{i}.content")
                if isinstance(part.get("text"), str):
                    total += _text_tokens(part["text"])
        elif content is not None:
            raise ApiError(400, f"invalid type for messages[{i}].content", param=f"messages.{i}.content")
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


def parse_generation(body: dict[str, Any], chat: bool, rng: random.Random,
                     max_context_tokens: int) -> GenerationParams:
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
    if limit is not None:
        tokens = limit
    else:
        draw = rng.lognormvariate(math.log(OUTPUT_MEDIAN_TOKENS), OUTPUT_SIGMA)
        tokens = min(OUTPUT_CAP_TOKENS, max(1, round(draw)))
    if prompt_tokens + tokens > max_context_tokens:
        raise ApiError(400, f"This model's maximum context length is {max_context_tokens} tokens; the "
                       f"request has {prompt_tokens} prompt and {tokens} completion tokens",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    stream = bool(_field(body, "stream", bool))
    opts = _field(body, "stream_options", dict) or {}
    return GenerationParams(prompt_tokens, tokens, "length" if limit is not None else "stop",
                            stream, stream and opts.get("include_usage") is True)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _base(chat: bool, model: str) -> dict[str, Any]:
    prefix = "chatcmpl" if chat else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model}


def completion_body(chat: bool, model: str, p: GenerationParams) -> bytes:
    """A non-streamed chat.completion / text_completion with `p.completion_tokens` filler words."""
    text = "".join(WORDS[i % len(WORDS)] for i in range(p.completion_tokens))
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": p.finish_reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return orjson.dumps({**_base(chat, model), "choices": [choice],
                         "usage": _usage(p.prompt_tokens, p.completion_tokens)})


class StreamShaper:
    """SSE bytes for one streamed request: one chunk per token, the first carrying the role and
    the last the finish_reason, then the usage chunk (if asked) and `[DONE]`. Chunks are
    pre-serialised around a marker so each token costs one bytes join."""

    __slots__ = ("_base", "_ends", "_mid", "_params", "sent")

    def __init__(self, chat: bool, model: str, p: GenerationParams) -> None:
        base = _base(chat, model)
        base["object"] = "chat.completion.chunk" if chat else "text_completion"
        if p.include_usage:
            base["usage"] = None  # as OpenAI does on every chunk but the usage one
        self._base, self._params, self.sent = base, p, 0
        last = p.completion_tokens - 1

        def template(first: bool, final: bool) -> tuple[bytes, bytes]:
            choice: dict[str, Any] = {"index": 0}
            if chat:
                choice["delta"] = {"role": "assistant", "content": _MARK} if first else {"content": _MARK}
            else:
                choice["text"] = _MARK
            choice.update(logprobs=None, finish_reason=p.finish_reason if final else None)
            pre, post = orjson.dumps({**base, "choices": [choice]}).split(_MARK_JSON)
            return b"data: " + pre, post + b"\n\n"

        self._mid = template(False, False)
        self._ends = {last: template(last == 0, True), 0: template(True, last == 0)}

    def render(self, tokens: int, done: bool) -> bytes:
        """The next `tokens` chunks, and the trailer when `done`."""
        parts: list[bytes] = []
        ends, mid = self._ends, self._mid
        for i in range(self.sent, self.sent + tokens):
            pre, post = ends.get(i, mid)
            parts += (pre, _WORDS_B[i % len(_WORDS_B)], post)
        self.sent += tokens
        if done:
            if self._params.include_usage:
                usage = {**self._base, "choices": [], "usage": _usage(self._params.prompt_tokens, self.sent)}
                parts += (b"data: ", orjson.dumps(usage), b"\n\n")
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
