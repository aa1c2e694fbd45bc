"""Misbehaving backends on real sockets: hung, garbage-speaking and stream-cutting servers.

Each `FaultServer` is a tiny HTTP/1.1 server (asyncio.start_server on 127.0.0.1, a free port)
running its own event loop in a daemon thread. It answers `GET /v1/models` and `GET /health`
properly, so the proxy's health checks and model discovery (proxy/backends.py) find it up and
serving MODEL; every POST gets the fault named by `mode`:

- `hang`: read the request, never answer, keep the connection open (a wedged engine);
- `not_http`: random bytes that are no HTTP response, then close;
- `not_json`: `200 application/json` with a body that is not JSON;
- `sse_garbage`: SSE headers, one good chunk, then binary junk with no event boundary, then close;
- `cut_chunked`: SSE headers (chunked), CUT_EVENTS complete chunks, half an event, then close
  in the middle of an HTTP chunk;
- `cut_eof`: the same without chunked encoding (`Connection: close`): the body simply stops;
- `flood`: a stream of FLOOD_EVENTS events of FLOOD_EVENT_BYTES each, written as fast as it is
  read; `flood_sent` counts the events written, `flood_ended` says how it ended;
- `slow_stream`: SLOW_EVENTS one-token chunks SLOW_GAP_S apart, then usage and [DONE] (a healthy
  stream that takes a while);
- `stall_stream`: CUT_EVENTS chunks, then silence with the connection open (a wedged stream);
- `stale_keepalive`: the first POST on a connection gets a proper answer (keep-alive); any later
  one on it is read and the connection closed unanswered, as when an engine closes an idle
  connection just as the proxy reuses it;
- `big_json`: a non-streamed chat completion of about BIG_JSON_BYTES, with usage.

`closed_s` has the time.monotonic() at which each POST's connection was seen closed by the
proxy (`hang`, `slow_stream`, `stall_stream`): the test process shares that clock.

`RestartableSim` is a simulated backend that can be SIGKILLed and started again on its port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time

import httpx
import orjson

from tests.conftest import MODEL, Proc, SimBackend, free_port, wait_until

MODES = ("hang", "not_http", "not_json", "sse_garbage", "cut_chunked", "cut_eof", "flood", "slow_stream",
         "stall_stream", "stale_keepalive", "big_json")
#: Complete chat chunks a cutting server sends before it breaks off, one token each.
CUT_EVENTS = 3
FLOOD_EVENT_BYTES = 16 * 1024
FLOOD_EVENTS = 2000  # 32 MiB if it were all read: far more than any socket buffer
SLOW_EVENTS = 30
SLOW_GAP_S = 0.1
BIG_JSON_BYTES = 24 * 1024 * 1024  # far more than the socket buffers between proxy and client


def chat_chunk(i: int) -> bytes:
    """The i-th streamed chat chunk (one token), as one complete SSE event."""
    delta = {"role": "assistant", "content": f"w{i} "} if i == 0 else {"content": f"w{i} "}
    obj = {"id": "chatcmpl-fault", "object": "chat.completion.chunk", "created": 1718000000, "model": MODEL,
           "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}
    return b"data: " + orjson.dumps(obj) + b"\n\n"


#: What a cutting server sends last: one more event up to just past its token (never relayed).
HALF_EVENT = chat_chunk(CUT_EVENTS)[:chat_chunk(CUT_EVENTS).index(b'"logprobs"')]


class FaultServer:
    """A backend at `url` (no /v1) that fails every POST in the way `mode` says."""

    def __init__(self, mode: str) -> None:
        assert mode in MODES, mode
        self.mode = mode
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.posts = 0  # inference requests received; read from the test thread (an int: atomic)
        self.flood_sent = 0  # `flood`: events written so far
        self.flood_ended: str | None = None  # `flood`: "complete", or the error that ended it
        self.closed_s: list[float] = []  # time.monotonic() when the proxy closed a POST's connection
        self.answered = 0  # `stale_keepalive`: POSTs answered
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True, name=f"fault-{mode}")
        self._thread.start()
        assert ready.wait(10), f"fault server {mode} did not start"

    def _run(self, ready: threading.Event) -> None:
        async def start() -> None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
            ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    def stop(self) -> None:
        """Close the listener and every open connection (hung ones included), end the thread."""
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.close()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # -- HTTP/1.1, just enough -------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        posts_here = 0  # POSTs on this connection
        try:
            while True:  # keep-alive: the proxy's pools reuse connections
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                await reader.readexactly(int(headers.get("content-length", "0")))
                if method == "GET" and path in ("/v1/models", "/health"):
                    body = orjson.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]})
                    writer.write(_head(200, "application/json", len(body)) + body)
                    await writer.drain()
                    continue
                if method != "POST":
                    writer.write(_head(404, "application/json", 2) + b"{}")
                    await writer.drain()
                    continue
                self.posts += 1
                posts_here += 1
                if self.mode == "stale_keepalive":
                    if posts_here > 1:
                        return  # closed while "idle": the request is read and never answered
                    body = _completion(b"fresh", 1)
                    writer.write(_head(200, "application/json", len(body)) + body)
                    await writer.drain()
                    self.answered += 1
                    continue
                if not await self._fault(reader, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            return
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    async def _fault(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Misbehave on one POST; True if the connection may serve another request."""
        if self.mode == "hang":
            await reader.read()  # until the proxy gives up and closes (or stop())
            self.closed_s.append(time.monotonic())
            return False
        if self.mode in ("slow_stream", "stall_stream"):
            await self._slow(reader, writer)
            return False
        if self.mode == "big_json":
            body = _completion(b"x" * BIG_JSON_BYTES, 7)
            writer.write(_head(200, "application/json", len(body)) + body)
            await writer.drain()
            return True
        if self.mode == "not_http":
            writer.write(os.urandom(512))
        elif self.mode == "not_json":
            body = b"<html><body>502 Bad Gateway, but said with a 200</body></html>"
            writer.write(_head(200, "application/json", len(body)) + body)
            await writer.drain()
            return True
        elif self.mode == "sse_garbage":
            junk = os.urandom(256).replace(b"\n", b"?")  # no event boundary in it
            writer.write(_head(200, "text/event-stream", None, chunked=True)
                         + _chunk(chat_chunk(0)) + _chunk(junk))
        elif self.mode == "cut_chunked":
            events = b"".join(chat_chunk(i) for i in range(CUT_EVENTS))
            # The HTTP chunk announces the whole next event but only half of it arrives.
            whole = chat_chunk(CUT_EVENTS)
            writer.write(_head(200, "text/event-stream", None, chunked=True) + _chunk(events)
                         + f"{len(whole):x}\r\n".encode() + HALF_EVENT)
        elif self.mode == "cut_eof":
            events = b"".join(chat_chunk(i) for i in range(CUT_EVENTS))
            writer.write(_head(200, "text/event-stream", None) + events + HALF_EVENT)
        elif self.mode == "flood":
            await self._flood(writer)
            return False
        await writer.drain()
        return False  # close: the fault is the connection ending here

    async def _flood(self, writer: asyncio.StreamWriter) -> None:
        """Stream FLOOD_EVENTS big events, each once the previous one left the buffer."""
        delta = {"choices": [{"index": 0, "delta": {"content": "x" * FLOOD_EVENT_BYTES}}]}
        event = _chunk(b"data: " + orjson.dumps(delta) + b"\n\n")
        writer.write(_head(200, "text/event-stream", None, chunked=True))
        try:
            for _ in range(FLOOD_EVENTS):
                writer.write(event)
                await writer.drain()  # as fast as the proxy reads, no faster
                self.flood_sent += 1
            writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
            self.flood_ended = "complete"
        except ConnectionError as exc:
            self.flood_ended = type(exc).__name__


    async def _slow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """`slow_stream` / `stall_stream`: chunks with gaps, watching for the proxy to hang up."""
        events = SLOW_EVENTS if self.mode == "slow_stream" else CUT_EVENTS
        writer.write(_head(200, "text/event-stream", None, chunked=True))
        for i in range(events):
            writer.write(_chunk(chat_chunk(i)))
            await writer.drain()
            if await _hung_up(reader, SLOW_GAP_S):
                self.closed_s.append(time.monotonic())
                return
        if self.mode == "stall_stream":
            await reader.read()
            self.closed_s.append(time.monotonic())
            return
        usage = {"id": "chatcmpl-fault", "object": "chat.completion.chunk", "model": MODEL, "choices": [],
                 "usage": {"prompt_tokens": 9, "completion_tokens": events, "total_tokens": 9 + events}}
        writer.write(_chunk(b"data: " + orjson.dumps(usage) + b"\n\n") + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()


async def _hung_up(reader: asyncio.StreamReader, wait_s: float) -> bool:
    """Wait up to `wait_s` for the peer to close; True if it did (it sends nothing else)."""
    try:
        return await asyncio.wait_for(reader.read(1), wait_s) == b""
    except TimeoutError:
        return False


def _completion(content: bytes, completion_tokens: int) -> bytes:
    """A non-streamed chat completion whose message is `content`."""
    return (b'{"id":"chatcmpl-fault","object":"chat.completion","created":1718000000,"model":"' + MODEL.encode()
            + b'","choices":[{"index":0,"message":{"role":"assistant","content":"' + content
            + b'"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":'
            + str(completion_tokens).encode() + b',"total_tokens":' + str(9 + completion_tokens).encode() + b"}}")


def _head(status: int, content_type: str, length: int | None, chunked: bool = False) -> bytes:
    """A response head; without a length or chunking the body runs until the connection closes."""
    lines = [f"HTTP/1.1 {status} {'OK' if status == 200 else 'Not Found'}", f"Content-Type: {content_type}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    elif chunked:
        lines.append("Transfer-Encoding: chunked")
    else:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class RestartableSim(SimBackend):
    """A `joulegate sim-backend` that can be started again on the same port after a kill."""

    def restart(self) -> None:
        """Run the same simulator again (a new process: its energy counter starts from zero)."""
        assert self.popen.poll() is not None, "restart() is for a simulator that is gone"
        self._log.close()
        args = list(self.popen.args)[3:]  # [python, -m, proxy, *args]
        Proc.__init__(self, args, self.log_path.with_suffix(".restarted.log"), self.name)

        def answers() -> bool:
            try:
                return httpx.get(f"{self.url}/v1/models", timeout=1).status_code == 200
            except httpx.HTTPError:
                return self.popen.poll() is not None

        wait_until(answers, 30, f"{self.profile} simulator to answer again")
        assert self.popen.poll() is None, self.log()

    def running(self) -> int:
        """Requests in its running batch now (`vllm:num_requests_running` on its /metrics)."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        line = next(ln for ln in text.splitlines() if ln.startswith("vllm:num_requests_running"))
        return int(float(line.rsplit(" ", 1)[1]))
