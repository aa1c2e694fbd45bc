"""Routing bench: tokens/J and SLO attainment of the three policies across a load sweep.

    python -m bench.routing            # 10..90% of capacity, 5 seeds, 300 s traces
    python -m bench.routing --quick    # 10, 30, 60, 90%, 2 seeds, 60 s traces

Fleet: 2x h100, 2x a100, 2x l4 (`proxy/sim/profiles.py`), one `joulegate simulate` run per
(load, seed, policy) on a synthetic trace (`proxy/sim/traces.py` defaults: Gamma arrivals with
CV 1.5, Azure-conversation-like log-normal lengths). SLO per request: TTFT <= 2 s and TPOT <=
200 ms; attainment is the share of requests meeting both.

Capacity: the sum over the fleet's GPUs of the most requests/s each sustains for the trace
mix's mean prompt and output lengths with TPOT within the SLO (`fleet_capacity_rps`: decode
at the best batch up to max_batch, plus each request's prefill time). It is a fluid upper
bound: with bursty arrivals no policy meets the TTFT SLO for every request near 100%.

Also times one `efficiency` routing decision over 16 backends with trained models
(`time.perf_counter_ns` around each of many calls; the median, timer overhead included).
Writes bench/results/routing-<timestamp>.json and .svg (tokens/J vs offered load).

    python -m bench.routing --live     # the real proxy, ~5.5 min on 2 cores

Live: per policy (round_robin, least_loaded, efficiency) three fresh `joulegate sim-backend`s
(h100, a100, l4 profiles, all serving llama-3.1-8b; `power: {source: sim, interval_s: 0.1}`
and `metrics_url`) and one fresh proxy (`routing: {policy: P, slo: {ttft_ms: 2000,
tpot_ms: 200}}`). Each gets the same warm-up (a 12 s trace of another seed at the same rate,
then drained: the learned model starts from priors) and then the same seeded trace (25% of
the three GPUs' capacity, 60 s, outputs capped at 256 tokens), replayed open loop with the
async openai SDK, streamed with usage; TTFT and TPOT are measured by the client. After every
request is `measured` (`GET /v1/energy/requests/{id}`): tokens/J as the proxy attributed it
(sum of completion tokens / sum of final joules), the same including idle (sum of the
simulators' `/sim/energy` deltas from the trace start to its last request's end), SLO
attainment, p50/p99 TTFT, p99 TPOT, requests per backend, efficiency / round_robin and
efficiency / least_loaded, PASS/FAIL for the issue's >= 1.2x over round_robin. The proxy runs
as `python -m bench.routing --serve-proxy CONFIG --port P`: `joulegate serve`'s app under the
same uvicorn settings plus one read-only route, `GET /_bench/models` (what each backend's
learned model believes), recorded every 5 s and printed at the end against the profiles;
`--plain-serve` runs the stock `python -m proxy serve` instead. Writes
bench/results/routing-live-<timestamp>.json (every request included).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.attribution import Fleet, _quantile
from bench.overhead import HOST, signals_as_interrupt
from policies.base import BackendView, RequestInfo
from policies.efficiency import Efficiency
from policies.model import EfficiencyModel
from proxy.sim.fleet import POLICY_NAMES, fleet_capacity_rps, parse_fleet, simulate
from proxy.sim.plot import svg_lines
from proxy.sim.traces import TraceRequest, TraceShape, synth_trace

FLEET = {"backends": [
    {"name": "h100", "profile": "h100-llama3.1-8b", "count": 2},
    {"name": "a100", "profile": "a100-llama3.1-8b", "count": 2},
    {"name": "l4", "profile": "l4-llama3.1-8b", "count": 2},
]}
SLO_TTFT_S, SLO_TPOT_S = 2.0, 0.2
RESULTS = Path(__file__).parent / "results"


def capacity_rps() -> float:
    """The fleet's capacity for the synthetic trace mix (means from a long reference trace)."""
    reference = synth_trace(10.0, 5000.0, seed=12345)
    return fleet_capacity_rps(parse_fleet(FLEET), reference, SLO_TPOT_S)


def run_point(job: tuple[float, float, int, float, str]) -> dict[str, Any]:
    """One (load, seed, policy) simulation; runs in a worker process."""
    load, rate_rps, seed, duration_s, policy = job
    trace = synth_trace(rate_rps, duration_s, seed=seed)
    t0 = time.perf_counter()
    r = simulate(parse_fleet(FLEET), trace, policy, slo_ttft_s=SLO_TTFT_S, slo_tpot_s=SLO_TPOT_S)
    return {
        "load": load, "seed": seed, "policy": policy, "rate_rps": rate_rps,
        "requests": r.requests, "wall_s": time.perf_counter() - t0,
        "output_tokens_per_joule": r.output_tokens_per_joule,
        "joules_per_request": r.joules_per_request, "idle_energy_share": r.idle_energy_share,
        "slo_attainment": r.slo_attainment, "ttft_p99_ms": r.ttft_p99_ms,
        "tpot_p99_ms": r.tpot_p99_ms, "conservation_error_j": r.conservation_error_j,
        "utilisation": {b.name: b.utilisation for b in r.backends.values()},
        "requests_by_backend": {b.name: b.requests for b in r.backends.values()},
    }


