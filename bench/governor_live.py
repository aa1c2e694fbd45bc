"""Live governor bench: the demo's simulated fleet twice, side by side, under one workload.

Two copies of `joulegate demo`'s fleet (H100, A100 and L4 simulators serving llama-3.1-8b), each
behind its own proxy routing by `efficiency`: one with `governor.mode: off`, one with `apply`
(caps through the simulators' power-limits API, idle backends parked through their vLLM-style
`/sleep` and `/wake_up`). Every request of one seeded open-loop workload (streamed chats through
the official openai SDK) goes to both proxies at the same moment, so both fleets see the same
traffic over the same wall-clock window. Printed per fleet: joules per output token with idle
energy included (the simulators' own counters over the window), TTFT p50/p99, and for the
governed fleet its caps and parked backends at the end.

    python -m bench.governor_live                      # 120 s at 1.5 req/s, seed 1
    python -m bench.governor_live --duration-s 60 --rate 3 --seed 2
    python -m bench.governor_live --rate 5 --slo-target 0.95   # the governed fleet with a target
    python -m bench.governor_live --rate 5 --slo-target 0.9 --interval-s 6 --duration-s 180

Units: seconds, joules, watts.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from proxy.demo import FLEET, MODEL, _free_port, _spawn, _stop, _wait_http

MODES = ("off", "apply")
INTERVAL_S = 2.0  # the governor's decision interval here (the default 15 s would need a long run)
WAKE_S = 2.0  # the simulators' wake-up time

CONFIG = """\
server: {{host: 127.0.0.1, port: {port}}}
backends:
{backends}
routing: {{policy: efficiency, slo: {{ttft_ms: 2000, tpot_ms: 200}}}}
governor: {{mode: {mode}, interval_s: {interval_s}{extra}}}
tenants:
  - {{name: bench, api_keys_sha256: ['{key_sha256}']}}
admin_api_keys_sha256: ['{admin_sha256}']
ledger: memory://
"""


@dataclass
class Fleet:
    """One fleet (three simulators) and its proxy."""

    mode: str
    sims: dict[str, str] = field(default_factory=dict)  # backend name -> base URL
    base: str = ""
    ttft_s: list[float] = field(default_factory=list)
    tokens: int = 0
    failed: int = 0


@dataclass(frozen=True)
class Planned:
    at_s: float
    prompt_words: int
    max_tokens: int


def plan(rate_rps: float, duration_s: float, seed: int) -> list[Planned]:
    """Poisson arrivals; prompts of 20-600 words and answers of 32-384 tokens, log-uniform."""
    rng = random.Random(seed)
    out, t_s = [], 0.0
    while True:
        t_s += rng.expovariate(rate_rps)
        if t_s >= duration_s:
            return out
        out.append(Planned(t_s, round(20 * 30 ** rng.random()), round(32 * 12 ** rng.random())))


def start_fleet(mode: str, workdir: Path, procs: list[subprocess.Popen[bytes]], key: str,
                admin_key: str, slo_target: float | None = None, interval_s: float = INTERVAL_S) -> Fleet:
    fleet = Fleet(mode)
    sim_procs = []
    for name, profile in FLEET:
        port = _free_port()
        proc = _spawn(["sim-backend", "--profile", profile, "--port", str(port), "--model", MODEL],
                      workdir / f"{mode}-sim-{name}.log")
        procs.append(proc)
        sim_procs.append(proc)
        fleet.sims[name] = f"http://127.0.0.1:{port}"
    for proc, url in zip(sim_procs, fleet.sims.values(), strict=True):
        _wait_http(f"{url}/v1/models", proc)
    backends = "\n".join(
        f"  - {{name: {n}, url: '{u}/v1', models: [{MODEL}], metrics_url: '{u}/metrics',"
        f" power: {{source: sim, url: '{u}', interval_s: 0.1}}, park: {{via: vllm, wake_timeout_s: 10}}}}"
        for n, u in fleet.sims.items())
    port = _free_port()
    config = workdir / f"{mode}.yaml"
    config.write_text(CONFIG.format(
        port=port, backends=backends, mode=mode, interval_s=interval_s,
        extra=f", slo_target: {slo_target}" if slo_target is not None and mode == "apply" else "",
        key_sha256=hashlib.sha256(key.encode()).hexdigest(),
        admin_sha256=hashlib.sha256(admin_key.encode()).hexdigest()))
    proxy = _spawn(["serve", "-c", str(config), "--log-level", "warning"], workdir / f"{mode}-proxy.log")
    procs.append(proxy)
    fleet.base = f"http://127.0.0.1:{port}"
    _wait_http(f"{fleet.base}/readyz", proxy)
    return fleet


def fleet_joules(fleet: Fleet) -> float:
    """The fleet's simulators' cumulative joules, idle included."""
    return sum(float(httpx.get(f"{u}/sim/energy", timeout=5).json()["joules"]) for u in fleet.sims.values())


async def drive(fleets: list[Fleet], requests: list[Planned], key: str) -> None:
    """Each planned request to every fleet at its time, streamed; TTFT and tokens per fleet."""
    import openai

    clients = [openai.AsyncOpenAI(base_url=f"{f.base}/v1", api_key=key, max_retries=0, timeout=120)
               for f in fleets]
    t0 = time.monotonic()

    async def one(fleet: Fleet, client: openai.AsyncOpenAI, p: Planned) -> None:
        await asyncio.sleep(max(0.0, t0 + p.at_s - time.monotonic()))
        sent_s = time.monotonic()
        first_s = None
        try:
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "watt " * p.prompt_words}],
                max_tokens=p.max_tokens, stream=True, stream_options={"include_usage": True})
            async for chunk in stream:
                if first_s is None and chunk.choices and chunk.choices[0].delta.content:
                    first_s = time.monotonic()
                if chunk.usage:
                    fleet.tokens += chunk.usage.completion_tokens
        except openai.APIError:
            fleet.failed += 1
            return
        if first_s is not None:
            fleet.ttft_s.append(first_s - sent_s)

    await asyncio.gather(*(one(f, c, p) for p in requests for f, c in zip(fleets, clients, strict=True)))
    for c in clients:
        await c.close()


def governor_state(fleet: Fleet, admin_key: str) -> str:
    """Each backend's power limit and whether it is parked, at the end."""
    views = httpx.get(f"{fleet.base}/v1/energy/backends", headers={"Authorization": f"Bearer {admin_key}"},
                      timeout=5).json()["data"]
    parts = []
    for view in views:
        limit = httpx.get(f"{fleet.sims[view['name']]}/v1/power/limits", timeout=5).json()["gpus"][0]
        parked = ((view.get("governor") or {}).get("parking") or {}).get("parked")
        parts.append(f"{view['name']} {limit['power_limit_w']:.0f} W{' (parked)' if parked else ''}")
    return ", ".join(parts)


