"""`joulegate demo`: three simulated GPUs, the proxy in front, two tenants, one table.

The simulators run as `joulegate sim-backend` child processes (the proxy never imports the
simulator); the workload goes through the official openai SDK like any client's would.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import httpx

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

MODEL = "llama-3.1-8b"
#: (backend name, simulator profile) of the demo fleet: three kinds of GPU.
FLEET = (("h100", "h100-llama3.1-8b"), ("a100", "a100-llama3.1-8b"), ("l4", "l4-llama3.1-8b"))
TENANTS = ("research", "product")

DEMO_CONFIG = """\
# Written by `joulegate demo`: the embedded defaults plus the demo's fleet and tenants.
server: {{host: 127.0.0.1, port: {port}}}
backends:
{backends}
routing: {{policy: least_loaded}}
energy: {{idle: separate, prefill_weight: 0.05}}
# advise: the governor picks a power cap per backend every interval and changes nothing.
governor: {{mode: advise, interval_s: 2}}
tenants:
{tenants}
admin_api_keys_sha256: ['{admin_sha256}']
anonymous_tenant: null
"""


@dataclass
class Served:
    """One demo request as the client saw it, plus the simulator's ground truth."""

    tenant: str
    request_id: str
    backend: str
    completion_tokens: int
    joules: float = 0.0  # the proxy's measured attribution
    truth_joules: float = 0.0  # the simulator's own per-step split