def decision_ns(backends: int = 16, calls: int = 50_000, seed: int = 0) -> float:
    """Median ns of one `efficiency` choice among `backends` trained backends."""
    rng = random.Random(seed)
    models: dict[str, EfficiencyModel] = {}
    for b in range(backends):
        m = models[f"b{b}"] = EfficiencyModel()
        idle_w, peak_w = rng.uniform(25, 140), rng.uniform(70, 700)
        for i in range(600):  # a few minutes of 100 ms samples over a range of loads
            n = (i % 64) * 2
            m.observe_interval(n, idle_w + (peak_w - idle_w) * min(1.0, n / 128) ** 0.3,
                               n * 120.0 / (1 + n / 80), 0.1 * i, in_flight=n)
            m.observe_request(n + 1, 0.1 * i, ttft_s=0.05 + 0.01 * n, tpot_s=0.01 + 0.0003 * n,
                              waiting=1 + n // 16)
        m.refresh()
    policy = Efficiency(models)
    request = RequestInfo("m")
    view_sets = [[BackendView(f"b{b}", True, rng.randrange(0, 100)) for b in range(backends)]
                 for _ in range(64)]
    for views in view_sets:  # warm the plan caches
        policy.choose(request, views, 0.0)
    samples = []
    clock = time.perf_counter_ns
    for i in range(calls):
        views = view_sets[i & 63]
        t0 = clock()
        policy.choose(request, views, 0.0)
        samples.append(clock() - t0)
    return statistics.median(samples)


def summarise(rows: list[dict[str, Any]], loads: list[float]) -> dict[str, Any]:
    """Seed means per (load, policy), ratios and the issue's targets."""
    table: dict[float, dict[str, dict[str, float]]] = {}
    for load in loads:
        table[load] = {}
        for policy in POLICY_NAMES:
            pts = [r for r in rows if r["load"] == load and r["policy"] == policy]
            table[load][policy] = {k: statistics.fmean(p[k] for p in pts) for k in (
                "rate_rps", "output_tokens_per_joule", "joules_per_request",
                "idle_energy_share", "slo_attainment", "ttft_p99_ms", "tpot_p99_ms")}
    ratios = {load: {
        "vs_round_robin": table[load]["efficiency"]["output_tokens_per_joule"]
        / table[load]["round_robin"]["output_tokens_per_joule"],
        "vs_least_loaded": table[load]["efficiency"]["output_tokens_per_joule"]
        / table[load]["least_loaded"]["output_tokens_per_joule"],
        "slo_points_vs_round_robin": 100 * (table[load]["efficiency"]["slo_attainment"]
                                            - table[load]["round_robin"]["slo_attainment"]),
        "slo_points_vs_least_loaded": 100 * (table[load]["efficiency"]["slo_attainment"]
                                             - table[load]["least_loaded"]["slo_attainment"]),
    } for load in loads}
    low = [ratios[x]["vs_round_robin"] for x in loads if x <= 0.6 + 1e-9]
    low_ll = [ratios[x]["vs_least_loaded"] for x in loads if x <= 0.6 + 1e-9]
    top = max(loads)
    targets = {
        "tokens_per_joule_vs_rr_mean_10_60": statistics.fmean(low) if low else None,
        "tokens_per_joule_vs_ll_mean_10_60": statistics.fmean(low_ll) if low_ll else None,
        "tokens_per_joule_vs_rr_at_top": ratios[top]["vs_round_robin"],
        "tokens_per_joule_vs_ll_at_top": ratios[top]["vs_least_loaded"],
        "worst_slo_points_vs_rr": min(r["slo_points_vs_round_robin"] for r in ratios.values()),
        "worst_slo_points_vs_ll": min(r["slo_points_vs_least_loaded"] for r in ratios.values()),
    }
    return {"table": table, "ratios": ratios, "targets": targets}


def format_table(summary: dict[str, Any], loads: list[float]) -> str:
    table, ratios = summary["table"], summary["ratios"]
    head = f"{'load':>5}{'req/s':>7} |"
    for p in POLICY_NAMES:
        head += f" {p[:12]:>12} tok/J  SLO%   TTFT99 TPOT99 |"
    head += "  eff/rr eff/ll"
    lines = [head]
    for load in loads:
        row = f"{100 * load:>4.0f}%{table[load]['round_robin']['rate_rps']:>7.1f} |"
        for p in POLICY_NAMES:
            c = table[load][p]
            row += (f" {c['output_tokens_per_joule']:>18.3f}{100 * c['slo_attainment']:>6.1f}"
                    f"{c['ttft_p99_ms'] / 1e3:>8.2f}s{c['tpot_p99_ms']:>5.0f}ms |")
        row += f"  {ratios[load]['vs_round_robin']:>5.2f}x {ratios[load]['vs_least_loaded']:>5.2f}x"
        lines.append(row)
    return "\n".join(lines)


# ============================================================================== live
#
# `--live`: the same three policies on the real proxy in front of three real-time simulated
# GPUs, one fresh set of processes per policy, the same seeded trace for each.

LIVE_MODEL = "llama-3.1-8b"
LIVE_PROFILES = {"h100": "h100-llama3.1-8b", "a100": "a100-llama3.1-8b", "l4": "l4-llama3.1-8b"}
LIVE_POLICIES = ("round_robin", "least_loaded", "efficiency")
LIVE_TENANT_KEY = "sk-bench-routing-0001"
LIVE_ADMIN_KEY = "sk-bench-routing-admin-0009"
LIVE_INTERVAL_S = 0.1  # power sampling of every backend
LIVE_TARGET = 1.2  # issue 5: efficiency >= 1.2x round_robin tokens/J, live
MODELS_PATH = "/_bench/models"
PROBE_LOADS = (1, 2, 4, 8, 16, 32, 64, 128)
WAIT_PROBES = (1, 2, 4, 8, 16)


def live_shape(max_output: int) -> TraceShape:
    """The default trace shape with outputs capped (an L4 needs ~3 min for 2048 tokens)."""
    return TraceShape(output_max_tokens=max_output)


def live_fleet(order: list[str]) -> dict[str, Any]:
    return {"backends": [{"name": n, "profile": LIVE_PROFILES[n]} for n in order]}


def live_capacity_rps(order: list[str], max_output: int) -> float:
    """`capacity_rps` for the three live GPUs and the capped trace mix."""
    reference = synth_trace(10.0, 5000.0, seed=12345, shape=live_shape(max_output))
    return fleet_capacity_rps(parse_fleet(live_fleet(order)), reference, SLO_TPOT_S)


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


# ------------------------------------------------------------------ the proxy, inspectable


def model_state(app: Any, ttft_s: float, tpot_s: float) -> dict[str, Any]:
    """What each backend's learned model believes now (read-only)."""
    out: dict[str, Any] = {}
    for b in app.pool.backends:
        m = b.efficiency
        plan = m.plan(ttft_s, tpot_s)  # the same cached plan the policy reads
        load = b.engine_load
        power = {n: m.power_w(n) for n in PROBE_LOADS}
        rate = {n: m.tokens_per_s(n) for n in PROBE_LOADS}
        out[b.name] = {
            "t": time.time(), "version": m.version, "in_flight": b.in_flight, "waiting": m.waiting,
            "engine": None if load is None else [load.running, load.waiting],
            "idle_w": m.idle_w, "power_w": power, "tokens_per_s": rate,
            "j_per_token": {n: _finite(power[n] / rate[n]) if rate[n] > 0 else None
                            for n in PROBE_LOADS},
            "tpot_upper_ms": {n: _finite(1e3 * m.tpot_upper_s(n)) for n in PROBE_LOADS},
            "ttft_upper_ms": {q: _finite(1e3 * m.ttft_upper_s(q)) for q in WAIT_PROBES},
            "cap": _finite(plan.cap), "wait_cap": _finite(plan.wait_cap),
            "slo_cap": _finite(plan.slo_cap), "explore_limit": m.explore_limit(),
            # What the policy's price would be from idle for a step of d requests.
            "cost_from_idle": {d: _finite(plan.cost(0, float(d))) for d in (1, 4, 16)},
        }
    return out


def serve_proxy(config_path: str, port: int) -> int:
    """`joulegate serve` plus one read-only route, GET /_bench/models: each backend's learned
    efficiency model."""
    from bench.attribution import serve_with_route

    def models(app: Any, config: Any) -> Any:
        return model_state(app, config.routing.slo.ttft_ms / 1e3, config.routing.slo.tpot_ms / 1e3)

    return serve_with_route(config_path, port, MODELS_PATH, models)


def live_config(policy: str, sims: dict[str, Any], ledger: str = "memory://",
                tenant_keys: dict[str, str] | None = None, admin_key: str = LIVE_ADMIN_KEY) -> str:
    """The proxy's config: every backend metered by its simulator's power stream, its engine
    load scraped from /metrics; `tenant_keys` (name: key) default to the bench tenant."""
    from bench.attribution import sha256

    lines = ["server: {host: 127.0.0.1}", "backends:"]
    for name, sim in sims.items():
        base = f"http://{HOST}:{sim.port}"
        lines.append(f"  - {{name: {name}, url: '{base}/v1', models: [{LIVE_MODEL}], "
                     f"metrics_url: '{base}/metrics', "
                     f"power: {{source: sim, url: '{base}', interval_s: {LIVE_INTERVAL_S}}}}}")
    lines.append(f"routing: {{policy: {policy}, slo: {{ttft_ms: {SLO_TTFT_S * 1e3:g}, "
                 f"tpot_ms: {SLO_TPOT_S * 1e3:g}}}}}")
    lines.append("energy: {idle: separate}")
    lines.append(f"ledger: '{ledger}'")
    lines.append("tenants:")
    for tenant, key in (tenant_keys or {"bench": LIVE_TENANT_KEY}).items():
        lines.append(f"  - {{name: {tenant}, api_keys_sha256: ['{sha256(key)}']}}")
    lines.append(f"admin_api_keys_sha256: ['{sha256(admin_key)}']")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ one request, one trace


@dataclass
class LiveOutcome:
    """One request as the client saw it (monotonic seconds), then as the proxy booked it."""

    index: int
    request_id: str
    phase: str  # warmup | trace
    prompt_tokens: int
    max_tokens: int
    lag_s: float = 0.0  # sent this late after its trace time (the client's own delay)
    sent_s: float = 0.0
    first_s: float | None = None
    last_s: float | None = None
    done_s: float = 0.0
    usage_completion_tokens: int | None = None
    header_backend: str | None = None
    error: str | None = None
    backend: str | None = None
    joules: float | None = None
    method: str | None = None
    completion_tokens: int | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_s is None else self.first_s - self.sent_s

    @property
    def tpot_s(self) -> float | None:
        n = self.usage_completion_tokens or 0
        if self.first_s is None or self.last_s is None or n < 2:
            return None
        return (self.last_s - self.first_s) / (n - 1)

    def meets_slo(self) -> bool:
        ttft, tpot = self.ttft_s, self.tpot_s
        return (self.error is None and ttft is not None and ttft <= SLO_TTFT_S
                and (tpot is None or tpot <= SLO_TPOT_S))


_WORDS = "".join(f"joule{i % 97} watt{i % 89} " for i in range(2600))  # > 32768 chars


def prompt_text(tokens: int, salt: int) -> str:
    """Text the simulator counts as `tokens` chat prompt tokens (ceil(chars / 4) + 3)."""
    chars = 4 * max(1, tokens - 3)
    start = (salt * 131) % 1000
    return (_WORDS[start:] + _WORDS)[:chars]


async def send_streamed(client: Any, o: LiveOutcome, salt: int) -> None:
    stream = await client.chat.completions.create(
        model=LIVE_MODEL, messages=[{"role": "user", "content": prompt_text(o.prompt_tokens, salt)}],
        max_tokens=o.max_tokens, stream=True, stream_options={"include_usage": True},
        extra_headers={"x-request-id": o.request_id})
    o.header_backend = stream.response.headers.get("x-energy-backend")
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.monotonic()
            if o.first_s is None:
                o.first_s = now
            o.last_s = now
        if chunk.usage is not None:
            o.usage_completion_tokens = chunk.usage.completion_tokens


async def replay(client: Any, trace: list[TraceRequest], tag: str, phase: str,
                 at_last_arrival: Any = None) -> list[LiveOutcome]:
    """Open loop: each request is sent at its trace time, whatever is still in flight."""
    import openai

    t0 = time.monotonic() + 0.2

    async def one(i: int, r: TraceRequest) -> LiveOutcome:
        o = LiveOutcome(i, f"rt-{tag}-{phase}-{i:04d}", phase, r.prompt_tokens, r.output_tokens)
        await asyncio.sleep(max(0.0, t0 + r.arrival_s - time.monotonic()))
        o.sent_s = time.monotonic()
        o.lag_s = o.sent_s - (t0 + r.arrival_s)
        try:
            await send_streamed(client, o, i)
        except openai.OpenAIError as exc:
            o.error = f"{type(exc).__name__}: {exc}"[:300]
        o.done_s = time.monotonic()
        return o

    async def last_arrival() -> Any:
        await asyncio.sleep(max(0.0, t0 + trace[-1].arrival_s - time.monotonic()))
        return await at_last_arrival()

    tasks = [one(i, r) for i, r in enumerate(trace)]
    if at_last_arrival is None:
        return list(await asyncio.gather(*tasks))
    marker = asyncio.ensure_future(last_arrival())
    outcomes = list(await asyncio.gather(*tasks))
    await marker
    return outcomes


async def wait_measured_live(proxy_url: str, outcomes: list[LiveOutcome], timeout_s: float
                             ) -> float:
    """Poll `/v1/energy/requests/{id}` until every successful request is `measured`."""
    import httpx

    started = time.monotonic()
    pending = [o for o in outcomes if o.error is None]
    sem = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=proxy_url, timeout=10.0,
                                 headers={"Authorization": f"Bearer {LIVE_ADMIN_KEY}"}) as http:

        async def poll(o: LiveOutcome) -> bool:
            async with sem:
                r = await http.get(f"/v1/energy/requests/{o.request_id}")
            if r.status_code != 200:
                return False
            d = r.json()
            o.joules, o.method, o.backend = d.get("joules"), d.get("method"), d.get("backend")
            o.completion_tokens = d.get("completion_tokens")
            return o.method == "measured"

        while pending and time.monotonic() - started < timeout_s:
            done = await asyncio.gather(*(poll(o) for o in pending))
            pending = [o for o, ok in zip(pending, done, strict=True) if not ok]
            if pending:
                await asyncio.sleep(0.25)
    return time.monotonic() - started


