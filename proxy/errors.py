"""OpenAI-shaped errors: one exception type, its wire format, and sending it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

#: HTTP status -> the OpenAI error `type` clients switch on.
_TYPE_BY_STATUS: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ProxyError(Exception):
    """An error the proxy answers itself, in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers or []
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error")

    def body(self) -> bytes:
        """The JSON body: {"error": {"message", "type", "param", "code"}}."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ProxyError:
    return ProxyError(400, message, param=param, code=code)


def model_not_found(model: str) -> ProxyError:
    return ProxyError(
        404, f"The model `{model}` does not exist or no backend serves it.",
        param="model", code="model_not_found",
    )


#: Key of the ASGI start message that marks an answer the proxy made itself (its error code).
REFUSAL = "joulegate.refusal"


async def send_error(send: Callable[[dict[str, Any]], Awaitable[None]], exc: ProxyError,
                     request_id: str) -> None:
    """Answer with an OpenAI-shaped error."""
    await send({
        "type": "http.response.start",
        "status": exc.status,
        "headers": [(b"content-type", b"application/json"), (b"x-request-id", request_id.encode()), *exc.headers],
        REFUSAL: exc.code or exc.type,  # read by the app's refusal counter; servers ignore it
    })
    await send({"type": "http.response.body", "body": exc.body()})
