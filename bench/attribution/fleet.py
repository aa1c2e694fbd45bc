"""The processes of one configuration: simulated GPUs, the proxy in front of them (and its
`--serve-proxy` mode, which adds a read-only books route), and waiting until power flows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench.attribution.workload import ADMIN_KEY, MODEL, TENANT_KEYS, Setup
from bench.overhead import HOST, Server, free_port, http_request, wait_until

BOOKS_PATH = "/_bench/books"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def proxy_config(setup: Setup, sims: dict[str, Server], prefill_weight: float | None,
                 learn: bool = True, whole_upstream: bool = False) -> str:
    lines = ["server: {host: 127.0.0.1}", "backends:"]
    for name, sim in sims.items():
        base = f"http://{HOST}:{sim.port}"
        url = base + "/metrics" if setup.source == "dcgm" else base
        lines.append(f"  - {{name: {name}, url: '{base}/v1', models: [{MODEL}], power: "
                     f"{{source: {setup.source}, url: '{url}', interval_s: {setup.interval_s}}}"
                     + (", stream_upstream: false}" if whole_upstream else "}"))
    lines.append("routing: {policy: least_loaded}")
    energy = "energy: {idle: separate"
    if prefill_weight is not None:
        energy += f", prefill_weight: {prefill_weight}"
    if not learn:
        energy += ", learn: false"
    lines.append(energy + "}")
    lines.append("ledger: memory://")
    lines.append("tenants:")
    for t, k in TENANT_KEYS.items():
        lines.append(f"  - {{name: {t}, api_keys_sha256: ['{sha256(k)}']}}")
    lines.append(f"admin_api_keys_sha256: ['{sha256(ADMIN_KEY)}']")
    return "\n".join(lines) + "\n"


def _get_json(port: int, path: str, key: str | None = None, timeout_s: float = 5.0) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.get(f"http://{HOST}:{port}{path}", headers=headers, timeout=timeout_s)
    r.raise_for_status()
    return r.json()


def _ok(port: int, path: str) -> bool:
    status, _, _ = http_request(port, "GET", path, timeout_s=1.0)
    return status == 200


def start_sims(sims: dict[str, Server], specs: list[tuple[str, str]], model: str, log_dir: Path,
               tag: str, seed: int = 0, skews_s: dict[str, float] | None = None) -> None:
    """One `sim-backend` per (name, profile), seeds `seed`, `seed + 1`, ...; each is put in
    `sims` as it starts (so the caller can stop them all if a later one fails), then each is
    waited for until it lists its models. `skews_s`: power-API clock skew per name."""
    for k, (name, profile) in enumerate(specs):
        port = free_port()
        skew = (skews_s or {}).get(name, 0.0)
        argv = ["env", f"JOULEGATE_SIM_CLOCK_SKEW_S={skew}"] if skew else []
        argv += [sys.executable, "-m", "proxy", "sim-backend", "--profile", profile,
                 "--port", str(port), "--model", model, "--seed", str(seed + k)]
        sims[name] = Server(f"{tag}-sim-{name}", argv, port, log_dir)
        sims[name].start()
    for sim in sims.values():
        wait_until(sim, lambda s=sim: _ok(s.port, "/v1/models"), 30.0)


def wait_powered(proxy: Server, admin_key: str, backends: int, hold_s: float) -> None:
    """Wait until each of the proxy's `backends` has had healthy power for `hold_s` seconds."""
    first: dict[str, float] = {}

    def powered() -> bool:
        data = _get_json(proxy.port, "/v1/energy/backends", admin_key)["data"]
        now = time.monotonic()
        for b in data:
            if b.get("power_w") is not None and b.get("power_source_healthy"):
                first.setdefault(b["name"], now)
        return len(first) == backends and all(now - t >= hold_s for t in first.values())

    wait_until(proxy, powered, 30.0)