# ------------------------------------------------------------------ one policy


class LivePolicyRun(Fleet):
    """Three fresh simulated GPUs and one fresh proxy with `policy`; `stop()` ends them."""

    def __init__(self, policy: str, order: list[str], log_dir: Path, plain_serve: bool) -> None:
        super().__init__(log_dir)
        self.policy = policy
        self.order = order
        self.plain_serve = plain_serve

    @property
    def url(self) -> str:
        assert self.proxy is not None
        return f"http://{HOST}:{self.proxy.port}"

    def start(self) -> None:
        from bench.attribution import start_sims

        start_sims(self.sims, [(name, LIVE_PROFILES[name]) for name in self.order], LIVE_MODEL,
                   self.log_dir, self.policy)
        cfg = self.log_dir / f"{self.policy}-joulegate.yaml"
        cfg.write_text(live_config(self.policy, self.sims))
        # Power from every backend for a second (the models learn the idle power) first.
        self.start_proxy(self.policy, cfg, "bench.routing", self.plain_serve, LIVE_ADMIN_KEY, 1.0)

    def backends(self) -> list[dict[str, Any]]:
        from bench.attribution import _get_json

        assert self.proxy is not None
        return _get_json(self.proxy.port, "/v1/energy/backends", LIVE_ADMIN_KEY)["data"]

    def models(self) -> dict[str, Any] | None:
        return self.bench_route(MODELS_PATH)


