"""The soak's client (bench/soak.py): the request mix, per-minute bins and the proxy sampler.

One asyncio process keeps `concurrency` requests in flight, each worker sending its next request
as soon as one ends; every SAMPLE_S the proxy's VmRSS, open fds and CPU ticks are read from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from bench.attribution import _quantile
from bench.overhead import Server

MODEL = "llama-3.1-8b"
TENANT_KEYS = {"acme": "sk-soak-acme-0001", "globex": "sk-soak-globex-0002"}
SAMPLE_S = 5.0  # proxy sampling period
BIN_S = 60.0  # one table row
MAX_TOKENS = (4, 32)  # completion tokens drawn per request: short, so the sims stay quick
_FILLER = "".join(f"soak{i % 89} joule{i % 97} " for i in range(200))
_USAGE_RE = re.compile(rb'"completion_tokens":\s*(\d+)')


@dataclass(frozen=True)
class Kind:
    """One request shape of the mix; `expect` is the status it must get."""

    name: str
    weight: int
    path: str
    stream: bool = False
    usage: bool = False
    expect: int = 200


KINDS = (
    Kind("chat_stream_usage", 28, "/v1/chat/completions", stream=True, usage=True),
    Kind("chat_stream", 14, "/v1/chat/completions", stream=True),
    Kind("chat", 20, "/v1/chat/completions"),
    Kind("completion", 8, "/v1/completions"),
    Kind("completion_stream", 4, "/v1/completions", stream=True, usage=True),
    Kind("embedding", 14, "/v1/embeddings"),
    Kind("disconnect", 6, "/v1/chat/completions", stream=True, usage=True),
    Kind("bad_key", 3, "/v1/chat/completions", expect=401),
    Kind("bad_json", 3, "/v1/chat/completions", expect=400),
)



def request_body(kind: Kind, rng: random.Random, max_tokens: int) -> bytes:
    if kind.expect == 400:
        return b'{"model": "' + MODEL.encode() + b'", "messages": ['  # cut off: not JSON
    text = _FILLER[: rng.randint(20, 600)]
    body: dict[str, Any] = {"model": MODEL}
    if kind.path == "/v1/embeddings":
        body.update(input=[text], encoding_format="base64")
    elif kind.path == "/v1/completions":
        body.update(prompt=text, max_tokens=max_tokens)
    else:
        body.update(messages=[{"role": "user", "content": text}], max_tokens=max_tokens)
    if kind.stream:
        body["stream"] = True
        if kind.usage:
            body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


@dataclass
class Bin:
    """Requests that ended in one minute (latencies in ms) and the last proxy sample in it."""

    label: str
    start_s: float
    end_s: float
    requests: int = 0
    ok: int = 0
    rejected: int = 0  # the 401s and 400s asked for
    disconnects: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latency_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    rss_mib: float | None = None
    fds: int | None = None
    cpu_pct: float | None = None

    def row(self) -> dict[str, Any]:
        q = lambda v, p: None if not v else round(_quantile(v, p), 1)  # noqa: E731
        return {"bin": self.label, "start_s": self.start_s, "end_s": self.end_s,
                "requests": self.requests, "ok": self.ok, "rejected": self.rejected,
                "disconnects": self.disconnects, "errors": dict(self.errors),
                "p50_ms": q(self.latency_ms, 0.5), "p99_ms": q(self.latency_ms, 0.99),
                "ttft_p50_ms": q(self.ttft_ms, 0.5), "ttft_p99_ms": q(self.ttft_ms, 0.99),
                "rss_mib": self.rss_mib, "fds": self.fds, "cpu_pct": self.cpu_pct}


class Soak:
    """The client side of one soak run: workers, bins, proxy samples, ledger expectations."""

    def __init__(self, args: argparse.Namespace, url: str, proxy: Server) -> None:
        self.args, self.url, self.proxy = args, url, proxy
        self.t0 = 0.0
        self.kinds = [k for k in KINDS if k.name not in args.without]
        self.weights = [k.weight for k in self.kinds]
        self.stopping = False
        self.bins: list[Bin] = [Bin("warm-up", 0.0, args.warmup_s)]
        t = float(args.warmup_s)
        while t < args.warmup_s + args.duration_s:
            end = min(t + BIN_S, args.warmup_s + args.duration_s)
            self.bins.append(Bin(f"min {len(self.bins)}", t, end))
            t = end
        self.drain = Bin("drain", t, math.inf)  # requests still in flight at the end
        self.samples: list[dict[str, Any]] = []
        # Per tenant: [requests, min completion tokens, max completion tokens] the ledger must hold.
        self.expected = {t: [0, 0, 0] for t in TENANT_KEYS}

    def bin_at(self, rel_s: float) -> Bin:
        for b in self.bins:
            if rel_s < b.end_s:
                return b
        return self.drain

    def sample(self) -> dict[str, Any]:
        """VmRSS (MiB), open fds and CPU ticks of the proxy process, now."""
        pid = self.proxy.proc.pid if self.proxy.proc else 0
        with open(f"/proc/{pid}/status") as f:
            rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return {"t_s": round(time.monotonic() - self.t0, 2), "rss_mib": round(rss_kib / 1024, 1),
                "fds": len(os.listdir(f"/proc/{pid}/fd")), "cpu_ticks": self.proxy.cpu_ticks()}

    async def one(self, session: aiohttp.ClientSession, kind: Kind, tenant: str,
                  rng: random.Random, rid: str) -> tuple[str, float | None, float | None, int]:
        """Send one request: (outcome, latency ms, TTFT ms, completion tokens asked for).
        Outcome: ok, rejected (the 4xx asked for), disconnect, or an error kind."""
        n = 0 if kind.path == "/v1/embeddings" else rng.randint(*MAX_TOKENS)
        key = "sk-soak-wrong-key" if kind.expect == 401 else TENANT_KEYS[tenant]
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                   "x-request-id": rid}
        t0 = time.monotonic()
        ms = lambda: (time.monotonic() - t0) * 1e3  # noqa: E731
        async with session.post(self.url + kind.path, data=request_body(kind, rng, n),
                                headers=headers) as resp:
            if resp.status != kind.expect:
                await resp.read()
                return f"http_{resp.status}", None, None, n
            if kind.expect != 200:
                await resp.read()
                return "rejected", None, None, n
            if not kind.stream:
                got = orjson.loads(await resp.read())["usage"].get("completion_tokens", 0)
                return ("ok" if got == n else "usage_mismatch"), ms(), None, n
            ttft, tail = None, b""
            async for chunk in resp.content.iter_any():
                if ttft is None:
                    ttft = ms()
                    if kind.name == "disconnect":
                        resp.close()  # drop the connection mid-stream
                        return "disconnect", None, ttft, n
                tail = (tail + chunk)[-4096:]
            if not tail.endswith(b"data: [DONE]\n\n"):
                return "incomplete_stream", None, ttft, n
            if kind.usage:
                m = _USAGE_RE.findall(tail)
                if not m or int(m[-1]) != n:
                    return "usage_mismatch", None, ttft, n
            return "ok", ms(), ttft, n

    async def worker(self, i: int, session: aiohttp.ClientSession) -> None:
        rng = random.Random(self.args.seed * 10_000 + i)
        seq = 0
        while not self.stopping:
            kind = rng.choices(self.kinds, self.weights)[0]
            tenant = rng.choice(list(TENANT_KEYS))
            seq += 1
            try:
                outcome, lat, ttft, n = await self.one(session, kind, tenant, rng, f"soak-{i}-{seq}")
            except TimeoutError:
                outcome, lat, ttft, n = "timeout", None, None, 0
            except (aiohttp.ClientError, ValueError, KeyError) as exc:
                outcome, lat, ttft, n = type(exc).__name__, None, None, 0
            b = self.bin_at(time.monotonic() - self.t0)
            b.requests += 1
            if outcome in ("ok", "disconnect", "usage_mismatch", "incomplete_stream"):
                exp = self.expected[tenant]  # answered: the proxy must book it
                exp[0] += 1
                exp[1] += n if outcome == "ok" else 0  # a dropped stream bills what was relayed
                exp[2] += n
            if outcome == "ok":
                b.ok += 1
                b.latency_ms.append(lat or 0.0)
                if ttft is not None:
                    b.ttft_ms.append(ttft)
            elif outcome == "rejected":
                b.rejected += 1
            elif outcome == "disconnect":
                b.disconnects += 1
            else:
                b.errors[outcome] += 1

    def close_bin(self, b: Bin, s: dict[str, Any], prev: dict[str, Any] | None) -> None:
        b.rss_mib, b.fds = s["rss_mib"], s["fds"]
        if prev is not None and s["t_s"] > prev["t_s"]:
            b.cpu_pct = round(100 * (s["cpu_ticks"] - prev["cpu_ticks"]) / os.sysconf("SC_CLK_TCK")
                              / (s["t_s"] - prev["t_s"]), 1)
        r = b.row()
        f = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
        print(f"{b.label:<8} {b.requests:>6} {b.ok:>6} {b.rejected:>4} {b.disconnects:>4} "
              f"{sum(b.errors.values()):>4} {f(r['p50_ms']):>6} {f(r['p99_ms']):>6} "
              f"{f(r['ttft_p50_ms']):>6} {f(r['ttft_p99_ms']):>6} {b.rss_mib:>7.1f} {b.fds:>4} "
              f"{f(b.cpu_pct):>5}", flush=True)
        if b.errors:
            print(f"         errors: {', '.join(f'{k}={v}' for k, v in b.errors.most_common())}")

    async def sampler(self) -> None:
        """Pace the run: a proxy sample every SAMPLE_S (aligned to the warm-up's end, so every
        minute ends on one), a table row at the end of each bin, then stop the workers."""
        end = self.args.warmup_s + self.args.duration_s
        ticks = sorted({self.args.warmup_s + SAMPLE_S * k
                        for k in range(-int(self.args.warmup_s // SAMPLE_S), int(end // SAMPLE_S) + 1)
                        if 0 < self.args.warmup_s + SAMPLE_S * k < end} | {b.end_s for b in self.bins})
        prev_row_sample = self.samples[0]
        for off in ticks:
            await asyncio.sleep(max(0.0, self.t0 + off - time.monotonic()))  # pacing only
            s = self.sample()
            self.samples.append(s)
            for b in self.bins:
                if b.end_s == off:
                    self.close_bin(b, s, prev_row_sample)
                    prev_row_sample = s
        self.stopping = True

    async def run(self) -> dict[str, Any]:
        """Drive the load for the warm-up and the duration; the client's CPU seconds."""
        print(f"{'bin':<8} {'reqs':>6} {'ok':>6} {'4xx':>4} {'disc':>4} {'err':>4} {'p50':>6} "
              f"{'p99':>6} {'ttft50':>6} {'ttft99':>6} {'RSS MiB':>7} {'fds':>4} {'cpu%':>5}"
              "   (latencies in ms, of ok requests; RSS/fds at the end of the bin)", flush=True)
        cpu0 = os.times()
        self.t0 = time.monotonic()
        self.samples.append(self.sample())  # idle: before the first request
        conn = aiohttp.TCPConnector(limit=self.args.concurrency, limit_per_host=0)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as session:
            workers = [asyncio.create_task(self.worker(i, session)) for i in range(self.args.concurrency)]
            await self.sampler()
            await asyncio.gather(*workers)
        cpu1 = os.times()
        client_cpu_s = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        return {"client_cpu_s": round(client_cpu_s, 1)}

    def fd_targets(self) -> Counter[str]:
        """What the proxy's open fds point at, counted: files by path, TCP sockets by the far
        end's port (inbound ones by the proxy's own port) and state."""
        pid = self.proxy.proc.pid if self.proxy.proc else 0
        tcp: dict[str, str] = {}  # socket inode -> description
        states = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN"}
        for table in ("tcp", "tcp6"):
            with open(f"/proc/{pid}/net/{table}") as f:
                for line in list(f)[1:]:
                    local, remote, state, inode = (line.split()[i] for i in (1, 2, 3, 9))
                    lport, rport = int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16)
                    end = f"<-:{lport}" if lport == self.proxy.port else f"->:{rport}"
                    tcp[inode] = f"tcp {end} {states.get(state, state)}"
        out: Counter[str] = Counter()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue  # closed in between
            m = re.fullmatch(r"socket:\[(\d+)\]", target)
            out[tcp.get(m.group(1), "socket (not TCP)") if m else re.sub(r"\[\d+\]$", "", target)] += 1
        return out

    def idle_fds(self, before: Counter[str], timeout_s: float = 20.0) -> dict[str, Any]:
        """The proxy's fds after the load, once back to the idle count `before` (or after
        `timeout_s`): the client's connections close at once, the proxy's upstream keep-alive
        ones expire (below the backends' 5 s idle timeout); nothing else may be left."""
        deadline = time.monotonic() + timeout_s
        while (after := self.fd_targets()).total() > before.total() and time.monotonic() < deadline:
            time.sleep(0.25)  # polling /proc, with a deadline
        return {"idle_fds_before": before.total(), "idle_fds_after": after.total(),
                "idle_fds_new": dict(after - before), "idle_fds_gone": dict(before - after)}