class Fleet:
    """Simulated GPUs and one proxy in front of them, for one bench configuration (this bench's
    runs and bench/routing's live ones build on it); `stop()` ends them all."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.sims: dict[str, Server] = {}
        self.proxy: Server | None = None
        self.plain_serve = False

    def start_proxy(self, tag: str, cfg: Path, bench_module: str, plain_serve: bool, admin_key: str,
                    hold_s: float) -> None:
        """`joulegate serve -c CFG`, or `python -m BENCH_MODULE --serve-proxy CFG` (the same app
        plus the bench's read-only route); returns once it is ready and every sim has had power
        for `hold_s` seconds."""
        port = free_port()
        self.plain_serve = plain_serve
        if plain_serve:
            argv = [sys.executable, "-m", "proxy", "serve", "-c", str(cfg), "--port", str(port)]
        else:
            argv = [sys.executable, "-m", bench_module, "--serve-proxy", str(cfg), "--port", str(port)]
        self.proxy = Server(f"{tag}-proxy", argv, port, self.log_dir)
        self.proxy.start()
        wait_until(self.proxy, lambda: _ok(port, "/readyz"), 30.0)
        wait_powered(self.proxy, admin_key, len(self.sims), hold_s)

    def bench_route(self, path: str) -> dict[str, Any] | None:
        """The bench route's JSON; None under plain serve, or when it does not answer."""
        if self.proxy is None or self.plain_serve:
            return None
        try:
            return _get_json(self.proxy.port, path)
        except (httpx.HTTPError, ValueError):
            return None

    def sim_energy(self) -> dict[str, dict[str, float]]:
        return {n: _get_json(s.port, "/sim/energy") for n, s in self.sims.items()}

    def stop(self) -> None:
        for s in ([self.proxy] if self.proxy else []) + list(self.sims.values()):
            s.stop()


class Run(Fleet):
    """The processes of one configuration."""

    def __init__(self, setup: Setup, args: argparse.Namespace, log_dir: Path) -> None:
        super().__init__(log_dir)
        self.setup = setup
        self.args = args

    def start(self) -> None:
        tag = self.setup.name.replace("@", "-").replace("+", "-")
        backends = list(self.setup.backends)
        start_sims(self.sims, backends, MODEL, self.log_dir, tag, self.args.seed,
                   {backends[0][0]: self.setup.skew_s} if self.setup.skew_s else None)
        cfg = self.log_dir / f"{tag}-joulegate.yaml"
        cfg.write_text(proxy_config(self.setup, self.sims, self.args.prefill_weight,
                                    not self.args.no_learn, self.args.whole_upstream))
        # Power from every backend, and at least two samples' worth of it, before any request.
        self.start_proxy(tag, cfg, "bench.attribution", self.args.plain_serve, ADMIN_KEY,
                         2.5 * self.setup.interval_s)

    def books(self) -> dict[str, Any] | None:
        return self.bench_route(BOOKS_PATH)


def serve_with_route(config_path: str, port: int, path: str,
                     payload: Callable[[Any, Any], Any]) -> int:
    """`joulegate serve -c CONFIG --port P` (one worker, the same uvicorn settings) plus one
    read-only JSON route at `path`, answered by `payload(app, config)`."""
    import logging

    import uvicorn

    from proxy.app import create_app
    from proxy.config import load_config

    config = load_config(config_path)
    config.server = config.server.model_copy(update={"port": port})
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(config)

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == path:
            body = json.dumps(payload(app, config)).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        await app(scope, receive, send)

    server = config.server
    uvicorn.run(wrapped, host=server.host, port=port, loop="uvloop", http="httptools",
                access_log=False, log_level="info", lifespan="on",
                timeout_graceful_shutdown=server.drain_timeout_s or None,
                timeout_keep_alive=server.keepalive_timeout_s)
    return 0


_BOOK_KEYS = ("finalized_joules_attributed", "finalized_joules_idle", "carried_joules",
              "finalized_joules_measured", "first_finalized_s", "finalized_until_s", "open_requests")


def _books(app: Any, _config: Any) -> dict[str, Any]:
    """Each backend's attribution books, for true conservation checks."""
    out = {}
    for name, meter in getattr(getattr(app, "meter", None), "meters", {}).items():
        a = getattr(meter, "attributor", None)
        out[name] = {k: getattr(a, k, None) for k in _BOOK_KEYS}
    return out


def serve_proxy(config_path: str, port: int) -> int:
    """`joulegate serve` plus GET /_bench/books."""
    return serve_with_route(config_path, port, BOOKS_PATH, _books)