def live_policy(policy: str, args: argparse.Namespace, warmup: list[TraceRequest],
                trace: list[TraceRequest], log_dir: Path) -> dict[str, Any]:
    """One policy: start, warm up, drain, replay the trace, wait for `measured`, stop."""
    import httpx
    import openai

    run = LivePolicyRun(policy, args.order, log_dir, args.plain_serve)
    t_start = time.monotonic()
    timeline: list[dict[str, Any]] = []
    try:
        run.start()
        startup_s = time.monotonic() - t_start

        async def phases() -> dict[str, Any]:
            limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200,
                                  keepalive_expiry=2.0)
            client = openai.AsyncOpenAI(
                base_url=run.url + "/v1", api_key=LIVE_TENANT_KEY, max_retries=0, timeout=600.0,
                http_client=openai.DefaultAsyncHttpxClient(limits=limits))
            stop = asyncio.Event()

            async def watch() -> None:  # what the proxy believed, every few seconds
                while not stop.is_set():
                    views = await asyncio.to_thread(run.backends)
                    models = await asyncio.to_thread(run.models)
                    timeline.append({"t": time.time(), "backends": views, "models": models})
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), args.watch_s)

            watcher = asyncio.ensure_future(watch())
            try:
                t_w = time.monotonic()
                warm = await replay(client, warmup, policy, "warmup") if warmup else []
                warm_s = time.monotonic() - t_w
                # Drain: nothing of the warm-up may still run when the trace starts.
                t_d = time.monotonic()
                for _ in range(600):  # 60 s at most
                    if not any(b["in_flight"] for b in await asyncio.to_thread(run.backends)):
                        break
                    await asyncio.sleep(0.1)
                await asyncio.sleep(0.3)
                drain_s = time.monotonic() - t_d
                models_before = await asyncio.to_thread(run.models)
                e_start = await asyncio.to_thread(run.sim_energy)
                marks: dict[str, Any] = {}

                async def at_last_arrival() -> None:
                    marks["e_last_arrival"] = await asyncio.to_thread(run.sim_energy)

                t_w = time.monotonic()
                outcomes = await replay(client, trace, policy, "trace", at_last_arrival)
                trace_wall_s = time.monotonic() - t_w
                e_end = await asyncio.to_thread(run.sim_energy)
                settle_s = await wait_measured_live(run.url, outcomes, args.measure_timeout_s)
                models_after = await asyncio.to_thread(run.models)
                views_after = await asyncio.to_thread(run.backends)
            finally:
                stop.set()
                await watcher
                await client.close()
            return {"warmup": warm, "outcomes": outcomes, "warmup_s": warm_s, "drain_s": drain_s,
                    "trace_wall_s": trace_wall_s, "settle_s": settle_s, "e_start": e_start,
                    "e_last_arrival": marks.get("e_last_arrival"), "e_end": e_end,
                    "models_before": models_before, "models_after": models_after,
                    "views_after": views_after}

        got = asyncio.run(phases())
        assert run.proxy is not None
        log_errors = sum(1 for line in run.proxy.log_tail(20_000).splitlines()
                         if "Traceback" in line or " ERROR " in line)
    finally:
        run.stop()
    result = summarise_live(policy, got)
    result.update(startup_s=startup_s, total_s=time.monotonic() - t_start,
                  proxy_log_errors=log_errors, timeline=timeline)
    return result


