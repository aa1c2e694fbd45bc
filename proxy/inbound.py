"""What the relay reads from a client before any backend sees the request: the headers it
needs, the body (bounded), what the proxy relies on in it (validated: 400 otherwise), the
`model` of a multipart form, and the client leaving.

Raw ASGI, like the relay: no request objects.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from proxy.errors import ProxyError, bad_request
from proxy.records import RequestRecord
from proxy.usage import estimate_prompt_tokens

Receive = Callable[[], Awaitable[dict[str, Any]]]

#: (kind, field that must be present, its accepted types) per inference route.
_REQUIRED: dict[str, tuple[str, tuple[type, ...]]] = {
    "chat": ("messages", (list,)),
    "completion": ("prompt", (str, list)),
    "embedding": ("input", (str, list)),
    "response": ("input", (str, list)),
}


class ClientGone(Exception):
    """The client disconnected before it could be answered."""


#: A request still with its backend this long (s) starts watching for its client leaving. Most
#: answers come sooner, and a task per request cost more than a timer: a disconnect before
#: then is still queued in `receive` and seen at once, so the upstream closes within ~0.25 s.
WATCH_AFTER_S = 0.25


class ClientWatch:
    """A request's own deadline, and (once it is with a backend) its client leaving.

    Past `deadline_at`'s time the task is cancelled (`timed_out`): the body read answers 408, a
    backend's answer 504. After `follow`, while `armed`, a disconnect cancels the request's task
    at once (`cancelled`), so it stops waiting on the upstream (streamed or not) and closes it.
    The relay uncancels once per cancel and books what the engine did. One timer per request
    (plain timer handles: cheaper than asyncio.timeout); the watching task only for requests
    that last."""

    __slots__ = ("gone", "armed", "cancelled", "timed_out", "_task", "_receive", "_watcher", "_timer",
                 "_deadline")

    def __init__(self, receive: Receive) -> None:
        self.gone = False
        self.armed = True
        self.cancelled = False  # this watch cancelled the task on a disconnect
        self.timed_out = False  # ... or at the deadline
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._receive = receive
        self._watcher: asyncio.Task[None] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._timer: asyncio.TimerHandle | None = None

    def follow(self) -> None:
        """Start watching for the client leaving (from WATCH_AFTER_S on); the body must be read."""
        if self._timer is None and self._watcher is None:
            self._timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, self._start)

    def _start(self) -> None:
        self._timer = None
        if self.armed:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        if self.armed:
            self.armed = False
            self.cancelled = True
            self._task.cancel()

    def deadline_at(self, when_s: float | None) -> None:
        """Cancel the task at loop time `when_s` (None: no deadline from now on)."""
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None if when_s is None else asyncio.get_running_loop().call_at(when_s, self._expire)

    def _expire(self) -> None:
        self._deadline = None
        if self.armed:
            self.armed = False
            self.timed_out = True
            self._task.cancel()

    def stop(self) -> None:
        """No more cancelling: from here on the relay only sends (or has finished)."""
        self.armed = False
        for handle in (self._timer, self._deadline):
            if handle is not None:
                handle.cancel()
        self._timer = self._deadline = None
        if self._watcher is not None:
            self._watcher.cancel()


def scan_headers(raw: list[tuple[bytes, bytes]]) -> tuple[bytes | None, str | None, int | None]:
    """Authorization, x-request-id and content-length, in one pass over the raw headers."""
    authorization = request_id = length = None
    for name, value in raw:
        if name == b"authorization":
            authorization = value
        elif name == b"x-request-id":
            text = value.decode("latin-1").strip()
            # Forwarded upstream and echoed: keep it printable and short.
            if 0 < len(text) <= 128 and text.isprintable():
                request_id = text
        elif name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                length = None
    return authorization, request_id, length


async def read_body(receive: Receive, declared: int | None, limit: int) -> bytes:
    """The whole request body, or 413 as soon as it is known to be too large."""
    if declared is not None and declared > limit:
        raise ProxyError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        if len(body) > limit:
            raise ProxyError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
        return body
    parts, size = [body], len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ProxyError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
        parts.append(chunk)
        if not message.get("more_body"):
            return b"".join(parts)


#: Most bytes of a multipart part's headers, and of the `model` value, that are read.
_PART_HEADERS_MAX = 1024
_MODEL_MAX = 256


def multipart_type(raw: list[tuple[bytes, bytes]]) -> str | None:
    """The request's Content-Type if it is multipart/form-data (pass-through routes such as
    /v1/audio/transcriptions), else None."""
    for name, value in raw:
        if name == b"content-type":
            text = value.decode("latin-1")
            return text if text[:19].lower() == "multipart/form-data" else None
    return None


def multipart_model(body: bytes, content_type: str) -> str:
    """The `model` field of a multipart/form-data body, read in one linear scan (the body itself
    is relayed untouched); 400 when there is none."""
    boundary = ""
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary or len(boundary) > 200:
        raise bad_request("A multipart body needs a boundary (1 to 200 characters) in its Content-Type.")
    delimiter = b"--" + boundary.encode("latin-1")
    model = ""
    pos = body.find(delimiter)
    while pos >= 0 and not model:
        start = pos + len(delimiter)
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            break
        head_end = body.find(b"\r\n\r\n", start, min(end, start + _PART_HEADERS_MAX))
        if head_end >= 0 and b' name="model"' in body[start:head_end]:
            raw = body[head_end + 4:end]
            if len(raw) <= _MODEL_MAX:
                model = raw.decode("utf-8", "replace").strip()
        pos = end + 2
    if not model:
        raise bad_request("'model' is required and must be a non-empty form field.", param="model")
    return model


def parse_form(body: bytes, content_type: str, record: RequestRecord) -> dict[str, Any]:
    """A multipart pass-through call (audio, image edits): only its `model` is read; the
    payload routing needs."""
    record.model = multipart_model(body, content_type)
    record.stream = False
    record.prompt_estimate = len(body) // 4  # what pass-through routes estimate, media bytes and all
    return {"model": record.model}

def parse_json(body: bytes, kind: str, record: RequestRecord) -> tuple[dict[str, Any], bytes, bool]:
    """Validate what the proxy relies on in a JSON request body; fill the record's model, stream
    and prompt estimate.

    Returns the payload, the bytes to send upstream and whether the usage chunk must be
    withheld from the client (it did not ask for usage; the proxy did on its behalf).
    """
    if not body:
        raise bad_request("The request body is empty; expected a JSON object.")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"The request body is not valid JSON: {exc.args[0]}") from None
    if not isinstance(payload, dict):
        raise bad_request("The request body must be a JSON object.")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a non-empty string.", param="model")
    stream = payload.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean.", param="stream")
    required = _REQUIRED.get(kind)
    if required is not None:
        field, types = required
        value = payload.get(field)
        if value is None:
            raise bad_request(f"'{field}' is required.", param=field)
        if not isinstance(value, types) or (field == "messages" and not value):
            shape = "a non-empty array" if field == "messages" else "a string or an array"
            raise bad_request(f"'{field}' must be {shape}.", param=field)
    if kind == "response" and payload.get("background"):
        # The engine would answer at once and generate afterwards: work outside
        # max_in_flight, the budget and the booking, fetched by a route never relayed.
        raise bad_request("'background' responses are not supported by this proxy.", param="background")
    for field in ("max_tokens", "max_completion_tokens", "n"):
        value = payload.get(field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise bad_request(f"'{field}' must be a non-negative integer.", param=field)
    record.model = model
    record.stream = stream
    if kind != "other":  # text parts only: media bytes are not prompt tokens
        record.prompt_estimate = estimate_prompt_tokens(payload)
    else:
        record.prompt_estimate = len(body) // 4
    withhold_usage = False
    if stream and kind in ("chat", "completion"):
        options = payload.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise bad_request("'stream_options' must be an object.", param="stream_options")
        if not (options or {}).get("include_usage"):
            # Ask upstream for usage anyway; the usage chunk is withheld from this client.
            payload["stream_options"] = {**(options or {}), "include_usage": True}
            body = orjson.dumps(payload)
            withhold_usage = True
    return payload, body, withhold_usage
