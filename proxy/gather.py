"""A non-streamed chat, completion or Responses API answer, gathered from the engine's stream.

Where a backend streams upstream (`backends[].stream_upstream`), the proxy asks the engine to
stream what the client asked for whole. It then sees when each token was made, so the energy
split places that request's prefill and decode steps as exactly as a stream's, instead of
guessing them from when the answer arrived. The client still gets the one JSON answer it asked
for, built here from the chunks: the fields a whole answer has, in the engine's own words. A
Responses API stream ends with the whole `response` object: that is the answer.

Requests whose whole answer carries what a stream cannot (vLLM's `prompt_logprobs`, `best_of`,
beam search) and requests that already name `stream_options` go upstream as sent.
"""

from __future__ import annotations

from typing import Any

import orjson

#: Request fields whose whole answer a stream cannot give (or that engines refuse to stream).
_WHOLE_ONLY = ("best_of", "prompt_logprobs", "use_beam_search", "stream_options")
#: Per-choice chunk fields that are not merged text: the last non-null value of each is kept.
_CHOICE_MERGED = ("index", "delta", "text", "logprobs", "finish_reason")
_TEXT_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")
_TEXT_LOGPROBS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


def gatherable(payload: dict[str, Any], kind: str) -> bool:
    """Whether a request may go upstream as a stream and be gathered for its client."""
    if kind not in ("chat", "completion", "response") or payload.get("stream"):
        return False
    for name in _WHOLE_ONLY:
        value = payload.get(name)
        if not (value is None or value is False or (name == "best_of" and value == 1)):
            return False
    return True


def streamed_body(payload: dict[str, Any], kind: str) -> bytes:
    """The request as sent upstream: streamed, with the usage chunk asked for (a Responses
    stream's final event always carries it)."""
    if kind == "response":
        return orjson.dumps({**payload, "stream": True})
    return orjson.dumps({**payload, "stream": True, "stream_options": {"include_usage": True}})


def final_response(event: dict[str, Any]) -> tuple[int, bytes]:
    """A Responses stream's final event as the whole answer: the `response` object it carries
    (completed or incomplete); a failed one as the engine's error."""
    response = event.get("response")
    if not isinstance(response, dict):
        return 502, orjson.dumps({"error": {"message": "The backend's final event held no response.",
                                            "type": "upstream_error", "param": None, "code": "upstream_error"}})
    if event.get("type") == "response.failed":
        found = response.get("error")
        error: dict[str, Any] = found if isinstance(found, dict) else {}
        return 502, orjson.dumps({"error": {"message": error.get("message", "The backend failed the response."),
                                            "type": "upstream_error", "param": None,
                                            "code": error.get("code", "upstream_error")}})
    return 200, orjson.dumps(response)


