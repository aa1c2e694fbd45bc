"""`GET /v1/energy/stream`: one JSON snapshot of the fleet per interval, as SSE `data:` events.

Snapshots are built at most once per `MIN_INTERVAL_S` and shared by every subscriber (the
ledger is read there, never per request or per chunk); each subscriber then sees only what its
key may: an admin everything, a tenant its own row and the backends' non-operational fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import orjson

from proxy.accounting import period_start_s
from proxy.auth import Principal
from proxy.errors import bad_request
from proxy.ledger import Ledger

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]

MIN_INTERVAL_S = 0.5
MAX_INTERVAL_S = 60.0
#: "Now" for the fleet's tokens/J: the change of today's totals over this many seconds.
NOW_WINDOW_S = 60.0
#: Most a snapshot waits for the ledger; past it the snapshot goes out with `ledger_error`.
LEDGER_TIMEOUT_S = 2.0
#: The backends' power and tokens/J history sent with a stream's first snapshot: one sample
#: per HISTORY_STEP_S over the last HISTORY_S, so a fresh page draws its lines at once.
HISTORY_S = 15 * 60.0
HISTORY_STEP_S = 5.0
#: Backend fields only admin keys see in a snapshot (power, load, the governor's cap).
_ADMIN_BACKEND_FIELDS = ("in_flight", "power_w", "governor_cap_w")


def page_html() -> bytes:
    """The dashboard page, shipped as package data next to this module."""
    return resources.files("proxy.dashboard").joinpath("index.html").read_bytes()


def parse_interval_s(query: dict[str, str]) -> float:
    """`?interval_s=` in seconds (default 1, at least 0.5); 400 on anything else."""
    text = query.get("interval_s")
    if text is None:
        return 1.0
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not MIN_INTERVAL_S <= value <= MAX_INTERVAL_S:  # NaN fails too
        raise bad_request(f"interval_s must be a number of seconds from {MIN_INTERVAL_S:g} to "
                          f"{MAX_INTERVAL_S:g}.", param="interval_s")
    return value


class EnergyStream:
    """Builds the shared snapshot and serves subscribers until they leave or the proxy drains."""

    def __init__(self, backend_views: Callable[[], list[dict[str, Any]]], tenant_fields: Sequence[str],
                 ledger: Ledger) -> None:
        self.backend_views = backend_views
        self.tenant_fields = tuple(tenant_fields)
        self.ledger = ledger
        self.draining = asyncio.Event()
        self.subscribers = 0
        self._snapshot: dict[str, Any] | None = None
        self._built_s = float("-inf")  # monotonic s of the last build
        self._lock = asyncio.Lock()
        # (monotonic s, completion tokens today, joules today) per build, for "now" tokens/J.
        self._totals: deque[tuple[float, int, float]] = deque()
        # Backend name -> (wall s, power W, tokens/J) samples, oldest first.
        self._history: dict[str, deque[tuple[float, float | None, float | None]]] = {}
        self._sampler: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Begin sampling the backends' history, and end streams when the server drains."""
        self._watch_drain()
        self._sampler = asyncio.create_task(self._sample_loop(), name="joulegate-dashboard-history")

    async def close(self) -> None:
        self.draining.set()
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler

    async def _sample_loop(self) -> None:
        keep = int(HISTORY_S / HISTORY_STEP_S)
        while True:
            now_s = time.time()
            for view in self.backend_views():
                samples = self._history.setdefault(view["name"], deque(maxlen=keep))
                samples.append((round(now_s, 1), view.get("power_w"), view.get("tokens_per_joule")))
            await asyncio.sleep(HISTORY_STEP_S)

    def history(self, principal: Principal) -> dict[str, list[tuple[float, float | None, float | None]]]:
        """The last HISTORY_S of [wall s, power W, tokens/J] per backend (power: admin keys only)."""
        if principal.is_admin:
            return {name: list(samples) for name, samples in self._history.items()}
        return {name: [(t, None, tpj) for t, _, tpj in samples] for name, samples in self._history.items()}

    def _watch_drain(self) -> None:
        """Chain SIGTERM/SIGINT so open streams end at once when the server starts draining
        (the server waits for open responses, which a stream never finishes by itself)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)
            if not callable(previous):
                continue

            def handler(signum: int, frame: Any, previous: Callable[[int, Any], Any] = previous) -> None:
                self.draining.set()
                previous(signum, frame)

            signal.signal(sig, handler)

    async def current(self) -> dict[str, Any]:
        """The latest full snapshot, rebuilt if older than MIN_INTERVAL_S (once for everyone)."""
        async with self._lock:
            if self._snapshot is None or time.monotonic() - self._built_s >= MIN_INTERVAL_S * 0.9:
                self._snapshot = await self._build()
                self._built_s = time.monotonic()
            return self._snapshot

    async def _build(self) -> dict[str, Any]:
        now_s = time.time()
        backends = []
        for view in self.backend_views():
            governor = view.get("governor") or {}
            cap_w = governor.get("applied_cap_w") or governor.get("cap_w")
            backends.append({**{k: view.get(k) for k in self.tenant_fields},
                             "in_flight": view.get("in_flight"), "power_w": view.get("power_w"),
                             "governor_cap_w": cap_w})
        tenants: list[dict[str, Any]] = []
        hour_tpj = None
        ledger_error = None
        try:
            async with asyncio.timeout(LEDGER_TIMEOUT_S):  # a slow store must not stall every stream
                rows = await self.ledger.usage(since_s=period_start_s("day", now_s), group_by=("tenant",))
                hour = await self.ledger.usage(since_s=now_s - 3600.0)
            tenants = [{"tenant": r.tenant, "joules": r.joules, "requests": r.requests,
                        "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                        "tokens": r.prompt_tokens + r.completion_tokens} for r in rows]
            joules_h = sum(r.joules for r in hour)
            hour_tpj = sum(r.completion_tokens for r in hour) / joules_h if joules_h > 0 else None
        except Exception as exc:  # a store outage leaves the backends' half of the snapshot live
            ledger_error = type(exc).__name__
        tokens_today = sum(t["completion_tokens"] for t in tenants)
        joules_today = sum(t["joules"] for t in tenants)
        return {"time": datetime.fromtimestamp(now_s, tz=UTC).isoformat(timespec="milliseconds"),
                "backends": backends, "tenants": tenants,
                "fleet": {"tokens_per_joule_now": self._now_tpj(tokens_today, joules_today),
                          "tokens_per_joule_hour": hour_tpj},
                "ledger_error": ledger_error, "subscribers": self.subscribers}

    def _now_tpj(self, tokens: int, joules: float) -> float | None:
        """Completion tokens per joule booked over the last NOW_WINDOW_S (None: none booked)."""
        t = time.monotonic()
        if self._totals and joules < self._totals[-1][2]:  # a new day: today's totals restarted
            self._totals.clear()
        self._totals.append((t, tokens, joules))
        while len(self._totals) > 1 and self._totals[1][0] <= t - NOW_WINDOW_S:
            self._totals.popleft()
        _, tokens0, joules0 = self._totals[0]
        return (tokens - tokens0) / (joules - joules0) if joules - joules0 > 0 else None

    @staticmethod
    def view_for(snapshot: dict[str, Any], principal: Principal) -> dict[str, Any]:
        """What `principal` may see of a snapshot: a tenant only its own row and no operational
        backend fields."""
        if principal.is_admin:
            return snapshot
        backends = [{k: v for k, v in b.items() if k not in _ADMIN_BACKEND_FIELDS} for b in snapshot["backends"]]
        tenants = [t for t in snapshot["tenants"] if t["tenant"] == principal.tenant]
        return {**snapshot, "backends": backends, "tenants": tenants, "ledger_error": None, "subscribers": None}

    async def serve(self, receive: Receive, send: Send, principal: Principal, interval_s: float) -> None:
        """Send snapshots every `interval_s` until the client leaves or the proxy drains."""
        left = asyncio.ensure_future(_disconnected(receive))
        drained = asyncio.ensure_future(self.draining.wait())
        self.subscribers += 1
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream"), (b"cache-control", b"no-store"),
                (b"x-accel-buffering", b"no")]})
            first: dict[str, Any] = {"history": self.history(principal)}
            while not (left.done() or drained.done()):
                event = orjson.dumps({**self.view_for(await self.current(), principal), **first})
                first = {}
                await send({"type": "http.response.body", "body": b"data: " + event + b"\n\n", "more_body": True})
                await asyncio.wait((left, drained), timeout=interval_s, return_when=asyncio.FIRST_COMPLETED)
            if not left.done():  # draining: say so, then end the response properly
                await send({"type": "http.response.body", "body": b"event: end\ndata: {}\n\n", "more_body": False})
        except OSError:
            pass  # the client went away mid-write
        finally:
            self.subscribers -= 1
            for task in (left, drained):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


async def _disconnected(receive: Receive) -> None:
    """Returns once the client has gone (ASGI http.disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass
