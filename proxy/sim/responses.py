"""The Responses API (`POST /v1/responses`) for the simulated backend: request parsing, the
`response` object, and its typed stream events.

A stream is `event: <type>` / `data: <json>` pairs: `response.created`, `response.in_progress`,
then per output item `response.output_item.added`, its deltas (`response.reasoning_text.delta`,
`response.output_text.delta` or `response.function_call_arguments.delta`), their `.done`
events and `response.output_item.done`, and last `response.completed` carrying the whole
response and its `usage` (`input_tokens`, `output_tokens`, `output_tokens_details.
reasoning_tokens`). As with OpenAI, no `data: [DONE]` follows. Shapes as in `proxy.sim.api`:
`reasoning` (half the tokens are a reasoning item) and `tools` (the answer is a function call).
"""

from __future__ import annotations

import math
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.sim.api import TOOL_NAME, WORDS, ApiError, content_tokens, output_tokens

__all__ = ["ResponseParams", "ResponsesStream", "parse_response"]


@dataclass(frozen=True, slots=True)
class ResponseParams:
    """A parsed `POST /v1/responses`."""

    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    tools: bool
    stream: bool
    incomplete: bool  # stopped by max_output_tokens


def _text_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def _input_tokens(value: Any) -> int:
    """A string, or items (messages with string or part-list content, function outputs)."""
    if isinstance(value, str):
        return _text_tokens(value)
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'input' must be a string or a non-empty array", param="input")
    total = 0
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ApiError(400, f"input[{i}] must be an object", param=f"input.{i}")
        total += 3 + content_tokens(item.get("content", item.get("output")), f"input[{i}]", f"input.{i}.content")
    return total


def parse_response(body: dict[str, Any], rng: random.Random, max_context_tokens: int,
                   shape: frozenset[str]) -> ResponseParams:
    prompt = _input_tokens(body.get("input"))
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        prompt += _text_tokens(instructions)
    limit = body.get("max_output_tokens")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ApiError(400, "'max_output_tokens' must be a positive integer", param="max_output_tokens")
    tokens = output_tokens(limit, rng)
    if prompt + tokens > max_context_tokens:
        raise ApiError(400, f"This model's maximum context length is {max_context_tokens} tokens",
                       param="input", code="context_length_exceeded")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "invalid type for 'stream'", param="stream")
    reasoning = tokens // 2 if "reasoning" in shape else 0
    return ResponseParams(prompt, tokens, reasoning, "tools" in shape, bool(stream), limit is not None)


def _words(start: int, stop: int) -> str:
    return "".join(WORDS[i % len(WORDS)] for i in range(start, stop))


