"""`joulegate agent` (or anything speaking its API, like the simulator) on a remote GPU host.

API: `GET {url}/v1/power` -> `{"t": <agent wall clock s>, "gpus": [{"index", "uuid", "name",
"energy_mj", "power_w", "power_limit_w"}]}` (power_limit_w optional: older agents lack it); `GET {url}/v1/power/stream?interval_s=X` -> the same objects as SSE
`data:` events, one per interval.

The source follows the stream (reconnecting with backoff) and stamps each reading with the
proxy's clock: t_s = t_agent - offset_s, where offset_s (agent clock minus proxy clock) comes
from round-trip probes, as NTP's clock filter does it: at start and every PROBE_PERIOD_S, a few
`GET /v1/power`; for each, offset = t_agent - (send_s + recv_s) / 2; the estimate is the offset
of the probe with the smallest round trip within the last OFFSET_WINDOW_S, because the smallest
round trip bounds the error best (|error| <= rtt / 2, and is ~0 when the path is symmetric).
The stream waits for the first estimate, so no sample ever carries an uncorrected time.

An agent listening beyond its host wants `Authorization: Bearer <token>`: the token comes from
`power.token_file` or the variable `power.token_env`, read when the source starts (it waits,
retrying, until the token is there; a rotated token needs a proxy restart). An https:// agent's certificate is checked against `power.ca_file`
if given, else the system's CAs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson

from proxy.config import PowerConfig
from proxy.energy.sources.base import (
    METHOD_ENERGY_COUNTER,
    METHOD_POWER_INSTANT,
    Backoff,
    GpuRead,
    PowerSource,
    SampleCallback,
    select_gpus,
    sum_or_none,
)
from proxy.redact import redact_url

log = logging.getLogger("joulegate.power.agent")


class OffsetEstimator:
    """Clock offset of a remote host (remote clock - local clock, s) from round-trip probes.

    Pure: every time is passed in. `add()` one probe; `offset_s` / `rtt_s` are those of the
    probe with the smallest round trip among the probes taken within `window_s` of the newest
    (older ones age out so that drift is followed; the newest is always kept).
    """

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._probes: deque[tuple[float, float, float]] = deque()  # (taken_s, rtt_s, offset_s)
        self.probes_total = 0

    def add(self, send_s: float, recv_s: float, remote_t_s: float, taken_s: float | None = None) -> None:
        """One probe: local clock at send and at receipt, the remote clock in the answer.

        taken_s: when the probe was taken on a monotonic clock (default recv_s) for aging.
        """
        rtt_s = max(0.0, recv_s - send_s)
        offset_s = remote_t_s - (send_s + recv_s) / 2.0
        taken_s = recv_s if taken_s is None else taken_s
        self._probes.append((taken_s, rtt_s, offset_s))
        self.probes_total += 1
        while self._probes and self._probes[0][0] < taken_s - self.window_s:
            self._probes.popleft()

    def _best(self) -> tuple[float, float, float] | None:
        return min(self._probes, key=lambda p: p[1]) if self._probes else None

    @property
    def offset_s(self) -> float | None:
        best = self._best()
        return None if best is None else best[2]

    @property
    def rtt_s(self) -> float | None:
        best = self._best()
        return None if best is None else best[1]


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str | None]:
    """The `data` payload of each SSE event; None for each comment line (a keep-alive)."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith(":"):
            yield None
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
        # other fields (event:, id:, retry:) carry nothing we use