def summarise_live(policy: str, got: dict[str, Any]) -> dict[str, Any]:
    outs: list[LiveOutcome] = got["outcomes"]
    ok = [o for o in outs if o.error is None]
    measured = [o for o in ok if o.method == "measured" and o.joules is not None]
    tokens = sum(o.completion_tokens or 0 for o in measured)
    proxy_j = math.fsum(o.joules for o in measured)  # type: ignore[misc]
    e0, e1, ea = got["e_start"], got["e_end"], got["e_last_arrival"]
    names = list(e0)
    fleet_j = math.fsum(e1[n]["joules"] - e0[n]["joules"] for n in names)
    busy_j = math.fsum(e1[n]["attributed_joules"] - e0[n]["attributed_joules"] for n in names)
    idle_j = math.fsum(e1[n]["idle_joules"] - e0[n]["idle_joules"] for n in names)
    # The simulator's convention: busy joules of the whole run + idle only up to the last
    # arrival (a service would fill the tail with the next requests).
    sim_conv_j = None if ea is None else busy_j + math.fsum(
        ea[n]["idle_joules"] - e0[n]["idle_joules"] for n in names)
    all_tokens = sum(o.usage_completion_tokens or 0 for o in ok)
    ttft = [o.ttft_s for o in ok if o.ttft_s is not None]
    tpot = [o.tpot_s for o in ok if o.tpot_s is not None]
    per_backend: dict[str, dict[str, Any]] = {}
    for n in names:
        mine = [o for o in measured if o.backend == n]
        per_backend[n] = {
            "requests": sum(1 for o in ok if (o.backend or o.header_backend) == n),
            "completion_tokens": sum(o.completion_tokens or 0 for o in mine),
            "proxy_j": math.fsum(o.joules for o in mine),  # type: ignore[misc]
            "sim_busy_j": e1[n]["attributed_joules"] - e0[n]["attributed_joules"],
            "sim_j": e1[n]["joules"] - e0[n]["joules"],
            "slo_met": sum(1 for o in ok if (o.backend or o.header_backend) == n and o.meets_slo()),
            "ttft_p99_s": _quantile([o.ttft_s for o in ok if (o.backend or o.header_backend) == n
                                     and o.ttft_s is not None], 0.99),
        }
    warm: list[LiveOutcome] = got["warmup"]
    return {
        "policy": policy,
        "requests": len(outs), "ok": len(ok), "errors": len(outs) - len(ok),
        "measured": len(measured), "not_measured": len(ok) - len(measured),
        "token_mismatches": sum(1 for o in measured if o.completion_tokens != o.usage_completion_tokens),
        "completion_tokens": tokens, "proxy_j": proxy_j,
        "tokens_per_j_proxy": tokens / proxy_j if proxy_j > 0 else None,
        "fleet_j": fleet_j, "sim_busy_j": busy_j, "sim_idle_j": idle_j,
        "tokens_per_j_with_idle": all_tokens / fleet_j if fleet_j > 0 else None,
        "sim_convention_j": sim_conv_j,
        "tokens_per_j_sim_convention": (all_tokens / sim_conv_j) if sim_conv_j else None,
        "proxy_vs_sim_busy_pct": 100.0 * (proxy_j - busy_j) / busy_j if busy_j > 0 else None,
        "slo_attainment": sum(1 for o in outs if o.meets_slo()) / len(outs) if outs else 0.0,
        "ttft_p50_s": _quantile(ttft, 0.5), "ttft_p99_s": _quantile(ttft, 0.99),
        "tpot_p50_ms": None if not tpot else 1e3 * (_quantile(tpot, 0.5) or 0.0),
        "tpot_p99_ms": None if not tpot else 1e3 * (_quantile(tpot, 0.99) or 0.0),
        "client_lag_max_s": max((o.lag_s for o in outs), default=0.0),
        "backends": per_backend,
        "warmup": {"requests": len(warm), "errors": sum(1 for o in warm if o.error),
                   "by_backend": {n: sum(1 for o in warm if o.header_backend == n) for n in names},
                   "first_backends": [o.header_backend for o in warm[:5]],
                   "wall_s": got["warmup_s"], "drain_s": got["drain_s"]},
        "trace_wall_s": got["trace_wall_s"], "settle_s": got["settle_s"],
        "models_before": got["models_before"], "models_after": got["models_after"],
        "views_after": got["views_after"],
        "outcomes": [asdict(o) for o in outs],
    }