@dataclass
class _Row:
    requests: int = 0
    tokens: int = 0
    joules: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "proxy", *args], stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every child, newest first (the proxy before its backends); kill after 15 s."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            args = cast("list[str]", proc.args)  # _spawn passes a list
            raise RuntimeError(f"{' '.join(map(str, args))} exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


async def _workload(base_url: str, keys: dict[str, str], requests: int) -> list[Served]:
    """Two tenants: `research` streams long chats; `product` sends short chats and embeddings."""
    import openai

    clients = {t: openai.AsyncOpenAI(base_url=base_url, api_key=k, max_retries=0, timeout=120) for t, k in keys.items()}
    gate = asyncio.Semaphore(12)
    served: list[Served] = []

    async def one(i: int) -> None:
        tenant = TENANTS[i % 2]
        c = clients[tenant]
        prompt = f"Request {i}: explain tokens per joule. " * (1 + i % 7)
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": prompt}]
        async with gate:
            if tenant == "research":
                stream = await c.chat.completions.with_raw_response.create(
                    model=MODEL, messages=messages, max_tokens=64 + 32 * (i % 5), stream=True,
                    stream_options={"include_usage": True},
                )
                tokens = 0
                async for chunk in stream.parse():
                    if chunk.usage:
                        tokens = chunk.usage.completion_tokens
                served.append(Served(tenant, stream.headers["x-request-id"], stream.headers["x-energy-backend"], tokens))
            elif i % 6 == 1:
                emb = await c.embeddings.with_raw_response.create(model=MODEL, input=prompt)
                served.append(Served(tenant, emb.headers["x-request-id"], emb.headers["x-energy-backend"], 0))
            else:
                raw = await c.chat.completions.with_raw_response.create(
                    model=MODEL, messages=messages, max_tokens=16 + 8 * (i % 4))
                usage = raw.parse().usage
                assert usage is not None  # the proxy answers every chat with usage
                tokens = usage.completion_tokens
                served.append(Served(tenant, raw.headers["x-request-id"], raw.headers["x-energy-backend"], tokens))

    await asyncio.gather(*(one(i) for i in range(requests)))
    for c in clients.values():
        await c.close()
    return served


def _fill_energy(served: list[Served], keys: dict[str, str], base: str, sims: dict[str, str]) -> None:
    """Wait for each request's measured attribution; fetch the simulator's truth beside it."""
    deadline = time.monotonic() + 30.0
    for item in served:
        headers = {"Authorization": f"Bearer {keys[item.tenant]}"}
        while True:
            mine = httpx.get(f"{base}/v1/energy/requests/{item.request_id}", headers=headers, timeout=5).json()
            if mine.get("method") == "measured" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        item.joules = float(mine.get("joules") or 0.0)
        truth = httpx.get(f"{sims[item.backend]}/sim/requests/{item.request_id}", timeout=5).json()
        item.truth_joules = float(truth.get("joules", 0.0))


def _table(title: str, rows: dict[str, _Row], extra_cols: tuple[str, ...] = ()) -> str:
    head = f"{title:<12} {'requests':>8} {'out tokens':>10} {'joules':>10} {'tokens/J':>9}"
    head += "".join(f" {c:>12}" for c in extra_cols)
    lines = [head, "-" * len(head)]
    for name, row in rows.items():
        tpj = row.tokens / row.joules if row.joules else 0.0
        line = f"{name:<12} {row.requests:>8} {row.tokens:>10} {row.joules:>10.1f} {tpj:>9.3f}"
        line += "".join(f" {row.extra.get(c, 0.0):>12.1f}" for c in extra_cols)
        lines.append(line)
    return "\n".join(lines)


def _governor_table(base: str, admin_key: str) -> str:
    """The governor's advice per backend (mode advise: decided, logged, nothing changed)."""
    deadline_s = time.monotonic() + 5.0  # the governor decides every 2 s (DEMO_CONFIG)
    while True:
        views = httpx.get(f"{base}/v1/energy/backends", headers={"Authorization": f"Bearer {admin_key}"},
                          timeout=5).json().get("data", [])
        if all((v.get("governor") or {}).get("cap_w") for v in views) or time.monotonic() > deadline_s:
            break
        time.sleep(0.2)
    lines = ["governor (advise mode: what it would cap each GPU at; nothing was changed)",
             f"{'backend':<10} {'cap W':>7}  {'action':<7} reason"]
    for view in views:
        gov = view.get("governor") or {}
        cap_w = gov.get("cap_w")
        cap = f"{cap_w:.0f}" if isinstance(cap_w, (int, float)) else "-"
        lines.append(f"{view.get('name', '?'):<10} {cap:>7}  "
                     f"{gov.get('action') or '-':<7} {gov.get('reason') or gov.get('error') or 'no decision yet'}")
    return "\n".join(lines)


def run_demo(port: int = 8080, requests: int = 60, keep_running: bool = False) -> int:
    """Start the fleet and the proxy, drive the workload, print the tables. Exit code."""
    if not _port_is_free(port):
        print(f"joulegate demo: port {port} is in use; pass --port", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="joulegate-demo-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sims: dict[str, str] = {}
        for name, profile in FLEET:
            sim_port = _free_port()
            procs.append(_spawn(["sim-backend", "--profile", profile, "--port", str(sim_port), "--model", MODEL],
                                workdir / f"sim-{name}.log"))
            sims[name] = f"http://127.0.0.1:{sim_port}"
        for proc, url in zip(procs, sims.values(), strict=True):
            _wait_http(f"{url}/v1/models", proc)
        keys = {t: "sk-demo-" + secrets.token_hex(12) for t in TENANTS}
        backends = "\n".join(
            f"  - {{name: {n}, url: '{u}/v1', models: [{MODEL}], metrics_url: '{u}/metrics',"
            f" power: {{source: sim, url: '{u}', interval_s: 0.1}}}}" for n, u in sims.items()
        )
        tenants = "\n".join(
            f"  - {{name: {t}, api_keys_sha256: ['{hashlib.sha256(k.encode()).hexdigest()}']}}" for t, k in keys.items()
        )
        config_path = workdir / "joulegate.yaml"
        admin_key = "sk-demo-admin-" + secrets.token_hex(12)
        config_path.write_text(DEMO_CONFIG.format(port=port, backends=backends, tenants=tenants,
                                                  admin_sha256=hashlib.sha256(admin_key.encode()).hexdigest()))
        proxy = _spawn(["serve", "-c", str(config_path), "--log-level", "warning"], workdir / "proxy.log")
        procs.append(proxy)
        base = f"http://127.0.0.1:{port}"
        _wait_http(f"{base}/readyz", proxy)
        print(f"JouleGate demo: proxy on {base}/v1 in front of {', '.join(f'{n} ({p})' for n, p in FLEET)}")
        print(f"Sending {requests} requests from tenants {' and '.join(TENANTS)} with the openai SDK ...")
        started_s = time.monotonic()
        served = asyncio.run(_workload(f"{base}/v1", keys, requests))
        elapsed_s = time.monotonic() - started_s
        _fill_energy(served, keys, base, sims)
        by_backend = {n: _Row() for n, _ in FLEET}
        by_tenant = {t: _Row() for t in TENANTS}
        for item in served:
            for row in (by_backend[item.backend], by_tenant[item.tenant]):
                row.requests += 1
                row.tokens += item.completion_tokens
                row.joules += item.joules
                row.extra["truth J"] = row.extra.get("truth J", 0.0) + item.truth_joules
        for row in (*by_backend.values(), *by_tenant.values()):
            truth_j = row.extra["truth J"]
            row.extra["error %"] = 100.0 * (row.joules - truth_j) / truth_j if truth_j else 0.0
        for name, url in sims.items():
            energy = httpx.get(f"{url}/sim/energy", timeout=5).json()
            by_backend[name].extra["GPU idle J"] = energy["idle_joules"]
        print(f"\n{len(served)} requests in {elapsed_s:.1f} s\n")
        print(_table("backend", by_backend, ("truth J", "error %", "GPU idle J")))
        print()
        print(_table("tenant", by_tenant, ("truth J", "error %")))
        print("\njoules, tokens/J: the proxy's own attribution (measured, from 100 ms power samples);")
        print("truth J: the simulator's ground truth for the same requests; GPU idle J: energy spent")
        print("with nothing in flight, which no request is billed for.")
        print()
        print(_governor_table(base, admin_key))
        if keep_running:
            print(f"\nStill running. Try:\n  curl {base}/v1/chat/completions -H 'Authorization: Bearer {keys['research']}' "
                  f"-H 'Content-Type: application/json' -d '{{\"model\": \"{MODEL}\", \"messages\": "
                  f"[{{\"role\": \"user\", \"content\": \"hi\"}}], \"max_tokens\": 8}}' -i")
            print(f"  curl {base}/metrics\nLogs in {workdir}. Ctrl-C stops everything.")
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
        return 0
    except RuntimeError as exc:
        print(f"joulegate demo: {exc} (logs in {workdir})", file=sys.stderr)
        return 1
    finally:
        _stop(procs)
