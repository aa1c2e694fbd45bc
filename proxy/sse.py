"""Incremental server-sent-events handling for the streamed relay.

Bytes pass through untouched; only events that may carry `usage` are parsed. Event boundaries
are found incrementally: each fragment is searched once, the tail of an unfinished event is kept.
"""

from __future__ import annotations

import orjson

_DONE = b"data: [DONE]"
_EMPTY_MARKERS = (b'"content":""', b'"content": ""', b'"text":""', b'"text": ""')
_CONTENT_MARKERS = (b'"content":"', b'"content": "', b'"text":"', b'"text": "')


class StreamTap:
    """Watches a relayed SSE stream: counts generated-token deltas, captures the usage chunk.

    `feed` returns the bytes to forward now. The usage chunk and `[DONE]` are held back (the
    caller appends the energy and sends them with `finish`), so no byte ever needs rewriting.
    """

    __slots__ = ("_tail", "_sep", "delta_chunks", "usage", "usage_event", "done", "first_token_seen")

    def __init__(self) -> None:
        self._tail = b""
        self._sep: bytes | None = None
        self.delta_chunks = 0
        self.usage: dict | None = None
        self.usage_event: dict | None = None
        self.done = False
        self.first_token_seen = False

    def feed(self, chunk: bytes) -> bytes:
        """Account for `chunk` and return what can be forwarded now (maybe b"")."""
        if self._tail:
            chunk = self._tail + chunk
        if self._sep is None:
            lf, crlf = chunk.find(b"\n\n"), chunk.find(b"\r\n\r\n")
            if crlf >= 0 and (lf < 0 or crlf < lf):
                self._sep = b"\r\n\r\n"
            elif lf >= 0:
                self._sep = b"\n\n"
            else:
                self._tail = chunk
                return b""
        end = chunk.rfind(self._sep)
        if end < 0:
            self._tail = chunk
            return b""
        end += len(self._sep)
        complete, self._tail = chunk[:end], chunk[end:]
        tokens = 0
        for marker in _CONTENT_MARKERS:
            tokens += complete.count(marker)
        # An empty string delta is no token.
        tokens -= sum(complete.count(m) for m in _EMPTY_MARKERS)
        if tokens > 0:
            self.delta_chunks += tokens
            self.first_token_seen = True
        if b'"usage"' not in complete and b"[DONE]" not in complete:
            return complete
        return self._hold_back(complete)

    def _hold_back(self, complete: bytes) -> bytes:
        """Split out the usage chunk and [DONE]; forward every other event."""
        out: list[bytes] = []
        for event in complete.split(self._sep):
            if not event:
                continue
            if event.startswith(b"data:") and event[5:].strip() == b"[DONE]":
                self.done = True
                continue
            if b'"usage"' in event and event.startswith(b"data:"):
                try:
                    obj = orjson.loads(event[5:])
                except orjson.JSONDecodeError:
                    obj = None
                if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                    if not obj.get("choices"):
                        self.usage_event = obj
                    self.usage = obj["usage"]
                    if self.usage_event is obj:
                        continue
            out.append(event + self._sep)
        return b"".join(out)

    def finish(self, energy: dict | None, client_wants_usage: bool) -> bytes:
        """The closing bytes: the usage chunk (with energy) or an `: energy` comment, then [DONE]."""
        sep = self._sep or b"\n\n"
        out = b""
        if self.usage_event is not None and client_wants_usage:
            if energy is not None:
                self.usage_event["usage"]["energy"] = energy
            out += b"data: " + orjson.dumps(self.usage_event) + sep
        elif energy is not None:
            out += b": energy " + orjson.dumps(energy) + sep
        if self.done:
            out += _DONE + sep
        return out

    @property
    def pending(self) -> bytes:
        """An unfinished event left when the upstream closed."""
        return self._tail
