"""`/metrics` on a listener of its own (`server.metrics_port`), apart from the API port.

A tiny aiohttp server on the proxy's event loop, started and stopped by the app's lifespan:
the scrape port can then be kept off the ingress and away from tenants. With several uvicorn
workers each binds the port with SO_REUSEPORT; any of them answers a scrape with every
worker's samples (prometheus-client multiprocess mode, as on the API port).
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


async def start_metrics_listener(host: str, port: int, render: Callable[[], bytes],
                                 reuse_port: bool = False) -> web.AppRunner:
    """Serve `GET /metrics` (`render()`'s bytes) on host:port; OSError if it cannot bind."""

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=render(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
