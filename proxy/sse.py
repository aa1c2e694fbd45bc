"""Incremental server-sent-events handling for the streamed relay.

Bytes pass through untouched; only events that may carry `usage` are parsed. Event boundaries
are found incrementally: each fragment is searched once (plus the few bytes before it where a
boundary may straddle two fragments), and an unfinished event is kept as a list of fragments,
joined once when it completes, so a long event costs linear time. An unfinished event longer
than `max_event_bytes` ends the stream (`StreamTap.overflow`).

Generated tokens are counted from byte markers, never by parsing every chunk: in chat and
completion chunks one token per non-empty `content`, `text`, `reasoning_content`, `reasoning`,
`refusal` or tool-call `arguments` string (`reasoning` and `reasoning_content` in one delta, as
vLLM sends them, are one token); in Responses API events one per non-empty `delta`
string (`response.output_text.delta`, `response.reasoning_text.delta`,
`response.function_call_arguments.delta`, ...). `null` and `""` are no token.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from proxy.usage import Usage, answer_usage

_DONE = b"data: [DONE]"
_FIELDS = (b"content", b"text", b"reasoning_content", b"reasoning", b"refusal", b"arguments")


def _markers(fields: tuple[bytes, ...], sep: bytes, value: bytes) -> tuple[bytes, ...]:
    return tuple(b'"' + f + b'"' + sep + value for f in fields)


# A marker needs an unescaped quote before the field name, so text inside a JSON string (where
# quotes are escaped) never matches, and `"content":"` is not part of `"reasoning_content":"`.
_CHAT = _markers(_FIELDS, b":", b'"')
_CHAT_SPACED = _markers(_FIELDS, b": ", b'"')
_CHAT_EMPTY = _markers(_FIELDS, b":", b'""') + _markers(_FIELDS, b": ", b'""')
_RESP = _markers((b"delta",), b":", b'"') + _markers((b"delta",), b": ", b'"')
_RESP_EMPTY = _markers((b"delta",), b":", b'""') + _markers((b"delta",), b": ", b'""')
#: A Responses stream ends with one of these events (no `data: [DONE]`).
_RESP_FINAL = (b'"response.completed"', b'"response.failed"', b'"response.incomplete"')


def _has_usage(events: bytes) -> bool:
    """A `usage` object (not `null`) may be in `events`: only then is JSON parsed."""
    return b'"usage":{' in events or b'"usage": {' in events


def _chat_tokens_slow(complete: bytes) -> int:
    """Chat/completion tokens in events with spaced JSON or an empty string (no token): per
    field, the non-empty markers; the two reasoning fields count once, as in the fast path."""
    count = complete.count
    spaced = b'": "' in complete
    empty = b'""' in complete
    per_field = []
    for i in range(len(_FIELDS)):
        n = count(_CHAT[i]) + (count(_CHAT_SPACED[i]) if spaced else 0)
        if empty:
            n -= count(_CHAT_EMPTY[i]) + count(_CHAT_EMPTY[len(_FIELDS) + i])
        per_field.append(n)
    content, text, reasoning_content, reasoning, refusal, arguments = per_field
    return content + text + max(reasoning_content, reasoning) + refusal + arguments


class StreamOverflow(aiohttp.ClientPayloadError):
    """The upstream sent more than the limit without an event boundary: the stream is cut.

    An aiohttp payload error, so the relay ends the stream as it does for a broken upstream."""


class StreamTap:
    """Watches a relayed SSE stream: counts generated-token deltas, captures the usage.

    `feed` returns the bytes to forward now. Chat and completion streams: the usage chunk and
    `[DONE]` are held back (the caller appends the energy and sends them with `finish`), so no
    byte ever needs rewriting. Responses API streams (`responses=True`): every event is
    forwarded; the final `response.completed` / `.failed` / `.incomplete` event gives the usage
    and marks the stream complete, and `finish` adds the energy as an `: energy` comment.
    """

    __slots__ = ("_parts", "_size", "_last", "_sep", "_responses", "_max_event_bytes", "delta_chunks", "usage",
                 "usage_event", "done", "_done_line", "first_token_seen", "overflow", "final")

    def __init__(self, responses: bool = False, max_event_bytes: int = 1 << 20) -> None:
        self._parts: list[bytes] = []  # the unfinished event's fragments
        self._size = 0
        self._last = b""  # the unfinished event's last 3 bytes
        self._sep: bytes | None = None
        self._responses = responses
        self._max_event_bytes = max_event_bytes
        self.delta_chunks = 0
        self.usage: Usage | None = None
        self.usage_event: dict[str, Any] | None = None
        self.done = False
        self._done_line = False
        self.first_token_seen = False
        self.overflow = False
        self.final: dict[str, Any] | None = None  # a Responses stream's final event, decoded

    def feed(self, chunk: bytes) -> bytes:
        """Account for `chunk` and return what can be forwarded now (maybe b"").

        Raises StreamOverflow once the unfinished event exceeds `max_event_bytes`."""
        if not chunk:
            return b""
        # A boundary may begin in the last 3 bytes already held: search from there.
        if self._parts:
            last = self._last
            window = last + chunk
            offset = self._size - len(last)
        else:
            window, offset = chunk, 0
        if self._sep is None:
            lf, crlf = window.find(b"\n\n"), window.find(b"\r\n\r\n")
            if crlf >= 0 and (lf < 0 or crlf < lf):
                self._sep = b"\r\n\r\n"
            elif lf >= 0:
                self._sep = b"\n\n"
        end = window.rfind(self._sep) if self._sep is not None else -1
        if end < 0:
            self._parts.append(chunk)
            self._size += len(chunk)
            self._last = window[-3:]
            if self._size > self._max_event_bytes:
                self.overflow = True
                raise StreamOverflow(f"an SSE event exceeded {self._max_event_bytes} bytes")
            return b""
        assert self._sep is not None
        end += offset + len(self._sep) - self._size  # the boundary's end within `chunk`
        if self._parts:
            complete = b"".join([*self._parts, chunk[:end]])  # each byte copied once
        else:
            complete = chunk[:end]
        rest = chunk[end:]
        self._parts = [rest] if rest else []
        self._size = len(rest)
        self._last = rest[-3:]
        self._count(complete)
        if self._responses:
            if any(m in complete for m in _RESP_FINAL):
                self._final_event(complete)
            if b"[DONE]" not in complete:
                return complete
        elif (b'"usage"' not in complete or not _has_usage(complete)) and b"[DONE]" not in complete:
            return complete  # OpenAI-style `"usage":null` on every chunk: nothing to parse
        out = self._hold_back(complete)
        if self._size > self._max_event_bytes:
            self.overflow = True
            raise StreamOverflow(f"an SSE event exceeded {self._max_event_bytes} bytes")
        return out

    def _count(self, complete: bytes) -> None:
        """Add the generated-token deltas in whole events `complete`."""
        count = complete.count
        if self._responses:
            tokens = count(_RESP[0]) + count(_RESP[1])
            if tokens and b'""' in complete:
                tokens -= count(_RESP_EMPTY[0]) + count(_RESP_EMPTY[1])
        elif b'": "' in complete or b'""' in complete:
            tokens = _chat_tokens_slow(complete)
        else:
            # Unrolled: this runs for every chunk of every stream. vLLM sends the same text as
            # both `reasoning` and `reasoning_content` in one delta: that is one token, not two.
            content, text, reasoning_content, reasoning, refusal, arguments = _CHAT
            tokens = (count(content) + count(text) + max(count(reasoning_content), count(reasoning))
                      + count(refusal) + count(arguments))
        if tokens > 0:
            self.delta_chunks += tokens
            self.first_token_seen = True

    def _final_event(self, complete: bytes) -> None:
        """A Responses stream's last event: its `response.usage`; the stream is complete."""
        assert self._sep is not None
        for event in complete.split(self._sep):
            if not any(m in event for m in _RESP_FINAL):
                continue
            for line in event.splitlines():
                if not line.startswith(b"data:"):
                    continue
                try:
                    obj = orjson.loads(line[5:])
                except orjson.JSONDecodeError:
                    continue
                if isinstance(obj, dict) and obj.get("type") in (
                        "response.completed", "response.failed", "response.incomplete"):
                    self.done = True
                    self.final = obj
                    self.usage = answer_usage(obj) or self.usage

    def _hold_back(self, complete: bytes) -> bytes:
        """Split out the usage chunk and [DONE]; forward every other event."""
        assert self._sep is not None
        out: list[bytes] = []
        for event in complete.split(self._sep):
            if not event:
                continue
            if event.startswith(b"data:") and event[5:].strip() == b"[DONE]":
                self.done = self._done_line = True
                continue
            if not self._responses and _has_usage(event) and event.startswith(b"data:"):
                try:
                    obj = orjson.loads(event[5:])
                except orjson.JSONDecodeError:
                    obj = None
                if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                    if not obj.get("choices"):
                        self.usage_event = obj
                    self.usage = answer_usage(obj)
                    if self.usage_event is obj:
                        continue
            out.append(event + self._sep)
        return b"".join(out)

    def finish(self, energy: dict[str, Any] | None, client_wants_usage: bool) -> bytes:
        """The closing bytes: the usage chunk (with energy) or an `: energy` comment, then [DONE]
        if the upstream sent one."""
        sep = self._sep or b"\n\n"
        out = b""
        if self.usage_event is not None and client_wants_usage:
            if energy is not None:
                self.usage_event["usage"]["energy"] = energy
            out += b"data: " + orjson.dumps(self.usage_event) + sep
        elif energy is not None:
            out += b": energy " + orjson.dumps(energy) + sep
        if self._done_line:
            out += _DONE + sep
        return out

    @property
    def pending(self) -> bytes:
        """An unfinished event left when the upstream closed."""
        return b"".join(self._parts)
