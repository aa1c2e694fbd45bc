"""Reference relay: the practical ceiling of a one-process Python proxy on this machine.

Bare Starlette on uvicorn (``--loop uvloop --http httptools``, no access log) with one shared
aiohttp ``ClientSession`` upstream. It forwards the request body as is and relays the upstream
bytes untouched: no parsing, no accounting, no routing. JouleGate is measured against it in the
same run (see bench/overhead.py and shared/reference/dataplane.md).

Run: ``python -m bench.reference_relay --port 9100 --upstream http://127.0.0.1:9000/v1``.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

# Below the usual 5 s idle timeout of uvicorn/vLLM backends, so a pooled connection is never
# reused just as the backend closes it.
UPSTREAM_KEEPALIVE_S = 4.0
# Headers worth forwarding upstream; everything else (host, content-length...) aiohttp sets.
_FORWARD_HEADERS = ("content-type", "authorization", "x-request-id", "accept")


def build_app(upstream_base_url: str) -> Starlette:
    """Build the relay app for an OpenAI base URL such as ``http://127.0.0.1:9000/v1``."""
    base = upstream_base_url.rstrip("/")
    state: dict[str, aiohttp.ClientSession] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE_S)
        session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # relay bytes untouched
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600),
        )
        state["session"] = session
        try:
            yield
        finally:
            await session.close()

    def _headers(request: Request) -> dict[str, str]:
        return {k: v for k in _FORWARD_HEADERS if (v := request.headers.get(k)) is not None}

    async def relay(request: Request) -> Response:
        body = await request.body()
        resp = await state["session"].request(
            request.method,
            base + request.url.path[len("/v1") :],
            data=body or None,
            headers=_headers(request),
        )
        ctype = resp.headers.get("content-type", "application/octet-stream")
        if ctype.startswith("text/event-stream"):

            async def stream() -> AsyncIterator[bytes]:
                # Release in the generator's finally: it runs on client disconnect too (a
                # BackgroundTask would not), and release() closes an unfinished connection.
                try:
                    async for chunk in resp.content.iter_any():
                        yield chunk
                finally:
                    resp.release()

            return StreamingResponse(stream(), status_code=resp.status, media_type=ctype)
        try:
            data = await resp.read()
        finally:
            resp.release()
        return Response(data, status_code=resp.status, media_type=ctype)

    return Starlette(
        routes=[
            Route("/v1/chat/completions", relay, methods=["POST"]),
            Route("/v1/models", relay, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Reference Starlette+uvicorn+aiohttp relay.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9100)
    ap.add_argument("--upstream", default="http://127.0.0.1:9000/v1", help="OpenAI base URL")
    args = ap.parse_args(argv)
    uvicorn.run(
        build_app(args.upstream),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
