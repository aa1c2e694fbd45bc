"""Measuring one run: drive the plan through the proxy with the official `openai` SDK, poll
the proxy's finals until `measured`, and read each request's truth from its simulator.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import openai

from bench.attribution.workload import (
    ADMIN_KEY,
    MODEL,
    TENANT_KEYS,
    Planned,
    _embedding_inputs,
    _text,
)
from bench.overhead import HOST, Server


@dataclass
class Outcome:
    """What the bench saw of one request, then what the proxy and the simulator say about it."""

    index: int
    request_id: str
    tenant: str
    kind: str
    stream: bool
    include_usage: bool
    plan_prompt_tokens: int
    max_tokens: int
    cls: str = "chat"  # chat | long | embedding
    aborted: bool = False  # the client dropped the stream mid-way
    sent_s: float = 0.0  # bench wall clock
    first_s: float | None = None
    done_s: float = 0.0
    error: str | None = None
    backend: str | None = None
    resp_joules: float | None = None  # at response time (header / usage energy), if visible
    resp_method: str | None = None
    final_joules: float | None = None
    final_method: str | None = None
    final_tenant: str | None = None
    proxy_start_s: float | None = None
    proxy_end_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    truth_joules: float | None = None
    truth_prompt_tokens: int | None = None
    truth_completion_tokens: int | None = None
    truth_arrival_s: float | None = None
    truth_first_s: float | None = None
    truth_end_s: float | None = None
    # Context, filled in by `annotate`.
    backend_concurrency: float | None = None  # mean requests on the engine during it (itself incl.)
    idle_before_s: float | None = None  # the engine was idle this long before it arrived (0: busy)
    idle_after_s: float | None = None  # ... and after it ended
    err_pct: float | None = None  # (final - truth) / truth, %
    prefill_share: float | None = None  # of the true joules, the prompt's prefill
    near_idle_edge: bool | None = None  # in flight within one interval of an idle/busy edge


def _energy_of_usage(usage: Any) -> dict[str, Any] | None:
    extra = getattr(usage, "model_extra", None) or {}
    energy = extra.get("energy")
    return energy if isinstance(energy, dict) else None


async def send_one(client: openai.AsyncOpenAI, p: Planned, o: Outcome) -> None:
    """Send one planned request with the openai SDK and fill in what the response says."""
    headers = {"x-request-id": o.request_id}
    if p.kind == "embedding":
        raw = await client.embeddings.with_raw_response.create(
            model=MODEL, input=_embedding_inputs(p), extra_headers=headers)
        raw.parse()
        _from_headers(raw.headers, o)
        return
    if p.kind == "chat":
        api = client.chat.completions.with_raw_response
        body: dict[str, Any] = {"messages": [
            {"role": "user", "content": _text(4 * (p.prompt_tokens - 3), p.index)}]}
    else:
        api = client.completions.with_raw_response  # type: ignore[assignment]
        body = {"prompt": _text(4 * p.prompt_tokens, p.index)}
    if not p.stream:
        raw = await api.create(model=MODEL, max_tokens=p.max_tokens, extra_headers=headers, **body)
        raw.parse()
        _from_headers(raw.headers, o)
        return
    if p.include_usage:
        body["stream_options"] = {"include_usage": True}
    raw = await api.create(model=MODEL, max_tokens=p.max_tokens, stream=True, extra_headers=headers,
                           **body)
    o.backend = raw.headers.get("x-energy-backend")
    stream = raw.parse()
    received = 0
    async for chunk in stream:
        if o.first_s is None and chunk.choices:
            o.first_s = time.time()
        if p.abort_after and chunk.choices:
            received += 1
            if received >= p.abort_after:
                # A client that goes away mid-stream: the proxy and the engine see a disconnect.
                o.aborted = True
                await stream.close()
                return
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            energy = _energy_of_usage(usage)
            if energy is not None:
                o.resp_joules = float(energy["joules"])
                o.resp_method = str(energy["method"])


def _from_headers(headers: httpx.Headers, o: Outcome) -> None:
    o.backend = headers.get("x-energy-backend")
    if "x-energy-joules" in headers:
        o.resp_joules = float(headers["x-energy-joules"])
        o.resp_method = headers.get("x-energy-method")


async def drive(plan: list[Planned], proxy_url: str, concurrency: int, tag: str,
                closed_loop: bool = False) -> list[Outcome]:
    """Replay the plan in real time against the proxy; at most `concurrency` in flight.
    `closed_loop`: ignore the arrival times and keep `concurrency` requests in flight."""
    # No retries (a retry would reuse the x-request-id), so no race either: the SDK's httpx pool
    # keeps idle connections 5 s, exactly uvicorn's keep-alive timeout, and a request sent on a
    # connection at that instant fails with "Server disconnected without sending a response"
    # (about 1 in 50 requests sent 4.97-5.03 s after the previous one, here). Expire them first.
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100, keepalive_expiry=2.0)
    clients = {t: openai.AsyncOpenAI(base_url=proxy_url + "/v1", api_key=k, max_retries=0,
                                     timeout=300.0,
                                     http_client=openai.DefaultAsyncHttpxClient(limits=limits))
               for t, k in TENANT_KEYS.items()}
    sem = asyncio.Semaphore(concurrency)
    t0 = time.monotonic() + 0.1

    async def one(p: Planned) -> Outcome:
        o = Outcome(p.index, f"ab-{tag}-{p.index:04d}", p.tenant, p.kind, p.stream,
                    p.include_usage, p.prompt_tokens, p.max_tokens, cls=p.cls)
        if not closed_loop:
            await asyncio.sleep(max(0.0, t0 + p.at_s - time.monotonic()))
        async with sem:
            o.sent_s = time.time()
            try:
                await send_one(clients[p.tenant], p, o)
            except openai.OpenAIError as exc:
                o.error = f"{type(exc).__name__}: {exc}"[:300]
            o.done_s = time.time()
        return o

    try:
        return list(await asyncio.gather(*(one(p) for p in plan)))
    finally:
        for c in clients.values():
            await c.close()


# ----------------------------------------------------------------------------- after the run


async def wait_measured(proxy_url: str, outcomes: list[Outcome], timeout_s: float) -> float:
    """Poll `/v1/energy/requests/{id}` until every request is `measured` (or the timeout);
    fills final_*; returns the seconds it took."""
    started = time.monotonic()
    pending = [o for o in outcomes if o.error is None]
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    sem = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=proxy_url, headers=headers, timeout=10.0) as client:

        async def poll(o: Outcome) -> bool:
            async with sem:
                r = await client.get(f"/v1/energy/requests/{o.request_id}")
            if r.status_code != 200:
                return False
            d = r.json()
            o.final_joules, o.final_method = d.get("joules"), d.get("method")
            o.final_tenant, o.backend = d.get("tenant"), d.get("backend") or o.backend
            o.prompt_tokens, o.completion_tokens = d.get("prompt_tokens"), d.get("completion_tokens")
            o.proxy_start_s, o.proxy_end_s = _epoch(d.get("start")), _epoch(d.get("end"))
            return o.final_method == "measured"

        while pending and time.monotonic() - started < timeout_s:
            done = await asyncio.gather(*(poll(o) for o in pending))
            pending = [o for o, ok in zip(pending, done, strict=True) if not ok]
            if pending:
                await asyncio.sleep(0.25)
    return time.monotonic() - started


def _epoch(iso: str | None) -> float | None:
    return None if iso is None else datetime.fromisoformat(iso).timestamp()


async def fetch_truth(sims: dict[str, Server], outcomes: list[Outcome]) -> None:
    sem = asyncio.Semaphore(16)
    async with httpx.AsyncClient(timeout=10.0) as client:

        async def one(o: Outcome) -> None:
            sim = sims.get(o.backend or "")
            if sim is None:
                return
            async with sem:
                r = await client.get(f"http://{HOST}:{sim.port}/sim/requests/{o.request_id}")
            if r.status_code == 200:
                d = r.json()
                o.truth_joules = d["joules"]
                o.truth_prompt_tokens, o.truth_completion_tokens = d["prompt_tokens"], d["completion_tokens"]
                o.truth_arrival_s, o.truth_first_s, o.truth_end_s = d["arrival_s"], d["first_token_s"], d["end_s"]

        await asyncio.gather(*(one(o) for o in outcomes if o.error is None))