# ------------------------------------------------------------------ report


def _v(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def print_live(results: dict[str, dict[str, Any]], order: list[str]) -> dict[str, Any]:
    head = (f"{'policy':<13}{'ok':>9}  {'tok/J proxy':>11}  {'tok/J +idle':>11}  {'SLO%':>6}  "
            f"{'TTFT p50':>8}  {'TTFT p99':>8}  {'TPOT p99':>8}  {'proxy/sim busy':>14}  "
            + "  ".join(f"{n:>5}" for n in order))
    print(head)
    for p, r in results.items():
        print(f"{p:<13}{r['ok']:>4}/{r['requests']:<4}  {_v(r['tokens_per_j_proxy'], '11.3f')}  "
              f"{_v(r['tokens_per_j_with_idle'], '11.3f')}  {100 * r['slo_attainment']:6.1f}  "
              f"{_v(r['ttft_p50_s'], '7.2f')}s  {_v(r['ttft_p99_s'], '7.2f')}s  "
              f"{_v(r['tpot_p99_ms'], '6.0f')}ms  {_v(r['proxy_vs_sim_busy_pct'], '+13.2f')}%  "
              + "  ".join(f"{r['backends'][n]['requests']:>5}" for n in order))
    ratios: dict[str, Any] = {}
    eff = results.get("efficiency")
    for base in ("round_robin", "least_loaded"):
        b = results.get(base)
        if eff is None or b is None:
            continue
        ratios[base] = {
            "proxy": _ratio(eff["tokens_per_j_proxy"], b["tokens_per_j_proxy"]),
            "with_idle": _ratio(eff["tokens_per_j_with_idle"], b["tokens_per_j_with_idle"]),
            "sim_convention": _ratio(eff["tokens_per_j_sim_convention"],
                                     b["tokens_per_j_sim_convention"]),
            "slo_points": 100 * (eff["slo_attainment"] - b["slo_attainment"]),
        }
        r = ratios[base]
        print(f"efficiency / {base}: tokens/J (proxy-attributed) {_v(r['proxy'], '.2f')}x, "
              f"incl. idle {_v(r['with_idle'], '.2f')}x (idle to the last arrival only: "
              f"{_v(r['sim_convention'], '.2f')}x); SLO {r['slo_points']:+.1f} points")
    verdict = None
    if "round_robin" in ratios and ratios["round_robin"]["proxy"] is not None:
        value = ratios["round_robin"]["proxy"]
        verdict = "PASS" if value >= LIVE_TARGET else "FAIL"
        print(f"{verdict}  live: efficiency >= {LIVE_TARGET}x round_robin tokens/J as the proxy "
              f"attributed it: {value:.2f}x")
    return {"ratios": ratios, "verdict": verdict}


def print_models(results: dict[str, dict[str, Any]], order: list[str]) -> None:
    """Learned model vs the profile's truth after each run, at a few decoding batches."""
    from proxy.sim.profiles import get_profile

    loads = (1, 4, 16, 64)
    print("\nlearned model at the end of each run vs the profile (J/token = P/R at a steady "
          "decoding batch n; cap: most in flight the SLO guard allows; wait_cap: most awaiting "
          "first token; cost0(d): the policy's price from idle for a step of d requests):")
    for p, r in results.items():
        models = r.get("models_after")
        if not models:
            continue
        print(f"  {p}:")
        for n in order:
            m = models.get(n)
            if m is None:
                continue
            prof = get_profile(LIVE_PROFILES[n])
            jpt = "  ".join(
                f"n={k}: {_v(m['j_per_token'].get(str(k)), '.3f')}"
                f"/{prof.joules_per_token(min(k, prof.max_batch)):.3f}" for k in loads)
            cost = " ".join(_v(m["cost_from_idle"].get(str(d)), ".2f") for d in (1, 4, 16))
            print(f"    {n:<5} idle {m['idle_w']:5.1f}/{prof.idle_w:5.1f} W  J/tok model/truth {jpt}"
                  f"  cap {_v(m['cap'], '.0f')} wait_cap {_v(m['wait_cap'], '.0f')}"
                  f"  cost0(1,4,16) {cost}")


def main_live(args: argparse.Namespace) -> int:
    import httpx

    order = [n.strip() for n in args.order.split(",") if n.strip()]
    if sorted(order) != sorted(LIVE_PROFILES):
        print(f"--order must name each of {', '.join(LIVE_PROFILES)} once", file=sys.stderr)
        return 2
    args.order = order
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if any(p not in LIVE_POLICIES for p in policies):
        print(f"--policies: choose from {', '.join(LIVE_POLICIES)}", file=sys.stderr)
        return 2
    shape = live_shape(args.max_output)
    capacity = live_capacity_rps(order, args.max_output)
    rate = args.load * capacity
    trace = synth_trace(rate, args.trace_s, seed=args.seed, shape=shape)
    warmup = (synth_trace(rate, args.warmup_s, seed=args.seed + 1000, shape=shape)
              if args.warmup_s > 0 else [])
    # What the virtual-time fleet predicts for the same trace (no warm-up, idle to the last
    # arrival): the reference the live run is checked against.
    predicted = {}
    for p in policies:
        s = simulate(parse_fleet(live_fleet(order)), trace, p, slo_ttft_s=SLO_TTFT_S,
                     slo_tpot_s=SLO_TPOT_S)
        predicted[p] = {"tokens_per_j": s.output_tokens_per_joule,
                        "busy_tokens_per_j": s.output_tokens / max(1e-9, s.joules - s.idle_joules),
                        "slo_attainment": s.slo_attainment, "makespan_s": s.makespan_s,
                        "requests_by_backend": {b.name: b.requests for b in s.backends.values()}}
    mean_out = statistics.fmean(r.output_tokens for r in trace)
    print(f"live: {', '.join(f'{n} ({LIVE_PROFILES[n]})' for n in order)}, one fresh set per "
          f"policy; capacity {capacity:.1f} req/s for the mix (outputs capped at "
          f"{args.max_output}); load {100 * args.load:.0f}% = {rate:.2f} req/s; trace seed "
          f"{args.seed}: {len(trace)} requests over {args.trace_s:g} s (mean prompt "
          f"{statistics.fmean(r.prompt_tokens for r in trace):.0f}, output {mean_out:.0f} tokens); "
          f"warm-up: {len(warmup)} requests over {args.warmup_s:g} s (seed {args.seed + 1000}, "
          f"same rate), then drained; SLO TTFT <= {SLO_TTFT_S:g} s, TPOT <= "
          f"{SLO_TPOT_S * 1e3:g} ms", flush=True)
    load_before = os.getloadavg()[0]
    if load_before > 1.0:
        print(f"warning: 1-min load average {load_before:.2f} before start", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="jg-routing-live-"))
    results: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    started = time.time()
    with signals_as_interrupt():
        try:
            for p in policies:
                try:
                    r = live_policy(p, args, warmup, trace, tmp)
                except (OSError, RuntimeError, httpx.HTTPError) as exc:
                    problems.append(f"{p}: {type(exc).__name__}: {exc}")
                    print(f"{p}: FAILED: {exc}", file=sys.stderr, flush=True)
                    continue
                results[p] = r
                print(f"{p}: {r['ok']}/{r['requests']} ok, {r['measured']} measured; startup "
                      f"{r['startup_s']:.1f} s, warm-up {r['warmup']['wall_s']:.0f} s + drain "
                      f"{r['warmup']['drain_s']:.1f} s (warm-up went {r['warmup']['by_backend']}),"
                      f" trace {r['trace_wall_s']:.0f} s, settle {r['settle_s']:.1f} s; total "
                      f"{r['total_s']:.0f} s", flush=True)
                for what in ("errors", "not_measured", "token_mismatches", "proxy_log_errors"):
                    if r[what]:
                        problems.append(f"{p}: {r[what]} {what.replace('_', ' ')}")
        except KeyboardInterrupt:
            print("\ninterrupted; processes stopped", file=sys.stderr)
            return 130
    print()
    verdict = print_live(results, order) if results else {"ratios": {}, "verdict": None}
    print("\nvirtual-time prediction for the same trace (joulegate simulate; no warm-up; tokens/J "
          "with idle to the last arrival / busy only):")
    for p, s in predicted.items():
        print(f"  {p:<13} {s['tokens_per_j']:.3f} / {s['busy_tokens_per_j']:.3f} tok/J, SLO "
              f"{100 * s['slo_attainment']:.1f}%, requests {s['requests_by_backend']}")
    print_models(results, order)
    for p in problems:
        print(f"problem: {p}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"routing-live-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}.json"
    out.write_text(json.dumps({
        "settings": {"order": order, "profiles": LIVE_PROFILES, "load": args.load,
                     "capacity_rps": capacity, "rate_rps": rate, "trace_s": args.trace_s,
                     "warmup_s": args.warmup_s, "seed": args.seed, "max_output": args.max_output,
                     "slo": {"ttft_s": SLO_TTFT_S, "tpot_s": SLO_TPOT_S},
                     "power_interval_s": LIVE_INTERVAL_S, "plain_serve": args.plain_serve,
                     "loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0]},
        "results": results, "summary": verdict, "predicted": predicted, "problems": problems,
        "wall_s": time.time() - started,
    }, indent=1, default=str) + "\n")
    print(f"\nwrote {out} ({time.time() - started:.0f} s)")
    if problems:
        print(f"logs kept in {tmp}")
        return 1
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 loads, 2 seeds, 60 s traces")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per load (default 5)")
    parser.add_argument("--duration-s", type=float, default=None, help="trace length (default 300)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--no-micro", action="store_true", help="skip the decision micro-benchmark")
    live = parser.add_argument_group("live (--live)")
    live.add_argument("--live", action="store_true",
                      help="the policies on the real proxy in front of three sim-backends")
    live.add_argument("--load", type=float, default=0.25,
                      help="offered load, share of the three GPUs' capacity (default 0.25)")
    live.add_argument("--trace-s", type=float, default=60.0, help="measured trace (default 60)")
    live.add_argument("--warmup-s", type=float, default=12.0,
                      help="warm-up trace before it, same rate, other seed (default 12; 0: none)")
    live.add_argument("--seed", type=int, default=1, help="trace seed (default 1)")
    live.add_argument("--max-output", type=int, default=256,
                      help="output tokens cap of the trace (default 256)")
    live.add_argument("--order", default="h100,a100,l4", help="backends as listed in the config")
    live.add_argument("--policies", default=",".join(LIVE_POLICIES))
    live.add_argument("--plain-serve", action="store_true",
                      help="stock `joulegate serve` (no /_bench/models: no model dump)")
    live.add_argument("--measure-timeout-s", type=float, default=30.0)
    live.add_argument("--watch-s", type=float, default=5.0,
                      help="how often the proxy's backends and models are recorded")
    parser.add_argument("--serve-proxy", metavar="CONFIG", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_proxy:
        return serve_proxy(args.serve_proxy, args.port)
    if args.live:
        if not (0 < args.load and args.trace_s > 0 and args.warmup_s >= 0 and args.max_output >= 1):
            parser.error("--load, --trace-s and --max-output must be positive, --warmup-s >= 0")
        return main_live(args)
    loads = [0.1, 0.3, 0.6, 0.9] if args.quick else [x / 10 for x in range(1, 10)]
    seeds = args.seeds or (2 if args.quick else 5)
    duration_s = args.duration_s or (60.0 if args.quick else 300.0)

    capacity = capacity_rps()
    print(f"fleet: 2x h100, 2x a100, 2x l4; capacity {capacity:.1f} req/s for the trace mix; "
          f"{len(loads)} loads x {seeds} seeds x {len(POLICY_NAMES)} policies, {duration_s:g} s traces")
    jobs = [(load, load * capacity, seed, duration_s, policy)
            for load in loads for seed in range(seeds) for policy in POLICY_NAMES]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(run_point, jobs))
    sweep_s = time.perf_counter() - t0
    summary = summarise(rows, loads)
    print(format_table(summary, loads))
    t = summary["targets"]
    print(f"efficiency vs round_robin, tokens/J: mean over 10-60% {t['tokens_per_joule_vs_rr_mean_10_60']:.2f}x "
          f"(target >= 1.4x), at {100 * max(loads):.0f}% {t['tokens_per_joule_vs_rr_at_top']:.2f}x (target >= 1.1x); "
          f"worst SLO difference {t['worst_slo_points_vs_rr']:+.2f} points (target >= -0.5)")
    print(f"efficiency vs least_loaded, tokens/J: mean over 10-60% {t['tokens_per_joule_vs_ll_mean_10_60']:.2f}x, "
          f"at {100 * max(loads):.0f}% {t['tokens_per_joule_vs_ll_at_top']:.2f}x; "
          f"worst SLO difference {t['worst_slo_points_vs_ll']:+.2f} points")
    worst_err = max(r["conservation_error_j"] for r in rows)
    print(f"energy conservation: worst |request truth - (counter - idle)| {worst_err:.2e} J; "
          f"sweep {sweep_s:.0f} s on {args.jobs} processes, {sum(r['requests'] for r in rows)} requests")
    micro_ns = None
    if not args.no_micro:
        micro_ns = decision_ns()
        print(f"efficiency decision, 16 backends: median {micro_ns / 1e3:.1f} us (target <= 20 us)")

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = {"settings": {"loads": loads, "seeds": seeds, "duration_s": duration_s,
                        "capacity_rps": capacity, "fleet": FLEET,
                        "slo": {"ttft_s": SLO_TTFT_S, "tpot_s": SLO_TPOT_S}},
           "summary": summary, "rows": rows, "decision_median_ns": micro_ns, "sweep_s": sweep_s}
    json_path = RESULTS / f"routing-{stamp}.json"
    json_path.write_text(json.dumps(out, indent=1, default=str))
    series = {p: [(100 * load, summary["table"][load][p]["output_tokens_per_joule"]) for load in loads]
              for p in POLICY_NAMES}
    svg_path = RESULTS / f"routing-{stamp}.svg"
    svg_path.write_text(svg_lines(series, title="output tokens/J vs offered load (2x h100, 2x a100, 2x l4)",
                                  x_label="offered load, % of fleet capacity", y_label="output tokens / J"))
    slo = {p: [(100 * load, 100 * summary["table"][load][p]["slo_attainment"]) for load in loads]
           for p in POLICY_NAMES}
    slo_path = RESULTS / f"routing-{stamp}-slo.svg"
    slo_path.write_text(svg_lines(slo, title="SLO attainment (TTFT <= 2 s and TPOT <= 200 ms)",
                                  x_label="offered load, % of fleet capacity",
                                  y_label="requests meeting the SLO, %"))
    print(f"wrote {json_path}, {svg_path} and {slo_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