class ResponsesStream:
    """The response object and, for streams, its events token by token."""

    def __init__(self, model: str, p: ResponseParams) -> None:
        self.p = p
        self.model = model
        self.id = f"resp_{uuid.uuid4().hex[:24]}"
        self.created_at = int(time.time())
        self.sent = 0
        self._seq = 0
        self._ids = {"reasoning": f"rs_{uuid.uuid4().hex[:16]}", "message": f"msg_{uuid.uuid4().hex[:16]}",
                     "function_call": f"fc_{uuid.uuid4().hex[:16]}"}

    # -- the response object ----------------------------------------------------------------

    def _item(self, kind: str, text: str, done: bool) -> dict[str, Any]:
        status = "completed" if done else "in_progress"
        if kind == "reasoning":
            return {"type": "reasoning", "id": self._ids[kind], "summary": [],
                    "content": [{"type": "reasoning_text", "text": text}], "status": status}
        if kind == "function_call":
            return {"type": "function_call", "id": self._ids[kind], "call_id": "call_sim0", "name": TOOL_NAME,
                    "arguments": text, "status": status}
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if done else []
        return {"type": "message", "id": self._ids[kind], "role": "assistant", "status": status, "content": content}

    def _kinds(self) -> list[tuple[str, int, int]]:
        """(item type, first token, end token) of each output item."""
        r, n = self.p.reasoning_tokens, self.p.completion_tokens
        main = "function_call" if self.p.tools else "message"
        return ([("reasoning", 0, r)] if r else []) + [(main, r, n)]

    def response(self, done: bool, produced: int | None = None) -> dict[str, Any]:
        """The `response` object: in progress (no output yet) or final with usage."""
        p = self.p
        out: dict[str, Any] = {
            "id": self.id, "object": "response", "created_at": self.created_at, "model": self.model,
            "status": "in_progress", "output": [], "usage": None, "error": None, "incomplete_details": None,
            "instructions": None, "metadata": {}, "parallel_tool_calls": True, "temperature": 1.0, "top_p": 1.0,
            "tool_choice": "auto", "tools": [], "text": {"format": {"type": "text"}},
        }
        if not done:
            return out
        produced = p.completion_tokens if produced is None else produced
        out["status"] = "incomplete" if p.incomplete else "completed"
        if p.incomplete:
            out["incomplete_details"] = {"reason": "max_output_tokens"}
        out["output"] = [self._item(kind, _words(a, min(b, produced)), True) for kind, a, b in self._kinds()
                         if a < produced or kind != "reasoning"]
        reasoning = min(p.reasoning_tokens, produced)
        out["usage"] = {"input_tokens": p.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                        "output_tokens": produced, "output_tokens_details": {"reasoning_tokens": reasoning},
                        "total_tokens": p.prompt_tokens + produced}
        return out

    # -- events -------------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = orjson.dumps({"type": kind, "sequence_number": self._seq, **fields})
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    def render(self, tokens: int, done: bool) -> bytes:
        """Events for the next `tokens` tokens (the opening ones first), and the close when `done`."""
        parts: list[bytes] = []
        if self._seq == 0:
            parts.append(self._event("response.created", response=self.response(False)))
            parts.append(self._event("response.in_progress", response=self.response(False)))
        items = self._kinds()
        for i in range(self.sent, self.sent + tokens):
            for index, (kind, a, b) in enumerate(items):
                if a <= i < b:
                    if i == a:
                        parts += self._open(index, kind)
                    parts.append(self._delta(index, kind, WORDS[i % len(WORDS)]))
                    if i == b - 1:
                        parts += self._close(index, kind, a, b)
        self.sent += tokens
        if done:
            status = "response.incomplete" if self.p.incomplete else "response.completed"
            parts.append(self._event(status, response=self.response(True, self.sent)))
        return b"".join(parts)

    def _open(self, index: int, kind: str) -> list[bytes]:
        out = [self._event("response.output_item.added", output_index=index, item=self._item(kind, "", False))]
        if kind == "message":
            out.append(self._event("response.content_part.added", item_id=self._ids[kind], output_index=index,
                                   content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
        return out

    def _delta(self, index: int, kind: str, word: str) -> bytes:
        item_id = self._ids[kind]
        if kind == "reasoning":
            return self._event("response.reasoning_text.delta", item_id=item_id, output_index=index,
                               content_index=0, delta=word)
        if kind == "function_call":
            return self._event("response.function_call_arguments.delta", item_id=item_id, output_index=index,
                               delta=word)
        return self._event("response.output_text.delta", item_id=item_id, output_index=index, content_index=0,
                           delta=word, logprobs=[])

    def _close(self, index: int, kind: str, a: int, b: int) -> list[bytes]:
        text, item_id = _words(a, b), self._ids[kind]
        out = []
        if kind == "reasoning":
            out.append(self._event("response.reasoning_text.done", item_id=item_id, output_index=index,
                                   content_index=0, text=text))
        elif kind == "function_call":
            out.append(self._event("response.function_call_arguments.done", item_id=item_id, output_index=index,
                                   name=TOOL_NAME, arguments=text))
        else:
            out.append(self._event("response.output_text.done", item_id=item_id, output_index=index,
                                   content_index=0, text=text, logprobs=[]))
            out.append(self._event("response.content_part.done", item_id=item_id, output_index=index,
                                   content_index=0, part={"type": "output_text", "text": text, "annotations": []}))
        out.append(self._event("response.output_item.done", output_index=index, item=self._item(kind, text, True)))
        return out