class AgentSource(PowerSource):
    """Follows a remote agent's power stream and corrects for the hosts' clock offset."""

    kind = "agent"
    PROBES_PER_ROUND = 5
    PROBE_PERIOD_S = 10.0
    OFFSET_WINDOW_S = 60.0
    PROBE_TIMEOUT_S = 2.0

    def __init__(self, config: PowerConfig, on_sample: SampleCallback) -> None:
        super().__init__(config, on_sample)
        if not config.url:
            raise ValueError(f"the {self.kind} power source needs power.url")
        self.base_url = config.url.rstrip("/")
        self.shown_url = redact_url(self.base_url)  # the URL as logged and in errors
        self.offset = OffsetEstimator(self.OFFSET_WINDOW_S)
        self.offset_error: str | None = None
        self.events = 0
        self._offset_ready = asyncio.Event()
        self._client: httpx.AsyncClient | None = None
        self._last_data_mono_s: float | None = None

    @property
    def offset_s(self) -> float | None:
        """Agent clock minus proxy clock, seconds (None before the first probe answered)."""
        return self.offset.offset_s

    async def _run(self) -> None:
        await self._release()  # a client left by a crashed earlier run
        backoff = Backoff(1.0, 30.0)
        while True:  # a token Secret may be mounted after start: wait for it
            try:
                headers, verify = self._auth_headers(), self._verify()
                break
            except (OSError, ValueError, ssl.SSLError) as exc:
                self._failed(f"agent credentials: {_describe(exc)}")
                await asyncio.sleep(backoff.next_s())
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.PROBE_TIMEOUT_S), headers=headers,
                                         verify=verify)
        prober = asyncio.create_task(self._probe_loop(), name=f"power-{self.kind}-offset")
        try:
            await self._stream_loop()
        finally:
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await prober

    def _auth_headers(self) -> dict[str, str]:
        """The bearer token header, if a token is configured (OSError/ValueError if unreadable)."""
        return auth_headers(self.config)

    def _verify(self) -> ssl.SSLContext | bool:
        """TLS verification: the CA file's context, else the system's CAs (httpx's default)."""
        return tls_verify(self.config)

    # -- clock offset -----------------------------------------------------------------------

    async def probe_round(self) -> None:
        """PROBES_PER_ROUND sequential probes; raises httpx.HTTPError / ValueError if one fails."""
        assert self._client is not None
        for _ in range(self.PROBES_PER_ROUND):
            send_s = time.time()
            t0 = time.perf_counter()
            response = await self._client.get(f"{self.base_url}/v1/power")
            rtt_s = time.perf_counter() - t0
            response.raise_for_status()
            remote_t_s = _agent_time(orjson.loads(response.content))
            # The round trip on the monotonic clock; the wall clock only anchors the midpoint.
            self.offset.add(send_s, send_s + rtt_s, remote_t_s, taken_s=time.monotonic())
        self._offset_ready.set()

    async def _probe_loop(self) -> None:
        backoff = Backoff(0.5, self.PROBE_PERIOD_S)
        while True:
            try:
                await self.probe_round()
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                self.offset_error = f"clock probe of {self.shown_url}/v1/power failed: {_describe(exc)}"
                if not self._offset_ready.is_set():
                    self._failed(self.offset_error)  # nothing can be stamped yet
                else:
                    log.debug("%s", self.offset_error)
                await asyncio.sleep(backoff.next_s())
                continue
            self.offset_error = None
            backoff.reset()
            await asyncio.sleep(self.PROBE_PERIOD_S)

    # -- the stream -------------------------------------------------------------------------

    async def _stream_loop(self) -> None:
        assert self._client is not None
        await self._offset_ready.wait()
        backoff = Backoff(0.2, 5.0)
        read_timeout_s = max(5.0, 10.0 * self.interval_s)
        stale_after_s = max(3.0, 5.0 * self.interval_s)
        url = f"{self.base_url}/v1/power/stream"
        shown = redact_url(url)
        while True:
            try:
                async with self._client.stream(
                    "GET", url, params={"interval_s": repr(self.interval_s)},
                    timeout=httpx.Timeout(self.PROBE_TIMEOUT_S, read=read_timeout_s),
                ) as response:
                    response.raise_for_status()
                    async for data in sse_data(response.aiter_lines()):
                        if data is None:  # keep-alive: the agent has no fresh reading
                            last = self._last_data_mono_s
                            if last is None or time.monotonic() - last > stale_after_s:
                                self._failed(f"{shown} sends no readings")
                            continue
                        self._last_data_mono_s = time.monotonic()
                        if self._handle(data):
                            backoff.reset()
                raise httpx.RemoteProtocolError("the agent closed the stream")
            except (httpx.HTTPError, ValueError) as exc:
                self._failed(f"power stream {shown}: {_describe(exc)}")
            await asyncio.sleep(backoff.next_s())

    def _handle(self, data: str) -> bool:
        """One streamed reading -> one sample; False (and unhealthy) when it is unusable."""
        self.events += 1
        try:
            obj = orjson.loads(data)
            t_agent_s = _agent_time(obj)
            gpus = obj["gpus"]
            chosen = select_gpus(self.config.gpus, ((g.get("index"), g.get("uuid")) for g in gpus))
            if chosen is None or not chosen:
                have = [(g.get("index"), g.get("uuid")) for g in gpus]
                self._failed(f"the agent at {self.shown_url} does not report GPU(s) "
                             f"{self.config.gpus} (it has {have})")
                return False
            reads = [GpuRead(str(g.get("uuid") or g.get("index")), _num(g.get("energy_mj")),
                             _num(g.get("power_w")), _num(g.get("power_limit_w")))
                     for g in (gpus[i] for i in chosen)]
            energy_mj = sum_or_none(r.energy_mj for r in reads)
            power_w = sum_or_none(r.power_w for r in reads)
            host = obj.get("host")  # RAPL CPU + DRAM, where the agent reads it
            host_mj = _num(host.get("energy_mj")) if isinstance(host, dict) else None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self._failed(f"malformed power event from {self.shown_url}: {_describe(exc)}")
            return False
        if energy_mj is None and power_w is None:
            self._failed(f"the agent at {self.shown_url} reports neither energy nor power")
            return False
        offset_s = self.offset.offset_s
        assert offset_s is not None  # the stream starts after the first probe round
        self._ok()
        self._set_method(METHOD_ENERGY_COUNTER if energy_mj is not None else METHOD_POWER_INSTANT)
        return self._emit_reads(t_agent_s - offset_s, reads,
                                None if host_mj is None else host_mj / 1e3)

    async def _release(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


def auth_headers(config: PowerConfig) -> dict[str, str]:
    """The agent's bearer token header from power.token_file / token_env, or {} without one
    (OSError/ValueError if configured but unreadable). Shared with the governor's calls."""
    if config.token_file:
        with open(config.token_file, encoding="utf-8") as f:
            token = f.readline().strip()
        if not token:
            raise ValueError(f"power.token_file {config.token_file} is empty")
    elif config.token_env:
        token = os.environ.get(config.token_env, "")
        if not token:
            raise ValueError(f"${config.token_env} (power.token_env) is not set")
    else:
        return {}
    return {"Authorization": f"Bearer {token}"}


def tls_verify(config: PowerConfig) -> ssl.SSLContext | bool:
    """TLS verification for the agent: power.ca_file's context, else the system's CAs."""
    if config.ca_file:
        return ssl.create_default_context(cafile=config.ca_file)
    return True


def _agent_time(obj: Any) -> float:
    t = obj["t"]
    if isinstance(t, bool) or not isinstance(t, int | float):
        raise ValueError("'t' is not a number")
    return float(t)


def _num(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    return float(value)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