def fleet_clock(fleet: Fleet, admin_key: str) -> str:
    """The governed fleet's clock (governor.slo_target), from its admin view."""
    views = httpx.get(f"{fleet.base}/v1/energy/backends", headers={"Authorization": f"Bearer {admin_key}"},
                      timeout=5).json()["data"]
    clock = next(((v.get("governor") or {}).get("clock") for v in views if (v.get("governor") or {}).get("clock")),
                 None)
    return "none" if clock is None else ", ".join(f"{k} {v}" for k, v in clock.items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.governor_live", description=__doc__.split("\n")[0])
    ap.add_argument("--duration-s", type=float, default=120.0, help="seconds of arrivals")
    ap.add_argument("--rate", type=float, default=1.5, help="requests per second (each to both fleets)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--slo-target", type=float, default=None,
                    help="the governed fleet's attainment target (governor.slo_target)")
    ap.add_argument("--interval-s", type=float, default=INTERVAL_S,
                    help=f"the governors' decision interval ({INTERVAL_S:g}; a target's clock moves only "
                         "after an interval in which 20 requests finished)")
    args = ap.parse_args(argv)
    os.environ["JOULEGATE_SIM_WAKE_S"] = str(WAKE_S)  # read by the simulators started below
    workdir = Path(tempfile.mkdtemp(prefix="joulegate-governor-live-"))
    procs: list[subprocess.Popen[bytes]] = []
    key, admin_key = "sk-bench-" + secrets.token_hex(12), "sk-bench-admin-" + secrets.token_hex(12)
    try:
        fleets = [start_fleet(mode, workdir, procs, key, admin_key, args.slo_target, args.interval_s)
                  for mode in MODES]
        requests = plan(args.rate, args.duration_s, args.seed)
        print(f"{len(requests)} requests over {args.duration_s:.0f} s (seed {args.seed}) to both fleets "
              f"({', '.join(n for n, _ in FLEET)}; governor interval {args.interval_s:g} s, wake {WAKE_S:g} s)")
        before = [fleet_joules(f) for f in fleets]
        t0 = time.monotonic()
        asyncio.run(drive(fleets, requests, key))
        window_s = time.monotonic() - t0
        after = [fleet_joules(f) for f in fleets]
        print(f"\n{'governor':<9}{'out tokens':>11}{'joules':>10}{'J/token':>9}{'TTFT p50 ms':>13}"
              f"{'TTFT p99 ms':>13}{'failed':>8}")
        jpt = {}
        for f, b, a in zip(fleets, before, after, strict=True):
            jpt[f.mode] = (a - b) / f.tokens if f.tokens else float("nan")
            cuts = statistics.quantiles(f.ttft_s, n=100) if len(f.ttft_s) >= 2 else [float("nan")] * 99
            print(f"{f.mode:<9}{f.tokens:>11}{a - b:>10.0f}{jpt[f.mode]:>9.3f}{1000 * cuts[49]:>13.0f}"
                  f"{1000 * cuts[98]:>13.0f}{f.failed:>8}")
        print(f"\nwindow {window_s:.0f} s; apply / off J per token: {jpt['apply'] / jpt['off']:.3f}")
        print(f"governed fleet at the end: {governor_state(fleets[1], admin_key)}")
        if args.slo_target is not None:
            print(f"fleet clock at the end: {fleet_clock(fleets[1], admin_key)}")
        return 0
    finally:
        _stop(procs)


if __name__ == "__main__":
    sys.exit(main())
