"""Minimal, fast mock of an OpenAI-compatible backend for the data-plane benchmark.

Raw asyncio (``asyncio.Protocol``) with hand-rolled HTTP/1.1 keep-alive parsing, so the mock
costs a few microseconds per request and never becomes the bottleneck (the reference figures
put such a mock at ~50k req/s on one core). All response bytes are prebuilt at import time.

Routes:
- ``POST /v1/chat/completions``: non-streamed -> a fixed chat completion with
  ``COMPLETION_TOKENS`` completion tokens and usage; ``"stream": true`` -> ``STREAM_TOKENS`` SSE
  chunks (one token each, chunked transfer encoding), then a ``choices: []`` usage chunk when
  ``stream_options.include_usage`` is true, then ``data: [DONE]``.
- ``GET /v1/models``: lists ``mock-model``.

Run: ``python -m bench.mock_backend --port 9000``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket

MODEL = "mock-model"
PROMPT_TOKENS = 12
COMPLETION_TOKENS = 16
STREAM_TOKENS = 64
CREATED_S = 1700000000

_HEAD_OK_JSON = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
_HEAD_OK_SSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _json_response(status_line: bytes, body: bytes) -> bytes:
    head = status_line + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    return head % len(body) + body


def _http_chunk(payload: bytes) -> bytes:
    """Wrap one payload as one HTTP/1.1 chunk (chunked transfer encoding)."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _usage(completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": completion_tokens,
        "total_tokens": PROMPT_TOKENS + completion_tokens,
    }


def _build() -> dict[str, bytes | list[bytes]]:
    """Prebuild every response so the hot path only writes bytes."""
    completion = {
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": CREATED_S,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": " tok" * COMPLETION_TOKENS},
                "finish_reason": "length",
            }
        ],
        "usage": _usage(COMPLETION_TOKENS),
    }
    chunks: list[bytes] = []
    for i in range(STREAM_TOKENS):
        last = i == STREAM_TOKENS - 1
        delta: dict[str, str] = {"content": " tok"}
        if i == 0:
            delta = {"role": "assistant", "content": " tok"}
        event = {
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": CREATED_S,
            "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": "length" if last else None}],
        }
        chunks.append(_http_chunk(b"data: " + _dumps(event) + b"\n\n"))
    usage_event = {
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": CREATED_S,
        "model": MODEL,
        "choices": [],
        "usage": _usage(STREAM_TOKENS),
    }
    models = {
        "object": "list",
        "data": [{"id": MODEL, "object": "model", "created": CREATED_S, "owned_by": "bench"}],
    }
    not_found = {
        "error": {
            "message": "not found",
            "type": "invalid_request_error",
            "param": None,
            "code": "not_found",
        }
    }
    return {
        "completion": _json_response(b"HTTP/1.1 200 OK", _dumps(completion)),
        "models": _json_response(b"HTTP/1.1 200 OK", _dumps(models)),
        "not_found": _json_response(b"HTTP/1.1 404 Not Found", _dumps(not_found)),
        "traces_ok": _json_response(b"HTTP/1.1 200 OK", b"{}"),
        "stream_chunks": chunks,
        "stream_usage": _http_chunk(b"data: " + _dumps(usage_event) + b"\n\n"),
        "stream_done": _http_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n",
    }


_R = _build()
RESP_COMPLETION: bytes = _R["completion"]  # type: ignore[assignment]
RESP_MODELS: bytes = _R["models"]  # type: ignore[assignment]
RESP_NOT_FOUND: bytes = _R["not_found"]  # type: ignore[assignment]
RESP_TRACES_OK: bytes = _R["traces_ok"]  # type: ignore[assignment]
STREAM_CHUNKS: list[bytes] = _R["stream_chunks"]  # type: ignore[assignment]
STREAM_USAGE: bytes = _R["stream_usage"]  # type: ignore[assignment]
STREAM_DONE: bytes = _R["stream_done"]  # type: ignore[assignment]


def _stream_flags(body: bytes) -> tuple[bool, bool]:
    """Return (stream, include_usage) for a request body; parse JSON only if it may stream."""
    if b'"stream"' not in body:  # keys are always quoted, whatever the client's serializer
        return False, False
    try:
        obj = json.loads(body)
    except ValueError:
        return False, False
    if not isinstance(obj, dict) or obj.get("stream") is not True:
        return False, False
    opts = obj.get("stream_options")
    return True, isinstance(opts, dict) and opts.get("include_usage") is True


