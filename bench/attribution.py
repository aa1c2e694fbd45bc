"""Attribution accuracy benchmark: the proxy's per-request joules vs the simulator's ground truth.

Per configuration (power source x sampling interval) it starts, each in its own process on
loopback: three simulated GPUs of different profiles serving the same model
(`joulegate sim-backend`: h100, a100, l4) and one proxy (`routing: least_loaded`, three tenants,
every backend on the chosen power source). It drives one seeded, bursty, mixed workload through
the proxy with the official `openai` AsyncOpenAI client (chat and legacy completions, streamed
with and without usage, non-streamed, embeddings; short and long prompts and outputs; up to
`--concurrency` in flight), waits until every request's `GET /v1/energy/requests/{id}` is
`measured`, and compares each with `GET /sim/requests/{id}` of the simulator that served it.

Prints one table (fleet total error, conservation, per-tenant totals error, per-request median
and p90 absolute error, method share at response time), PASS/FAIL per target, a breakdown of
the error by request kind and backend, the worst requests of any configuration that missed a
target, and writes bench/results/attribution-<timestamp>.json.

Conservation needs the proxy's idle joules, which it does not publish. The proxy therefore runs
as `python -m bench.attribution --serve-proxy CONFIG --port P`: `joulegate serve`'s app
(`proxy.app.create_app`) under the same uvicorn settings, plus one read-only route
(`GET /_bench/books`) that returns each backend attributor's books. `--plain-serve` runs the
stock `python -m proxy serve` instead; conservation then falls back to the external check
(sum of attributed + the simulators' idle joules vs the simulators' joules).

Run: ``python -m bench.attribution [--quick] [--requests N] [--seed S]``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import openai

from bench.overhead import (
    HOST,
    RESULTS_DIR,
    Server,
    free_port,
    http_request,
    signals_as_interrupt,
    wait_until,
)

MODEL = "llama-3.1-8b"
BACKENDS = (("h100", "h100-llama3.1-8b"), ("a100", "a100-llama3.1-8b"), ("l4", "l4-llama3.1-8b"))
TENANT_KEYS = {
    "acme": "sk-bench-acme-0001",
    "globex": "sk-bench-globex-0002",
    "initech": "sk-bench-initech-0003",
}
ADMIN_KEY = "sk-bench-admin-0009"
BOOKS_PATH = "/_bench/books"

# Targets (issue 3, "Figures to reach and report").
TARGET_CONSERVATION_PCT = 0.1
TARGET_100MS_TENANT_PCT = 2.0
TARGET_100MS_MEDIAN_PCT = 10.0
TARGET_100MS_P90_PCT = 25.0
TARGET_1S_TENANT_PCT = 5.0


@dataclass(frozen=True)
class Setup:
    """One configuration: a power source and its sampling interval; `skew_s` puts the first
    backend's power-API clock that far off (the proxy's agent source has to estimate it);
    `busy` sends all traffic, closed loop at `--concurrency`, to one H100."""

    source: str  # sim (the agent API stream) | dcgm (scrape of /metrics)
    interval_s: float
    skew_s: float = 0.0
    busy: bool = False

    @property
    def name(self) -> str:
        iv = f"{round(self.interval_s * 1000)}ms" if self.interval_s < 1 else f"{self.interval_s:g}s"
        name = f"{'busy' if self.busy else self.source}@{iv}"
        return name + (f"+skew{self.skew_s:g}s" if self.skew_s else "")

    @property
    def backends(self) -> tuple[tuple[str, str], ...]:
        return BACKENDS[:1] if self.busy else BACKENDS


DEFAULT_SETUPS = (Setup("sim", 0.1), Setup("sim", 0.1, skew_s=2.5), Setup("sim", 1.0),
                  Setup("dcgm", 1.0), Setup("sim", 0.1, busy=True), Setup("sim", 1.0, busy=True))
QUICK_SETUPS = (Setup("sim", 0.1, skew_s=2.5), Setup("sim", 1.0), Setup("sim", 0.1, busy=True))
# Request classes every figure is reported for (prompts of LONG_PROMPT_TOKENS and more are long).
CLASSES = ("chat", "long", "embedding")
LONG_PROMPT_TOKENS = 2000


# ----------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Planned:
    """One request of the seeded workload; `at_s` is its arrival after the workload starts."""

    index: int
    at_s: float
    tenant: str
    kind: str  # chat | completion | embedding
    stream: bool
    include_usage: bool
    prompt_tokens: int  # what the simulator will count (ceil(chars / 4) + 3 per chat message)
    max_tokens: int  # 0 for embeddings
    inputs: int = 1  # embeddings: how many input strings
    abort_after: int = 0  # streams: the client drops the stream after this many tokens (0: never)

    @property
    def cls(self) -> str:
        """chat | long | embedding (the classes figures are reported for)."""
        if self.kind == "embedding":
            return "embedding"
        return "long" if self.prompt_tokens >= LONG_PROMPT_TOKENS else "chat"


# Per tenant: share of the traffic, chance of embeddings / legacy completions / a long
# (2-8k token) prompt, chance that a generation is streamed and that a stream is dropped by the
# client mid-way, median prompt and output tokens.
TENANT_MIX = {
    "acme": dict(share=0.40, p_embed=0.00, p_legacy=0.10, p_long=0.05, p_stream=0.80,
                 p_abort=0.15, prompt=120, output=40),
    "globex": dict(share=0.35, p_embed=0.25, p_legacy=0.05, p_long=0.35, p_stream=0.30,
                   p_abort=0.10, prompt=600, output=110),
    "initech": dict(share=0.25, p_embed=0.10, p_legacy=0.40, p_long=0.15, p_stream=0.55,
                    p_abort=0.10, prompt=250, output=70),
}


def _lognormal_int(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma))))


def make_plan(n: int, seed: int) -> list[Planned]:
    """The workload for `seed`: bursts (mean 14 requests, ~50 ms apart) separated by idle gaps
    (mostly 0.4-1.2 s, one in five 2-3.5 s); prompts 20..2000 tokens (long ones 2000..8000)
    and outputs 8..512 tokens, log-normal per tenant; some streams dropped mid-way."""
    rng = random.Random(seed)
    tenants = list(TENANT_MIX)
    weights = [TENANT_MIX[t]["share"] for t in tenants]
    plan: list[Planned] = []
    t_s = 0.0
    while len(plan) < n:
        burst = min(n - len(plan), 1 + int(rng.expovariate(1 / 13)))
        for _ in range(burst):
            t_s += rng.expovariate(1 / 0.05)
            tenant = rng.choices(tenants, weights)[0]
            mix = TENANT_MIX[tenant]
            prompt = _lognormal_int(rng, mix["prompt"], 1.0, 20, LONG_PROMPT_TOKENS - 1)
            if rng.random() < mix["p_long"]:
                prompt = _lognormal_int(rng, 4000, 0.5, LONG_PROMPT_TOKENS, 8000)
            if rng.random() < mix["p_embed"]:
                plan.append(Planned(len(plan), t_s, tenant, "embedding", False, False, prompt, 0,
                                    inputs=rng.randint(1, 4)))
                continue
            kind = "completion" if rng.random() < mix["p_legacy"] else "chat"
            stream = rng.random() < mix["p_stream"]
            include_usage = stream and rng.random() < 0.7
            output = _lognormal_int(rng, mix["output"], 0.9, 8, 512)
            abort_after = 0
            if stream and output >= 16 and rng.random() < mix["p_abort"]:
                abort_after = rng.randint(2, output // 2)
            plan.append(Planned(len(plan), t_s, tenant, kind, stream, include_usage, prompt, output,
                                abort_after=abort_after))
        t_s += rng.uniform(0.4, 1.2) if rng.random() < 0.8 else rng.uniform(2.0, 3.5)
    return plan


_FILLER = "".join(f"joule{i % 97} watt{i % 89} " for i in range(2000))


def _text(chars: int, salt: int) -> str:
    """Exactly `chars` characters of filler (varied a little per request)."""
    start = (salt * 131) % 1000
    return (_FILLER[start:] + _FILLER)[:chars]


def _embedding_inputs(p: Planned) -> list[str]:
    """`p.inputs` strings whose ceil(len / 4) sum to p.prompt_tokens."""
    k = max(1, min(p.inputs, p.prompt_tokens))
    sizes = [p.prompt_tokens // k + (1 if i < p.prompt_tokens % k else 0) for i in range(k)]
    return [_text(4 * s, p.index + i) for i, s in enumerate(sizes)]


# ----------------------------------------------------------------------------- one request


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


def annotate(outcomes: list[Outcome], interval_s: float, prefill_j_per_token: dict[str, float]
             ) -> None:
    """Per request: error, share of its true joules that is prefill, mean engine concurrency
    during it, idle time around it, and whether it is in flight within one sampling interval
    of an engine idle/busy transition."""
    by_backend: dict[str, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        if o.truth_arrival_s is not None and o.truth_end_s is not None:
            by_backend[o.backend or ""].append(o)
        if o.final_joules is not None and o.truth_joules:
            o.err_pct = 100.0 * (o.final_joules - o.truth_joules) / o.truth_joules
            pj = prefill_j_per_token.get(o.backend or "")
            if pj is not None and o.truth_prompt_tokens is not None:
                o.prefill_share = min(1.0, pj * o.truth_prompt_tokens / o.truth_joules)
    for group in by_backend.values():
        spans = sorted((o.truth_arrival_s, o.truth_end_s) for o in group)  # type: ignore[misc]
        # Busy periods of the engine: the union of its requests' spans; their ends are the
        # idle/busy transitions.
        edges: list[float] = []
        cur_s, cur_e = spans[0]
        for s_, e_ in spans[1:]:
            if s_ > cur_e:
                edges += [cur_s, cur_e]
                cur_s, cur_e = s_, e_
            else:
                cur_e = max(cur_e, e_)
        edges += [cur_s, cur_e]
        for o in group:
            a, b = o.truth_arrival_s, o.truth_end_s
            assert a is not None and b is not None
            overlap = sum(max(0.0, min(b, e) - max(a, s)) for s, e in spans)
            o.backend_concurrency = overlap / (b - a) if b > a else 1.0
            busy_before = [e for s, e in spans if s < a]
            o.idle_before_s = 0.0 if any(e > a for e in busy_before) else (
                a - max(busy_before) if busy_before else None)
            later = [s for s, e in spans if e > b or s > b]
            o.idle_after_s = 0.0 if any(s <= b for s in later) else (
                min(later) - b if later else None)
            o.near_idle_edge = any(a < t + interval_s and b > t - interval_s for t in edges)


def calibration(outcomes: list[Outcome], prefill_j_per_token: dict[str, float]
                ) -> dict[str, dict[str, float | None]]:
    """Per backend, from the ground truth: decode joules per decode token during this run and
    the prefill weight that would make one prompt token cost what it really cost (the proxy's
    `energy.prefill_weight` is one number for every backend)."""
    out: dict[str, dict[str, float | None]] = {}
    for name, pj in prefill_j_per_token.items():
        dec_j = dec_n = 0.0
        for o in outcomes:
            if (o.backend == name and o.kind != "embedding" and o.truth_joules
                    and o.truth_prompt_tokens and o.truth_completion_tokens):
                # The first token comes out of the prefill step, which the simulator bills as
                # prefill; each later token is one decode step's share.
                dec_j += o.truth_joules - pj * o.truth_prompt_tokens
                dec_n += o.truth_completion_tokens - 1
        per_tok = dec_j / dec_n if dec_n else None
        out[name] = {"prefill_j_per_token": pj, "decode_j_per_token": per_tok,
                     "implied_prefill_weight": pj / per_tok if per_tok else None}
    return out


def _pct(a: float, b: float) -> float | None:
    return 100.0 * (a - b) / b if b else None


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def class_figures(ok: list[Outcome]) -> dict[str, Any]:
    """For one group of compared requests: count, total error, per-tenant totals error (the
    largest), per-request median and p90 |error|, all in %."""
    tenant_errs = []
    for t in TENANT_KEYS:
        mine = [o for o in ok if o.tenant == t]
        err = _pct(math.fsum(o.final_joules for o in mine),  # type: ignore[misc]
                   math.fsum(o.truth_joules for o in mine))  # type: ignore[misc]
        if err is not None:
            tenant_errs.append(abs(err))
    abs_err = [abs(o.err_pct) for o in ok]  # type: ignore[arg-type]
    return {
        "n": len(ok),
        "total_err_pct": _pct(math.fsum(o.final_joules for o in ok),  # type: ignore[misc]
                              math.fsum(o.truth_joules for o in ok)),  # type: ignore[misc]
        "tenant_max_abs_err_pct": max(tenant_errs) if tenant_errs else None,
        "median_abs_err_pct": _quantile(abs_err, 0.5),
        "p90_abs_err_pct": _quantile(abs_err, 0.9),
    }


def summarize(setup: Setup, outcomes: list[Outcome], energy: dict[str, Any]) -> dict[str, Any]:
    """The table row (and its parts) for one configuration."""
    ok = [o for o in outcomes if o.err_pct is not None]
    measured = [o for o in ok if o.final_method == "measured"]
    s_proxy = math.fsum(o.final_joules for o in ok)  # type: ignore[misc]
    s_truth = math.fsum(o.truth_joules for o in ok)  # type: ignore[misc]
    tenants: dict[str, dict[str, float]] = {}
    for t in TENANT_KEYS:
        mine = [o for o in ok if o.tenant == t]
        p_j = math.fsum(o.final_joules for o in mine)  # type: ignore[misc]
        t_j = math.fsum(o.truth_joules for o in mine)  # type: ignore[misc]
        tenants[t] = {"requests": len(mine), "proxy_j": p_j, "truth_j": t_j, "err_pct": _pct(p_j, t_j)}
    abs_err = [abs(o.err_pct) for o in ok]  # type: ignore[arg-type]
    resp_abs = [abs(100.0 * (o.resp_joules - o.truth_joules) / o.truth_joules)
                for o in ok if o.resp_joules is not None and o.truth_joules]
    methods = {"measured": 0, "estimated": 0, "not visible": 0}
    for o in outcomes:
        if o.error is None:
            methods[o.resp_method if o.resp_method in methods else "not visible"] += 1
    visible = methods["measured"] + methods["estimated"]
    tenant_errs = [abs(v["err_pct"]) for v in tenants.values() if v["err_pct"] is not None]
    return {
        "config": setup.name,
        "source": setup.source,
        "interval_s": setup.interval_s,
        "requests": len(outcomes),
        "compared": len(ok),
        "errors": sum(1 for o in outcomes if o.error is not None),
        "not_measured": len(ok) - len(measured),
        # A dropped stream's engine may have made tokens the client never saw.
        "token_mismatches": sum(1 for o in ok if not o.aborted and (o.prompt_tokens, o.completion_tokens)
                                != (o.truth_prompt_tokens, o.truth_completion_tokens)),
        "aborted": sum(1 for o in outcomes if o.aborted),
        "classes": {"all": class_figures(ok),
                    **{c: class_figures([o for o in ok if o.cls == c]) for c in CLASSES}},
        "tenant_mismatches": sum(1 for o in ok if o.final_tenant != o.tenant),
        "fleet_proxy_j": s_proxy,
        "fleet_truth_j": s_truth,
        "fleet_err_pct": _pct(s_proxy, s_truth),
        "tenants": tenants,
        "tenant_max_abs_err_pct": max(tenant_errs) if tenant_errs else None,
        "median_abs_err_pct": _quantile(abs_err, 0.5),
        "p90_abs_err_pct": _quantile(abs_err, 0.9),
        "response_time_median_abs_err_pct": _quantile(resp_abs, 0.5),
        "method_at_response": methods,
        "measured_at_response_share": methods["measured"] / visible if visible else None,
        **energy,
    }


def energy_books(books: dict[str, Any] | None, sims_before: dict[str, dict[str, float]],
                 sims_after: dict[str, dict[str, float]], idle_w: dict[str, float],
                 outcomes: list[Outcome]) -> dict[str, Any]:
    """Conservation, two ways.

    conservation_pct (needs the proxy's books): |sum of the requests' final joules (the API) +
    the proxy's idle (+ share-mode carry) - the simulator's counter over the proxy's settled
    window| / that counter delta. The window's ends lie in idle time before the first and after
    the last request, so the counter there is extrapolated at the profile's idle power from a
    /sim/energy reading taken in the same idle stretch.

    conservation_ext_pct (the brief's fallback, no proxy books): |sum attributed (the API) + the
    simulators' idle joules - the simulators' joules| / the simulators' joules, whole lifetime.
    The simulators' idle is "nothing running on the engine", not the proxy's "nothing in flight".
    """
    per_backend_api: dict[str, float] = defaultdict(float)
    for o in outcomes:
        if o.final_joules is not None and o.backend:
            per_backend_api[o.backend] += o.final_joules
    sum_api = math.fsum(per_backend_api.values())
    sim_j = math.fsum(v["joules"] for v in sims_after.values())
    sim_idle = math.fsum(v["idle_joules"] for v in sims_after.values())
    out: dict[str, Any] = {
        "conservation_ext_pct": _pct(sum_api + sim_idle, sim_j),
        "sims": {n: {"before": sims_before.get(n), "after": sims_after.get(n)} for n in sims_after},
        "conservation_pct": None,
        "books": books,
    }
    if not books:
        return out
    window_j, proxy_j, internal, idle_excess, busy_j = [], [], [], [], []
    window_ok = True
    detail = {}
    for name, b in books.items():
        first_s, until_s = b.get("first_finalized_s"), b.get("finalized_until_s")
        before, after = sims_before.get(name), sims_after.get(name)
        if first_s is None or until_s is None or before is None or after is None:
            return out
        # The counter at the window's ends, extrapolated at idle power: valid only if the window
        # starts before `before` was read (before any request) and ends after the last request
        # on this engine ended and before `after` was read.
        last_end = max((o.truth_end_s for o in outcomes if o.backend == name and o.truth_end_s),
                       default=first_s)
        if not (first_s <= before["t"] and last_end <= until_s <= after["t"]):
            window_ok = False
        e_first = before["joules"] - idle_w[name] * (before["t"] - first_s)
        e_until = after["joules"] - idle_w[name] * (after["t"] - until_s)
        sim_window = e_until - e_first
        attributed, idle = b["finalized_joules_attributed"], b["finalized_joules_idle"]
        carried = b.get("carried_joules") or 0.0
        sim_idle = ((after["idle_joules"] - idle_w[name] * (after["t"] - until_s))
                    - (before["idle_joules"] - idle_w[name] * (before["t"] - first_s)))
        window_j.append(sim_window)
        proxy_j.append(per_backend_api[name] + idle + carried)
        idle_excess.append(idle + carried - sim_idle)
        busy_j.append(sim_window - sim_idle)
        internal.append(abs(attributed + idle + carried - b["finalized_joules_measured"]))
        detail[name] = {
            "sim_window_j": sim_window, "proxy_measured_j": b["finalized_joules_measured"],
            "proxy_attributed_j": attributed, "api_attributed_j": per_backend_api[name],
            "proxy_idle_j": idle, "proxy_carried_j": carried,
            "timeline_vs_counter_pct": _pct(b["finalized_joules_measured"], sim_window),
            "sim_idle_window_j": sim_idle, "idle_excess_j": idle + carried - sim_idle,
            "window_s": until_s - first_s,
        }
    total_window = math.fsum(window_j)
    out["conservation_pct"] = _pct(math.fsum(proxy_j), total_window)
    out["conservation_window_ok"] = window_ok
    out["books_internal_abs_j"] = math.fsum(internal)
    # Busy joules the proxy booked as idle (> 0) or idle joules it billed (< 0), as a share of
    # the joules the engines spent on requests in the window.
    out["idle_excess_j"] = math.fsum(idle_excess)
    out["idle_excess_pct_of_busy"] = 100.0 * math.fsum(idle_excess) / math.fsum(busy_j)
    out["books_detail"] = detail
    return out


def breakdown(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """Signed total error and median |error| per request class and per backend."""
    ok = [o for o in outcomes if o.err_pct is not None]

    def cls(o: Outcome) -> str:
        if o.kind == "embedding":
            return "embedding"
        return "aborted" if o.aborted else ("stream" if o.stream else "non-stream")

    def prefill(o: Outcome) -> str:
        share = o.prefill_share or 0.0
        return "prefill<10%" if share < 0.1 else ("prefill10-40%" if share < 0.4 else "prefill>=40%")

    def edge(o: Outcome) -> str:
        return "near-idle-edge" if o.near_idle_edge else "inside-busy"

    rows = []
    for label, key in (("class", cls), ("backend", lambda o: o.backend or "?"),
                       ("prefill", prefill), ("edge", edge)):
        groups: dict[str, list[Outcome]] = defaultdict(list)
        for o in ok:
            groups[key(o)].append(o)
        for g in sorted(groups):
            os_ = groups[g]
            p_j = math.fsum(o.final_joules for o in os_)  # type: ignore[misc]
            t_j = math.fsum(o.truth_joules for o in os_)  # type: ignore[misc]
            rows.append({"by": label, "group": g, "n": len(os_), "total_err_pct": _pct(p_j, t_j),
                         "median_abs_err_pct": _quantile([abs(o.err_pct) for o in os_], 0.5),  # type: ignore[arg-type]
                         "share_of_truth_pct": 100.0 * t_j / max(1e-9, math.fsum(
                             o.truth_joules for o in ok))})  # type: ignore[misc]
    return rows


# ----------------------------------------------------------------------------- processes


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def proxy_config(setup: Setup, sims: dict[str, Server], prefill_weight: float | None,
                 learn: bool = True) -> str:
    lines = ["server: {host: 127.0.0.1}", "backends:"]
    for name, sim in sims.items():
        base = f"http://{HOST}:{sim.port}"
        url = base + "/metrics" if setup.source == "dcgm" else base
        lines.append(f"  - {{name: {name}, url: '{base}/v1', models: [{MODEL}], power: "
                     f"{{source: {setup.source}, url: '{url}', interval_s: {setup.interval_s}}}}}")
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
                                    not self.args.no_learn))
        # Power from every backend, and at least two samples' worth of it, before any request.
        self.start_proxy(tag, cfg, "bench.attribution", self.args.plain_serve, ADMIN_KEY,
                         2.5 * self.setup.interval_s)

    def books(self) -> dict[str, Any] | None:
        return self.bench_route(BOOKS_PATH)


def run_setup(setup: Setup, args: argparse.Namespace, plan: list[Planned], log_dir: Path
              ) -> tuple[dict[str, Any], list[Outcome]]:
    from proxy.sim.profiles import get_profile

    run = Run(setup, args, log_dir)
    t_start = time.monotonic()
    try:
        run.start()
        assert run.proxy is not None
        startup_s = time.monotonic() - t_start
        sims_before = run.sim_energy()
        tag = f"{args.seed}-{setup.name.replace('@', '-').replace('.', '_').replace('+', '-')}"
        t_work = time.monotonic()
        outcomes = asyncio.run(drive(plan, f"http://{HOST}:{run.proxy.port}", args.concurrency, tag,
                                     closed_loop=setup.busy))
        workload_s = time.monotonic() - t_work
        settle_s = asyncio.run(wait_measured(f"http://{HOST}:{run.proxy.port}", outcomes,
                                             args.measure_timeout_s + 10 * setup.interval_s))
        asyncio.run(fetch_truth(run.sims, outcomes))
        books = run.books()
        split_weights = {b["name"]: b.get("split_weights") for b in _get_json(
            run.proxy.port, "/v1/energy/backends", ADMIN_KEY)["data"]}
        sims_after = run.sim_energy()
        proxy_log_errors = sum(1 for line in run.proxy.log_tail(10_000).splitlines()
                               if "Traceback" in line or " ERROR " in line)
    finally:
        run.stop()
    profiles = {name: get_profile(profile) for name, profile in setup.backends}
    prefill_j = {name: p.prefill_j_per_token() for name, p in profiles.items()}
    annotate(outcomes, setup.interval_s, prefill_j)
    idle_w = {name: p.idle_w for name, p in profiles.items()}
    energy = energy_books(books, sims_before, sims_after, idle_w, outcomes)
    summary = summarize(setup, outcomes, energy)
    summary.update(startup_s=startup_s, workload_s=workload_s, settle_s=settle_s,
                   total_s=time.monotonic() - t_start, proxy_log_errors=proxy_log_errors,
                   breakdown=breakdown(outcomes), calibration=calibration(outcomes, prefill_j),
                   split_weights=split_weights)
    return summary, outcomes


# ----------------------------------------------------------------------------- report


def _f(v: float | None, nd: int = 2, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.{nd}f}" if signed else f"{v:.{nd}f}"


def targets_for(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def target(cfg: str, name: str, value: float | None, limit: float) -> None:
        verdict = "N/A" if value is None else ("PASS" if value <= limit else "FAIL")
        out.append({"config": cfg, "target": name, "value": value, "limit": limit, "verdict": verdict})

    for s in summaries:
        cfg = s["config"]
        cons = s["conservation_pct"]
        label = "conservation |attributed + idle - measured| / measured %"
        if cons is None:
            cons = s["conservation_ext_pct"]
            label = "conservation (external: attributed + sims' idle vs sims' joules) %"
        target(cfg, label, None if cons is None else abs(cons), TARGET_CONSERVATION_PCT)
        for cls, f in s["classes"].items():
            if not f["n"]:
                continue
            if abs(s["interval_s"] - 0.1) < 1e-9:
                target(cfg, f"{cls}: per-tenant totals max |error| %", f["tenant_max_abs_err_pct"],
                       TARGET_100MS_TENANT_PCT)
                target(cfg, f"{cls}: per-request median |error| %", f["median_abs_err_pct"],
                       TARGET_100MS_MEDIAN_PCT)
                target(cfg, f"{cls}: per-request p90 |error| %", f["p90_abs_err_pct"],
                       TARGET_100MS_P90_PCT)
            if abs(s["interval_s"] - 1.0) < 1e-9:
                target(cfg, f"{cls}: per-tenant totals max |error| %", f["tenant_max_abs_err_pct"],
                       TARGET_1S_TENANT_PCT)
    return out


def print_classes(summaries: list[dict[str, Any]]) -> None:
    """One row per config and request class: the figures the targets are set on."""
    cols = ["config", "class", "n", "total err%", "tenant max%", "req med%", "req p90%", "cons%"]
    rows = []
    for s in summaries:
        cons = s["conservation_pct"] if s["conservation_pct"] is not None else s["conservation_ext_pct"]
        for cls, f in s["classes"].items():
            rows.append([s["config"], cls, str(f["n"]), _f(f["total_err_pct"], 2, True),
                         _f(f["tenant_max_abs_err_pct"]), _f(f["median_abs_err_pct"], 1),
                         _f(f["p90_abs_err_pct"], 1), _f(cons, 4, True) if cls == "all" else ""])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))


def print_table(summaries: list[dict[str, Any]]) -> None:
    cols = ["config", "reqs", "fleet err%", "cons%", "cons-ext%", "tenant max%", "req med%",
            "req p90%", "resp med%", "measured@resp", "est@resp", "n/v@resp"]
    rows = []
    for s in summaries:
        m = s["method_at_response"]
        share = s["measured_at_response_share"]
        rows.append([
            s["config"], f"{s['compared']}/{s['requests']}", _f(s["fleet_err_pct"], 2, True),
            _f(s["conservation_pct"], 4, True), _f(s["conservation_ext_pct"], 2, True),
            _f(s["tenant_max_abs_err_pct"]), _f(s["median_abs_err_pct"], 1),
            _f(s["p90_abs_err_pct"], 1), _f(s["response_time_median_abs_err_pct"], 1),
            "-" if share is None else f"{100 * share:.0f}% ({m['measured']})",
            str(m["estimated"]), str(m["not visible"]),
        ])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))


def print_breakdown(s: dict[str, Any]) -> None:
    print(f"  {s['config']}:")
    for by in ("class", "backend", "prefill", "edge"):
        parts = [f"{r['group']} n={r['n']} tot {_f(r['total_err_pct'], 1, True)}% "
                 f"med {_f(r['median_abs_err_pct'], 1)}%" for r in s["breakdown"] if r["by"] == by]
        print("    " + "; ".join(parts))
    if s.get("idle_excess_j") is not None:
        print(f"    proxy idle - engine idle over the window: {s['idle_excess_j']:+.1f} J "
              f"({s['idle_excess_pct_of_busy']:+.2f}% of the engines' busy joules)")
    learned = {n: w for n, w in (s.get("split_weights") or {}).items() if w}
    if learned:
        print("    split weights at the end (energy.learn): " + "; ".join(
            f"{n} prefill {w['prefill_weight']:.3f} + {w['prefill_weight_sq']:.2e}/tok, decode ctx "
            f"{w['decode_context_weight']:.2e}/tok{'' if w['learned'] else ' (prior)'}"
            for n, w in learned.items()))
    cal = s.get("calibration") or {}
    print("    implied prefill_weight from the truth: " + ", ".join(
        f"{n} {_f(c['implied_prefill_weight'], 3)} ({_f(c['prefill_j_per_token'], 3)} J/prompt tok"
        f" vs {_f(c['decode_j_per_token'], 3)} J/decode tok)" for n, c in cal.items()))


def print_worst(s: dict[str, Any], outcomes: list[Outcome], n: int) -> None:
    ok = sorted((o for o in outcomes if o.err_pct is not None), key=lambda o: -abs(o.err_pct or 0))
    print(f"\nworst {n} requests of {s['config']} (err% = (proxy - truth) / truth; conc = mean "
          "requests on that engine during it; idle = engine idle s before/after it)")
    print("   err%  tenant   kind        stream  be    prompt  compl  dur_s  ttft_s  conc  "
          "idle_b  idle_a  edge  pf%  truth_J  proxy_J")
    for o in ok[:n]:
        dur = (o.truth_end_s or 0) - (o.truth_arrival_s or 0)
        ttft = (o.truth_first_s - o.truth_arrival_s) if o.truth_first_s and o.truth_arrival_s else None
        stream = ("yes+u" if o.include_usage else "yes") if o.stream else "no"
        print(f"{o.err_pct:+7.1f}  {o.tenant:<7}  {o.kind:<10}  {stream:<6}  {o.backend or '?':<4}  "
              f"{o.truth_prompt_tokens or 0:>6}  {o.truth_completion_tokens or 0:>5}  {dur:5.2f}  "
              f"{_f(ttft, 3):>6}  {_f(o.backend_concurrency, 1):>4}  {_f(o.idle_before_s, 2):>6}  "
              f"{_f(o.idle_after_s, 2):>6}  {'yes' if o.near_idle_edge else 'no':>4}  "
              f"{100 * (o.prefill_share or 0):3.0f}  {o.truth_joules or 0:7.2f}  {o.final_joules or 0:7.2f}")


# ----------------------------------------------------------------------------- proxy wrapper


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


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.attribution",
        description="Per-request energy attribution vs simulator ground truth.",
    )
    ap.add_argument("--quick", action="store_true",
                    help="80 requests, only sim@100ms+skew2.5s, sim@1s and busy@100ms")
    ap.add_argument("--requests", type=int, default=None, help="requests per configuration "
                    "(default 200; 120 with --quick)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=16, help="max requests in flight")
    ap.add_argument("--only", default=None,
                    help="comma list of configs to run, e.g. sim@100ms,dcgm@1s")
    ap.add_argument("--prefill-weight", type=float, default=None,
                    help="energy.prefill_weight for the proxy (default: the proxy's own default)")
    ap.add_argument("--no-learn", action="store_true",
                    help="energy.learn: false (one fixed prefill_weight, no length/context terms)")
    ap.add_argument("--plain-serve", action="store_true",
                    help="run the stock `joulegate serve` (no books: external conservation only)")
    ap.add_argument("--measure-timeout-s", type=float, default=30.0,
                    help="how long to wait for every request to turn measured")
    ap.add_argument("--worst", type=int, default=10, help="worst requests listed for a missed target")
    ap.add_argument("--out", type=Path, default=None, help="JSON output path")
    ap.add_argument("--serve-proxy", metavar="CONFIG", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_proxy:
        return args
    setups = QUICK_SETUPS if args.quick else DEFAULT_SETUPS
    if args.only:
        by_name = {s.name: s for s in DEFAULT_SETUPS}
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        bad = [n for n in names if n not in by_name]
        if bad or not names:
            ap.error(f"--only: unknown config(s) {bad}; choose from {','.join(by_name)}")
        setups = tuple(by_name[n] for n in names)
    args.setups = setups
    if args.requests is None:
        args.requests = 80 if args.quick else 200
    if args.requests < 1 or args.concurrency < 1:
        ap.error("--requests and --concurrency must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_proxy:
        return serve_proxy(args.serve_proxy, args.port)
    plan = make_plan(args.requests, args.seed)
    started = time.time()
    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="jg-attr-"))
    kinds = defaultdict(int)
    for p in plan:
        kinds[p.cls] += 1
        kinds["stream" if p.stream else "non-stream"] += p.kind != "embedding"
        kinds["aborted"] += bool(p.abort_after)
    print(f"{len(plan)} requests per config (seed {args.seed}; {dict(kinds)}; arrivals over "
          f"{plan[-1].at_s:.1f} s in bursts; concurrency <= {args.concurrency}); configs: "
          f"{', '.join(s.name for s in args.setups)}; logs in {tmp}", flush=True)
    if load_before > 1.0:
        print(f"warning: 1-min load average {load_before:.2f} before start: other work on this "
              "box delays token delivery and skews per-request figures", flush=True)
    summaries: list[dict[str, Any]] = []
    all_outcomes: dict[str, list[Outcome]] = {}
    problems: list[str] = []
    with signals_as_interrupt():
        try:
            for setup in args.setups:
                try:
                    summary, outcomes = run_setup(setup, args, plan, tmp)
                except (OSError, RuntimeError, httpx.HTTPError) as exc:
                    problems.append(f"{setup.name}: {type(exc).__name__}: {exc}")
                    print(f"{setup.name}: FAILED: {exc}", file=sys.stderr, flush=True)
                    continue
                summaries.append(summary)
                all_outcomes[setup.name] = outcomes
                print(f"{setup.name}: {summary['compared']} compared, fleet "
                      f"{_f(summary['fleet_err_pct'], 2, True)}%, median "
                      f"{_f(summary['median_abs_err_pct'], 1)}%, run {summary['total_s']:.0f} s "
                      f"(workload {summary['workload_s']:.0f} s, settle {summary['settle_s']:.1f} s)",
                      flush=True)
                for what in ("errors", "not_measured", "token_mismatches", "tenant_mismatches",
                             "proxy_log_errors"):
                    if summary[what]:
                        problems.append(f"{setup.name}: {summary[what]} {what.replace('_', ' ')}")
                if summary.get("conservation_window_ok") is False:
                    problems.append(f"{setup.name}: the proxy's settled window does not lie "
                                    "between the idle readings; cons% is not trustworthy")
        except KeyboardInterrupt:
            print("\ninterrupted; processes stopped", file=sys.stderr)
            return 130

    print()
    print_table(summaries)
    print("\nper request class (chat: prompt < 2000 tokens, long: 2000-8000, embedding):")
    print_classes(summaries)
    targets = targets_for(summaries)
    print()
    for t in targets:
        print(f"{t['verdict']:<4}  {t['config']:<10} {t['target']}: {_f(t['value'], 3)} "
              f"(limit {t['limit']:g})")
    print("\nerror by request class and backend (tot = signed error of the group's total, "
          "med = median |error|):")
    for s in summaries:
        print_breakdown(s)
    failed = {t["config"] for t in targets if t["verdict"] == "FAIL"}
    for s in summaries:
        if s["config"] in failed:
            print_worst(s, all_outcomes[s["config"]], args.worst)
    print("\nconservation: cons% = (sum of final joules from the API + the proxy's idle joules "
          "- the simulators' counters over the proxy's settled window) / that; cons-ext% = "
          "(sum attributed + the simulators' own idle - the simulators' joules) / the latter.")
    for p in problems:
        print(f"problem: {p}")

    result = {
        "started_unix_s": started,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                 "python": platform.python_version(), "platform": platform.platform(),
                 "openai": openai.__version__, "loadavg_1m_before": load_before,
                 "loadavg_1m_after": os.getloadavg()[0], "git": _git_state()},
        "settings": {"requests": args.requests, "seed": args.seed, "concurrency": args.concurrency,
                     "configs": [s.name for s in args.setups], "prefill_weight": args.prefill_weight,
                     "learn": not args.no_learn,
                     "plain_serve": args.plain_serve, "backends": dict(BACKENDS),
                     "tenant_mix": TENANT_MIX},
        "plan": [asdict(p) for p in plan],
        "configs": summaries,
        "targets": targets,
        "requests": {name: [asdict(o) for o in outs] for name, outs in all_outcomes.items()},
        "problems": problems,
    }
    out = args.out
    if out is None:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        out = RESULTS_DIR / f"attribution-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}.json"
    out.write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    print(f"\nwrote {out}")
    if problems:
        print(f"logs kept in {tmp}")
        return 1
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _git_state() -> dict[str, Any]:
    """The commit the proxy code came from, and whether proxy/ or policies/ had local edits."""
    repo = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "proxy", "policies"], cwd=repo,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "proxy_dirty": None}
    return {"commit": rev or None, "proxy_dirty": bool(dirty) if rev else None}


def _json_default(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return str(v)


if __name__ == "__main__":
    sys.exit(main())