class _Choice:
    """One choice's pieces so far."""

    __slots__ = ("index", "role", "texts", "calls", "logprobs", "finish_reason", "extra")

    def __init__(self, index: int) -> None:
        self.index = index
        self.role = "assistant"
        self.texts: dict[str, list[str]] = {}  # content, reasoning_content, ... or `text`
        self.calls: dict[int, dict[str, Any]] = {}  # tool calls by their index
        self.logprobs: dict[str, list[Any]] | None = None
        self.finish_reason: str | None = None
        self.extra: dict[str, Any] = {}  # e.g. vLLM's `stop_reason`

    def add(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            self._add_delta(delta)
        text = choice.get("text")
        if isinstance(text, str):
            self.texts.setdefault("text", []).append(text)
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict):
            if self.logprobs is None:
                self.logprobs = {}
            for name, value in logprobs.items():
                if isinstance(value, list):
                    self.logprobs.setdefault(name, []).extend(value)
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]
        for name, value in choice.items():
            if name not in _CHOICE_MERGED and value is not None:
                self.extra[name] = value

    def _add_delta(self, delta: dict[str, Any]) -> None:
        if isinstance(delta.get("role"), str):
            self.role = delta["role"]
        for name in _TEXT_FIELDS:
            value = delta.get(name)
            if isinstance(value, str):
                self.texts.setdefault(name, []).append(value)
        for call in delta.get("tool_calls") or ():
            if not isinstance(call, dict):
                continue
            slot = self.calls.setdefault(call.get("index", len(self.calls)),
                                         {"id": None, "type": "function", "name": [], "arguments": []})
            if call.get("id"):
                slot["id"] = call["id"]
            if call.get("type"):
                slot["type"] = call["type"]
            function = call.get("function")
            if isinstance(function, dict):
                # Pieces are joined, as the SDKs accumulate them: engines send a name once.
                if isinstance(function.get("name"), str):
                    slot["name"].append(function["name"])
                if isinstance(function.get("arguments"), str):
                    slot["arguments"].append(function["arguments"])

    def whole(self, chat: bool) -> dict[str, Any]:
        """The choice as a non-streamed answer has it."""
        out: dict[str, Any] = {"index": self.index}
        if chat:
            texts = {name: "".join(parts) for name, parts in self.texts.items()}
            message: dict[str, Any] = {"role": self.role, "content": texts.pop("content", None)}
            if message["content"] is None and not self.calls and "refusal" not in texts:
                message["content"] = ""  # an answer of no tokens
            message["refusal"] = texts.pop("refusal", None)
            message.update(texts)  # reasoning_content / reasoning, where the engine sent them
            if self.calls:
                message["tool_calls"] = [
                    {"id": c["id"], "type": c["type"],
                     "function": {"name": "".join(c["name"]), "arguments": "".join(c["arguments"])}}
                    for _, c in sorted(self.calls.items())
                ]
            out["message"] = message
        else:
            out["text"] = "".join(self.texts.get("text", ()))
        out["logprobs"] = self.logprobs
        out["finish_reason"] = self.finish_reason
        out.update(self.extra)
        return out


class Gatherer:
    """Builds the whole answer from a chat or completion stream's events, fed as SSE bytes."""

    __slots__ = ("chat", "head", "choices", "usage", "error")

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.head: dict[str, Any] | None = None  # the first chunk's id, created, model, ...
        self.choices: dict[int, _Choice] = {}
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None  # an error event the engine sent mid-stream

    def feed(self, events: bytes) -> None:
        """Merge whole SSE events (as StreamTap forwards them)."""
        for line in events.splitlines():
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, `event:` lines
            data = line[5:].strip()
            if data == b"[DONE]":
                continue
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                self.add(obj)

    def add(self, chunk: dict[str, Any]) -> None:
        """Merge one decoded chunk."""
        if "choices" not in chunk and ("error" in chunk or chunk.get("object") == "error"):
            error = chunk.get("error", chunk)
            self.error = error if isinstance(error, dict) else {"message": str(error)}
            return
        if self.head is None:
            self.head = {k: v for k, v in chunk.items() if k not in ("choices", "usage", "object")}
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict):
                index = choice.get("index", 0)
                mine = self.choices.get(index)
                if mine is None:
                    mine = self.choices[index] = _Choice(index)
                mine.add(choice)

    def answer(self) -> tuple[int, bytes]:
        """The HTTP status and JSON body for the client: the whole answer, or the engine's error."""
        if self.error is not None:
            code = self.error.get("code")
            status = code if isinstance(code, int) and 400 <= code < 600 else 502
            error = {"message": self.error.get("message", "The backend reported an error mid-answer."),
                     "type": self.error.get("type", "upstream_error"), "param": self.error.get("param"),
                     "code": code}
            return status, orjson.dumps({"error": error})
        head = self.head or {}
        whole: dict[str, Any] = {
            "id": head.get("id"), "object": "chat.completion" if self.chat else "text_completion",
            "created": head.get("created"), "model": head.get("model"),
            "choices": [c.whole(self.chat) for _, c in sorted(self.choices.items())],
        }
        if self.usage is not None:
            whole["usage"] = self.usage
        for name, value in head.items():
            if name not in whole:
                whole[name] = value  # system_fingerprint, service_tier, ...
        return 200, orjson.dumps(whole)