class MockProtocol(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection; pipelined requests are answered in order."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.streaming = False  # a streamed response is in flight; later requests wait for it
        self.close_after_stream = False
        self.stream_usage = False
        self.stream_next = 0  # index of the next SSE event to send

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Nagle would hold back the small per-token writes behind unacked ones.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._process()

    def _process(self) -> None:
        while not self.streaming and self.transport is not None:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            lines = bytes(self.buf[:head_end]).split(b"\r\n")
            parts = lines[0].split(b" ")
            if len(parts) != 3:
                self.transport.close()
                return
            method, target, version = parts
            content_length = 0
            chunked = False
            close = version == b"HTTP/1.0"
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    content_length = int(value)
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                elif name == b"connection":
                    close = value.strip().lower() == b"close"
            start = head_end + 4
            if chunked:
                decoded = _decode_chunked(self.buf, start)
                if decoded is None:
                    return  # body incomplete; wait for more bytes
                body, end = decoded
            else:
                end = start + content_length
                if len(self.buf) < end:
                    return
                body = bytes(self.buf[start:end])
            del self.buf[:end]
            self._dispatch(method, target, body)
            if close:
                if self.streaming:
                    self.close_after_stream = True
                    return
                self.transport.close()
                return

    def _dispatch(self, method: bytes, target: bytes, body: bytes) -> None:
        assert self.transport is not None
        path = target.split(b"?", 1)[0]
        if method == b"POST" and path == b"/v1/chat/completions":
            stream, include_usage = _stream_flags(body)
            if not stream:
                self.transport.write(RESP_COMPLETION)
                return
            self._start_stream(include_usage)
        elif method == b"GET" and path == b"/v1/models":
            self.transport.write(RESP_MODELS)
        elif method == b"POST" and path == b"/v1/traces":  # an OTLP/HTTP sink (bench.overhead --otel)
            self.transport.write(RESP_TRACES_OK)
        else:
            self.transport.write(RESP_NOT_FOUND)

    def _start_stream(self, include_usage: bool) -> None:
        """Send the headers now and one SSE event per event-loop turn after that.

        One write per turn makes every token leave as its own TCP segment, as from a real
        engine that emits one token per decode step (and interleaves concurrent streams); one
        big write would let a proxy relay 64 events per read and hide its per-chunk cost.
        Callbacks instead of a task per stream keep the mock's own cost per token small.
        """
        assert self.transport is not None
        self.streaming = True
        self.stream_usage = include_usage
        self.stream_next = 0
        self.transport.write(_HEAD_OK_SSE)
        asyncio.get_running_loop().call_soon(self._stream_step)

    def _stream_step(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        i = self.stream_next
        if i < len(STREAM_CHUNKS):
            t.write(STREAM_CHUNKS[i])
            self.stream_next = i + 1
            asyncio.get_running_loop().call_soon(self._stream_step)
            return
        t.write(STREAM_USAGE + STREAM_DONE if self.stream_usage else STREAM_DONE)
        self.streaming = False
        if self.close_after_stream:
            t.close()
            return
        if self.buf:
            self._process()  # pipelined requests that arrived during the stream


def _decode_chunked(buf: bytearray, pos: int) -> tuple[bytes, int] | None:
    """Decode a chunked request body starting at ``pos``; None if not all bytes are here."""
    out = bytearray()
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size = int(bytes(buf[pos:line_end]).split(b";", 1)[0], 16)
        pos = line_end + 2
        if size == 0:
            trailer_end = buf.find(b"\r\n\r\n", pos - 2)
            if trailer_end < 0:
                return None
            return bytes(out), trailer_end + 4
        if len(buf) < pos + size + 2:
            return None
        out += buf[pos : pos + size]
        pos += size + 2


async def serve(host: str, port: int) -> None:
    """Serve until cancelled."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(MockProtocol, host, port, reuse_address=True, backlog=1024)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Fast mock OpenAI backend (benchmark only).")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000)
    args = ap.parse_args(argv)
    try:
        import uvloop
    except ImportError:  # plain asyncio still works, just slower
        uvloop = None
    try:
        if uvloop is not None:
            uvloop.run(serve(args.host, args.port))
        else:
            asyncio.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
