"""Data-plane overhead benchmark: JouleGate vs a bare reference relay vs the backend direct.

Starts, each in its own process on loopback: the fast mock backend (bench/mock_backend.py),
the reference Starlette+uvicorn+aiohttp relay (bench/reference_relay.py) and
``joulegate serve`` on a temp config, then drives each with ``wrk -t1`` (bench/wrk/chat.lua)
one point at a time. Only the mock and the server under test run during a point.

Prints one table (p50/p99 latency, req/s, relayed token chunks/s, JouleGate/reference ratios,
added p50 over direct at c=1), PASS/FAIL against the targets, and writes
bench/results/overhead-<timestamp>.json.

Run: ``python -m bench.overhead [--duration-s 8] [--quick] [--only reference,joulegate]``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.mock_backend import COMPLETION_TOKENS, MODEL, STREAM_TOKENS

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WRK_SCRIPT = BENCH_DIR / "wrk" / "chat.lua"
RESULTS_DIR = BENCH_DIR / "results"
HOST = "127.0.0.1"
CHAT_PATH = "/v1/chat/completions"
PATHS = ("direct", "reference", "joulegate", "dashboards", "otel")
#: --dashboards: the admin key its streams read /v1/energy/stream with (a bench-only secret).
DASHBOARD_KEY = "sk-bench-dashboard-admin"
IDLE_LOADAVG = 1.0  # 1-min load average above which the box was not idle before we started

# Targets we report against (from the brief).
TARGET_JSON_C32_RPS_RATIO = 0.70  # joulegate req/s >= 70% of reference, non-streamed c=32
TARGET_JSON_C32_P99_RATIO = 1.5  # joulegate p99 <= 1.5x reference, non-streamed c=32
TARGET_JSON_C1_ADDED_P50_MS = 0.4  # joulegate p50 - direct p50 <= 0.4 ms, non-streamed c=1
TARGET_STREAM_C32_CHUNKS_RATIO = 0.60  # joulegate chunks/s >= 60% of reference, streamed c=32


@dataclass
class Point:
    """One measured load point (latencies in ms)."""

    path: str
    mode: str  # "json" (non-streamed) or "stream"
    conns: int
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    rps: float = float("nan")
    chunks_per_s: float | None = None  # token chunks relayed per second (stream mode only)
    requests: int = 0
    errors: int = 0
    server_cpu_us_per_req: float | None = None  # CPU of the server under test (all its procs)
    mock_cpu_us_per_req: float | None = None
    error: str | None = None
    wrk: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- processes


def free_port() -> int:
    """Ask the kernel for a free loopback port (tiny race until the server binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Server:
    """A child server process in its own session, so stopping it stops its workers too."""

    def __init__(self, name: str, argv: list[str], port: int, log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("wb")
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_DIR,
                # Own session: Ctrl-C in the terminal reaches only us; we stop it in order.
                start_new_session=True,
            )
        finally:
            log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n_lines: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n_lines:])

    def cpu_ticks(self) -> int:
        """User+system CPU clock ticks of every live process in this server's session."""
        if self.proc is None:
            return 0
        total = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            # Fields after the ")" that closes the command name: state(3) ppid pgrp session(6)
            # ... utime(14) stime(15); index from 3.
            rest = stat[stat.rfind(b")") + 2 :].split()
            if int(rest[3]) == self.proc.pid:
                total += int(rest[11]) + int(rest[12])
        return total

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM the session, then SIGKILL what is left after ``timeout_s``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        # Workers may outlive the leader; kill whatever is left in the process group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout_s)
        self.proc = None


def wait_until(server: Server, ready: Callable[[], bool], timeout_s: float) -> None:
    """Poll ``ready`` until true; raise with the server's log tail on exit or timeout."""
    deadline = time.monotonic() + timeout_s
    poll_s = 0.02
    while True:
        if not server.alive():
            raise RuntimeError(f"{server.name} exited during startup:\n{server.log_tail()}")
        try:
            if ready():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{server.name} not ready after {timeout_s:.0f} s:\n{server.log_tail()}"
            )
        time.sleep(poll_s)
        poll_s = min(poll_s * 1.5, 0.25)


def tcp_ready(port: int) -> Callable[[], bool]:
    def check() -> bool:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True

    return check


def http_request(
    port: int, method: str, path: str, body: bytes | None = None, timeout_s: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request with the stdlib client; returns (status, lowercased headers, body)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()  # decodes chunked transfer encoding
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def models_ready(port: int, probe: str) -> Callable[[], bool]:
    """True once ``probe`` answers 200 and /v1/models lists the mock model."""

    def check() -> bool:
        status, _, _ = http_request(port, "GET", probe, timeout_s=1.0)
        if status != 200:
            return False
        status, _, body = http_request(port, "GET", "/v1/models", timeout_s=1.0)
        return status == 200 and MODEL.encode() in body

    return check


# ----------------------------------------------------------------------------- checks


def request_body(stream: bool, include_usage: bool = True) -> bytes:
    """The same bodies as bench/wrk/chat.lua sends."""
    body: dict[str, object] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": STREAM_TOKENS if stream else COMPLETION_TOKENS,
    }
    if stream:
        body["stream"] = True
        if include_usage:
            body["stream_options"] = {"include_usage": True}
    return json.dumps(body, separators=(",", ":")).encode()


def verify(port: int, include_usage: bool) -> dict[str, object]:
    """Check once, with a Python client, what a path really returns (raises on a mismatch)."""
    out: dict[str, object] = {}
    status, headers, data = http_request(port, "POST", CHAT_PATH, request_body(False))
    if status != 200:
        raise RuntimeError(f"non-streamed: HTTP {status}: {data[:300]!r}")
    usage = json.loads(data).get("usage") or {}
    if usage.get("completion_tokens") != COMPLETION_TOKENS:
        raise RuntimeError(f"non-streamed: unexpected usage {usage}")
    out["json_completion_tokens"] = usage["completion_tokens"]
    out["json_energy_headers"] = {k: v for k, v in headers.items() if k.startswith("x-energy-")}

    status, headers, data = http_request(port, "POST", CHAT_PATH, request_body(True, include_usage))
    if status != 200:
        raise RuntimeError(f"streamed: HTTP {status}: {data[:300]!r}")
    token_chunks = usage_chunks = done = comments = other = 0
    energy_in_usage = False
    for event in data.decode().split("\n\n"):
        event = event.strip("\n")
        if not event:
            continue
        for line in event.split("\n"):
            if line.startswith(":"):
                comments += 1  # e.g. JouleGate's `: energy {...}` when usage was not asked for
            elif line.startswith("data:"):
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done += 1
                    continue
                obj = json.loads(payload)
                if obj.get("choices"):
                    token_chunks += 1
                elif obj.get("usage"):
                    usage_chunks += 1
                    energy_in_usage = energy_in_usage or "energy" in obj["usage"]
                else:
                    other += 1
    out.update(
        stream_token_chunks=token_chunks,
        stream_usage_chunks=usage_chunks,
        stream_done=done,
        stream_comment_lines=comments,
        stream_other_events=other,
        stream_energy_in_usage=energy_in_usage,
        stream_content_type=headers.get("content-type", ""),
    )
    if token_chunks != STREAM_TOKENS or done != 1:
        raise RuntimeError(f"streamed: expected {STREAM_TOKENS} token chunks + [DONE], got {out}")
    if include_usage and usage_chunks != 1:
        raise RuntimeError(f"streamed: expected one usage chunk, got {out}")
    return out


# ----------------------------------------------------------------------------- load


def run_wrk(port: int, mode: str, conns: int, duration_s: int, include_usage: bool) -> dict:
    """Run wrk once and return the JSON line printed by the script's done() hook."""
    argv = [
        "wrk", "-t1", f"-c{conns}", f"-d{duration_s}s", "--timeout", "10s",
        "-s", str(WRK_SCRIPT), f"http://{HOST}:{port}{CHAT_PATH}",
        "--", mode, "1" if include_usage else "0",
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 30)
    for line in proc.stdout.splitlines():
        if line.startswith("WRKJSON "):
            return json.loads(line[len("WRKJSON ") :])
    raise RuntimeError(f"wrk gave no summary (rc={proc.returncode}): {proc.stderr.strip()[-300:]}")


def measure(
    server: Server,
    mock: Server,
    point: Point,
    duration_s: int,
    warmup_s: int,
    include_usage: bool,
) -> Point:
    """Warm up, then measure one point; CPU is sampled around the measured run only."""
    run_wrk(server.port, point.mode, point.conns, warmup_s, include_usage)
    tick_hz = os.sysconf("SC_CLK_TCK")
    srv0, mock0 = server.cpu_ticks(), mock.cpu_ticks()
    w = run_wrk(server.port, point.mode, point.conns, duration_s, include_usage)
    srv1, mock1 = server.cpu_ticks(), mock.cpu_ticks()
    point.wrk = w
    point.requests = int(w["requests"])
    point.errors = int(sum(w[k] for k in w if k.startswith("err_")))
    point.p50_ms = w["p50_us"] / 1000.0
    point.p99_ms = w["p99_us"] / 1000.0
    point.rps = w["rps"]
    if point.mode == "stream":
        point.chunks_per_s = point.rps * STREAM_TOKENS
    if point.requests:
        if server is not mock:
            point.server_cpu_us_per_req = (srv1 - srv0) / tick_hz * 1e6 / point.requests
        point.mock_cpu_us_per_req = (mock1 - mock0) / tick_hz * 1e6 / point.requests
    if not server.alive():
        point.error = f"{server.name} died:\n{server.log_tail()}"
    return point


# ----------------------------------------------------------------------------- report


def _find(points: list[Point], path: str, mode: str, conns: int) -> Point | None:
    for p in points:
        if (p.path, p.mode, p.conns) == (path, mode, conns) and p.error is None:
            return p
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or a != a or b != b:
        return None
    return a / b


def derive(points: list[Point]) -> tuple[dict[tuple[str, str, int], dict], list[dict]]:
    """Per-point ratios vs reference / direct, and the PASS/FAIL target lines."""
    extra: dict[tuple[str, str, int], dict] = {}
    direct_c1 = _find(points, "direct", "json", 1)
    for p in points:
        e: dict[str, float | None] = {}
        ref = _find(points, "reference", p.mode, p.conns)
        if p.path in ("joulegate", "dashboards", "otel") and ref is not None:
            e["rps_ratio"] = _ratio(p.rps, ref.rps)
            e["p99_ratio"] = _ratio(p.p99_ms, ref.p99_ms)
            e["chunks_ratio"] = _ratio(p.chunks_per_s, ref.chunks_per_s)
        if p.mode == "json" and p.conns == 1 and p.path != "direct" and direct_c1 is not None:
            e["added_p50_ms"] = p.p50_ms - direct_c1.p50_ms
        extra[(p.path, p.mode, p.conns)] = e

    targets: list[dict] = []

    def target(name: str, value: float | None, limit: float, op: str, unit: str) -> None:
        if value is None:
            verdict = "N/A"
        elif op == "info":
            verdict = "INFO"
        else:
            verdict = "PASS" if (value >= limit if op == ">=" else value <= limit) else "FAIL"
        targets.append(
            {"target": name, "value": value, "limit": limit, "op": op, "unit": unit,
             "verdict": verdict}
        )  # fmt: skip

    jg32 = extra.get(("joulegate", "json", 32), {})
    target(
        "non-streamed c=32 req/s vs reference",
        jg32.get("rps_ratio"),
        TARGET_JSON_C32_RPS_RATIO,
        ">=",
        "x",
    )
    target(
        "non-streamed c=32 p99 vs reference",
        jg32.get("p99_ratio"),
        TARGET_JSON_C32_P99_RATIO,
        "<=",
        "x",
    )
    target(
        "non-streamed c=1 added p50 over direct",
        extra.get(("joulegate", "json", 1), {}).get("added_p50_ms"),
        TARGET_JSON_C1_ADDED_P50_MS,
        "<=",
        "ms",
    )
    dash32 = _find(points, "dashboards", "json", 32)
    if dash32 is not None:  # a figure, not a target: what N open dashboards cost
        target("non-streamed c=32 req/s with dashboards open vs reference",
               extra.get(("dashboards", "json", 32), {}).get("rps_ratio"), 0.0, "info", "x")
        target("non-streamed c=32 req/s with dashboards open vs without",
               _ratio(dash32.rps, getattr(_find(points, "joulegate", "json", 32), "rps", None)), 0.0, "info", "x")
    otel32 = _find(points, "otel", "json", 32)
    if otel32 is not None:  # a figure: what tracing costs when it is on
        target("non-streamed c=32 req/s with OTel tracing on vs off",
               _ratio(otel32.rps, getattr(_find(points, "joulegate", "json", 32), "rps", None)), 0.0, "info", "x")
    target("streamed c=32 chunks/s vs reference",
           extra.get(("joulegate", "stream", 32), {}).get("chunks_ratio"),
           TARGET_STREAM_C32_CHUNKS_RATIO, ">=", "x")  # fmt: skip
    return extra, targets


def _fmt(v: float | None, spec: str) -> str:
    if v is None or v != v:
        return "-"
    return format(v, spec)


def print_report(points: list[Point], extra: dict, targets: list[dict]) -> None:
    header = (
        f"{'path':<10} {'mode':<6} {'c':>3} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>9} "
        f"{'chunks/s':>10} {'rps/ref':>7} {'p99/ref':>7} {'chk/ref':>7} {'+p50 ms':>8} "
        f"{'srvCPU us/req':>13} {'err':>4}"
    )
    print()
    print(header)
    print("-" * len(header))
    for p in points:
        if p.error is not None:
            print(f"{p.path:<10} {p.mode:<6} {p.conns:>3}  ERROR: {p.error.splitlines()[0]}")
            continue
        e = extra.get((p.path, p.mode, p.conns), {})
        print(
            f"{p.path:<10} {p.mode:<6} {p.conns:>3} {_fmt(p.p50_ms, '.3f'):>8} "
            f"{_fmt(p.p99_ms, '.3f'):>8} {_fmt(p.rps, ',.0f'):>9} "
            f"{_fmt(p.chunks_per_s, ',.0f'):>10} {_fmt(e.get('rps_ratio'), '.2f'):>7} "
            f"{_fmt(e.get('p99_ratio'), '.2f'):>7} {_fmt(e.get('chunks_ratio'), '.2f'):>7} "
            f"{_fmt(e.get('added_p50_ms'), '+.3f'):>8} "
            f"{_fmt(p.server_cpu_us_per_req, ',.0f'):>13} {p.errors:>4}"
        )
    print(
        f"chunks/s = req/s x {STREAM_TOKENS} token chunks (usage chunk and [DONE] not counted); "
        "ratios are joulegate/reference; +p50 = p50 minus direct p50 at c=1."
    )
    print()
    for t in targets:
        shown = "-" if t["value"] is None else f"{t['value']:.3f}{t['unit']}"
        bound = "" if t["op"] == "info" else f" ({t['op']} {t['limit']}{t['unit']})"
        print(f"{t['verdict']:<4}  {t['target']}: {shown}{bound}")


# ----------------------------------------------------------------------------- main


def joulegate_argv(cmd: str | None, config: Path, port: int) -> list[str]:
    if cmd:
        base = shlex.split(cmd)
    else:
        exe = Path(sys.executable).parent / "joulegate"
        base = [str(exe)] if exe.exists() else [sys.executable, "-m", "proxy"]
    return [*base, "serve", "-c", str(config), "--port", str(port)]


def write_config(tmp: Path, port: int, mock_port: int, ledger: str = "memory://",
                 power_url: str | None = None, admin_sha256: str | None = None,
                 otlp_endpoint: str | None = None, otel_sample: float = 1.0) -> Path:
    """The proxy's config; `power_url`: a simulator whose power API feeds the energy path;
    `otlp_endpoint`: tracing on, spans exported there."""
    power = f"{{source: sim, url: '{power_url}', interval_s: 0.1}}" if power_url else "{source: none}"
    config = tmp / "joulegate-bench.yaml"
    config.write_text(
        f"server: {{host: {HOST}, port: {port}}}\n"
        "backends:\n"
        f'  - {{name: mock, url: "http://{HOST}:{mock_port}/v1", models: [{MODEL}], '
        f"power: {power}}}\n"
        "routing: {policy: round_robin}\n"
        "anonymous_tenant: bench\n"
        f"ledger: '{ledger}'\n"
        + (f"admin_api_keys_sha256: ['{admin_sha256}']\n" if admin_sha256 else "")
        + (f"telemetry: {{otlp_endpoint: '{otlp_endpoint}', sample_ratio: {otel_sample}}}\n"
           if otlp_endpoint else "")
    )
    return config


def plan(paths: list[str], stream_c1: bool) -> dict[str, list[tuple[str, int]]]:
    """Which (mode, c) points each path gets."""
    proxied = [("json", 1), ("json", 32), ("stream", 32)]
    if stream_c1:
        proxied.insert(2, ("stream", 1))
    # Direct streamed c=32 is context only: the mock's own ceiling for the streamed points.
    direct = [("json", 1), ("stream", 32)]
    full = {"direct": direct, "reference": proxied, "joulegate": proxied, "dashboards": proxied,
            "otel": proxied}
    return {p: full[p] for p in PATHS if p in paths}


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into KeyboardInterrupt so cleanup stops every child.

    SIGINT is set explicitly because a shell starts background jobs with it ignored, and
    the servers live in their own sessions, so a closed terminal (SIGHUP) would orphan them.
    """

    def handler(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {sig: signal.signal(sig, handler) for sig in sigs}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.overhead",
        description="Data-plane overhead: joulegate vs reference relay vs direct, with wrk.",
    )
    ap.add_argument("--duration-s", type=int, default=8, help="measured seconds per point")
    ap.add_argument("--warmup-s", type=int, default=1, help="warm-up seconds before each point")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="2 s per point, 1 s warm-up, no streamed c=1 (smoke run)",
    )
    ap.add_argument(
        "--only",
        default=",".join(PATHS),
        help="comma list of paths to run: direct,reference,joulegate (dashboards: with --dashboards)",
    )
    ap.add_argument("--dashboards", type=int, default=0, metavar="N",
                    help="also measure joulegate with N live dashboard streams open (path `dashboards`)")
    ap.add_argument("--no-stream-c1", action="store_true", help="skip the streamed c=1 points")
    ap.add_argument(
        "--no-stream-usage",
        action="store_true",
        help="streamed bodies without stream_options.include_usage",
    )
    ap.add_argument(
        "--joulegate-cmd",
        default=None,
        help="command that runs joulegate (default: the venv's joulegate)",
    )
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the whole schedule N times (proxy order alternates); "
                    "the table shows medians")  # fmt: skip
    ap.add_argument("--startup-timeout-s", type=float, default=30.0)
    ap.add_argument("--strict", action="store_true", help="exit 1 if a target FAILs")
    ap.add_argument("--ledger", default="memory://",
                    help="joulegate's ledger URL, e.g. redis://127.0.0.1:6379/0 (default memory://)")
    ap.add_argument("--energy", action="store_true",
                    help="feed joulegate's energy meter from a simulator's power API (energy headers on)")
    ap.add_argument("--otel", action="store_true",
                    help="also measure joulegate with OTel tracing on, spans sent to the mock (path `otel`)")
    ap.add_argument("--otel-sample", type=float, default=1.0, metavar="R",
                    help="--otel: telemetry.sample_ratio (share of requests traced)")
    ap.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = ap.parse_args(argv)
    args.paths = [p.strip() for p in args.only.split(",") if p.strip()]
    if args.dashboards > 0 and "dashboards" not in args.paths:
        args.paths.append("dashboards")
    if args.dashboards <= 0:
        args.paths = [p for p in args.paths if p != "dashboards"]
    if args.otel and "otel" not in args.paths:
        args.paths.append("otel")
    if not args.otel:
        args.paths = [p for p in args.paths if p != "otel"]
    bad = [p for p in args.paths if p not in PATHS]
    if bad or not args.paths:
        ap.error(f"--only: unknown path(s) {bad}; choose from {','.join(PATHS)}")
    if args.quick:
        args.duration_s, args.warmup_s, args.no_stream_c1 = 2, 1, True
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.duration_s < 1 or args.warmup_s < 1:
        ap.error("--duration-s and --warmup-s must be >= 1 (wrk takes whole seconds)")
    return args


class Bench:
    """State of one benchmark run: the mock, the servers started, results and problems."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.include_usage = not args.no_stream_usage
        self.servers: list[Server] = []
        self.checks: dict[str, object] = {}
        self.problems: list[str] = []
        self.mock: Server | None = None
        self.power: Server | None = None  # a simulator used only for its power API (--energy)
        self.power_url: str | None = None
        self.startup_s: dict[str, list[float]] = {}  # start to ready, per start

    def problem(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)
        self.problems.append(msg)

    def start_mock(self) -> Server:
        port = free_port()
        argv = [sys.executable, "-m", "bench.mock_backend", "--port", str(port)]
        self.mock = Server("mock", argv, port, self.tmp)
        self.servers.append(self.mock)
        self.mock.start()
        wait_until(self.mock, tcp_ready(port), self.args.startup_timeout_s)
        return self.mock

    def start_power(self) -> Server:
        """--energy: a `joulegate sim-backend` whose power stream drives the proxy's meter, so
        every request is opened, closed and attributed as with a real power source."""
        port = free_port()
        argv = [sys.executable, "-m", "proxy", "sim-backend", "--profile", "h100-llama3.1-8b",
                "--port", str(port)]
        self.power = Server("power", argv, port, self.tmp)
        self.power_url = f"http://{HOST}:{port}"
        self.servers.append(self.power)
        self.power.start()
        wait_until(self.power, tcp_ready(port), self.args.startup_timeout_s)
        return self.power

    def start_proxy(self, path: str) -> Server:
        """Start the reference relay or joulegate in front of the mock; raise if not ready."""
        assert self.mock is not None
        port = free_port()
        if path == "reference":
            upstream = f"http://{HOST}:{self.mock.port}/v1"
            argv = [sys.executable, "-m", "bench.reference_relay", "--port", str(port),
                    "--upstream", upstream]  # fmt: skip
            ready = tcp_ready(port)
        else:
            admin = hashlib.sha256(DASHBOARD_KEY.encode()).hexdigest() if path == "dashboards" else None
            otlp = f"http://{HOST}:{self.mock.port}/v1/traces" if path == "otel" else None
            config = write_config(self.tmp, port, self.mock.port, self.args.ledger,
                                  self.power_url, admin, otlp, self.args.otel_sample)
            argv = joulegate_argv(self.args.joulegate_cmd, config, port)
            ready = models_ready(port, "/healthz")
        server = Server(path, argv, port, self.tmp)
        self.servers.append(server)
        t0 = time.monotonic()
        server.start()
        try:
            wait_until(server, ready, self.args.startup_timeout_s)
        except RuntimeError:
            server.stop()
            raise
        self.startup_s.setdefault(path, []).append(round(time.monotonic() - t0, 3))
        if path == "dashboards":
            self.open_dashboards(port)
        return server

    def open_dashboards(self, port: int) -> None:
        """`--dashboards N` streams of /v1/energy/stream (admin view, the page's 1 s interval),
        read by curl for as long as the proxy runs; raise unless each has had a snapshot."""
        url = f"http://{HOST}:{port}/v1/energy/stream?interval_s=1"
        for i in range(self.args.dashboards):
            out = self.tmp / f"dashboard-{port}-{i}.sse"
            argv = ["curl", "-sN", "-H", f"Authorization: Bearer {DASHBOARD_KEY}", "-o", str(out), url]
            reader = Server(f"dashboard-{port}-{i}", argv, port, self.tmp)
            self.servers.append(reader)
            reader.start()
            wait_until(reader, lambda out=out: out.exists() and b"data:" in out.read_bytes(),
                       self.args.startup_timeout_s)

    def run_path(self, path: str, todo: list[tuple[str, int]], round_no: int) -> list[Point]:
        """Start ``path``'s server, verify it once, measure its points, stop it."""
        assert self.mock is not None
        if path == "direct":
            server = self.mock
        else:
            try:
                server = self.start_proxy(path)
            except (OSError, RuntimeError) as exc:
                self.problem(f"{path}: did not start: {exc}")
                return [Point(path, m, c, error=f"did not start: {exc}") for m, c in todo]
        try:
            if path not in self.checks:
                try:
                    self.checks[path] = verify(server.port, self.include_usage)
                    print(f"{path}: verified {self.checks[path]}", flush=True)
                except (OSError, RuntimeError, ValueError) as exc:
                    self.checks[path] = {"error": str(exc)}
                    self.problem(f"{path}: verification failed: {exc}")
            points = []
            for mode, conns in todo:
                point = Point(path, mode, conns)
                try:
                    measure(server, self.mock, point, self.args.duration_s, self.args.warmup_s,
                            self.include_usage)  # fmt: skip
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    point.error = str(exc)
                label = f"[{round_no}] {path} {mode} c={conns}"
                if point.error is not None:
                    self.problem(f"{label}: {point.error}")
                elif point.errors:
                    self.problem(f"{label}: {point.errors} wrk errors (non-2xx, timeouts...)")
                if point.error is None:
                    print(f"  {label:<28} p50 {point.p50_ms:7.3f} ms  p99 {point.p99_ms:7.3f} ms"
                          f"  {point.rps:9,.0f} req/s", flush=True)  # fmt: skip
                points.append(point)
                if not server.alive():
                    break
            return points
        finally:
            if server is not self.mock:
                # Only the mock and the server under test may run during a point.
                server.stop()
                self.servers.remove(server)

    def stop_all(self) -> None:
        for s in reversed(self.servers):
            s.stop()


def median_points(rounds: list[list[Point]]) -> list[Point]:
    """Per (path, mode, c): the median of each figure over the rounds that measured it."""
    order: list[tuple[str, str, int]] = []
    by_key: dict[tuple[str, str, int], list[Point]] = {}
    for pts in rounds:
        for p in pts:
            key = (p.path, p.mode, p.conns)
            if key not in by_key:
                order.append(key)
                by_key[key] = []
            by_key[key].append(p)
    out = []
    for key in order:
        good = [p for p in by_key[key] if p.error is None]
        if len(good) <= 1:
            out.append(good[0] if good else by_key[key][0])  # keeps wrk's raw summary
            continue
        m = Point(*key)
        m.p50_ms = statistics.median(p.p50_ms for p in good)
        m.p99_ms = statistics.median(p.p99_ms for p in good)
        m.rps = statistics.median(p.rps for p in good)
        if key[1] == "stream":
            m.chunks_per_s = m.rps * STREAM_TOKENS
        m.requests = sum(p.requests for p in good)
        m.errors = sum(p.errors for p in good)
        for attr in ("server_cpu_us_per_req", "mock_cpu_us_per_req"):
            vals = [v for p in good if (v := getattr(p, attr)) is not None]
            setattr(m, attr, statistics.median(vals) if vals else None)
        out.append(m)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk not found: run `make bench-deps` (apt-get install wrk)", file=sys.stderr)
        return 2
    schedule = plan(args.paths, stream_c1=not args.no_stream_c1)
    started = time.time()
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="jg-bench-"))
    bench = Bench(args, tmp)
    rounds: list[list[Point]] = []
    with signals_as_interrupt():
        try:
            mock = bench.start_mock()
            if args.energy:
                bench.start_power()
            print(f"mock backend on :{mock.port}; {args.rounds} round(s), {args.duration_s} s "
                  f"per point (+{args.warmup_s} s warm-up), wrk -t1; load average "
                  f"{load_before[0]:.2f}; server logs in {tmp}", flush=True)  # fmt: skip
            if load_before[0] > IDLE_LOADAVG:
                print(f"warning: 1-min load average {load_before[0]:.2f} before start: other "
                      "work on this box skews every figure (use --rounds 3)", flush=True)  # fmt: skip
            for round_no in range(1, args.rounds + 1):
                order = list(schedule)
                if round_no % 2 == 0:
                    # Alternate which proxy goes first so slow drift favours neither.
                    order = [p for p in order if p == "direct"] + [
                        p for p in reversed(order) if p != "direct"
                    ]
                pts: list[Point] = []
                for path in order:
                    pts += bench.run_path(path, schedule[path], round_no)
                rounds.append(pts)
        except KeyboardInterrupt:
            # A second Ctrl-C must not cut the cleanup in the finally below short.
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            print("\ninterrupted; stopping servers", file=sys.stderr)
            return 130
        except (OSError, RuntimeError) as exc:  # the mock did not start
            bench.problem(f"mock: {exc}")
        finally:
            bench.stop_all()

    points = median_points(rounds)
    extra, targets = derive(points)
    if args.rounds > 1:
        print(f"\nmedians over {args.rounds} rounds")
    print_report(points, extra, targets)
    for f in bench.problems:
        print(f"problem: {f.splitlines()[0]}")

    result = {
        "started_unix_s": started,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                 "python": platform.python_version(), "platform": platform.platform(),
                 "loadavg_1m_before": load_before[0], "loadavg_1m_after": os.getloadavg()[0]},
        "settings": {"duration_s": args.duration_s, "warmup_s": args.warmup_s,
                     "rounds": args.rounds, "wrk_threads": 1, "stream_tokens": STREAM_TOKENS,
                     "completion_tokens": COMPLETION_TOKENS,
                     "stream_include_usage": bench.include_usage, "paths": args.paths,
                     "chunks_per_s_counts": "token chunks only (usage chunk and [DONE] excluded)",
                     "latency_unit": "ms", "aggregate": "median over rounds"},
        "points": [asdict(p) | extra.get((p.path, p.mode, p.conns), {}) for p in points],
        "rounds": [[asdict(p) for p in pts] for pts in rounds],
        "targets": targets,
        "verification": bench.checks,
        "startup_s": bench.startup_s,
        "problems": bench.problems,
    }  # fmt: skip
    out = args.out
    if out is None:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
        out = RESULTS_DIR / f"overhead-{stamp}.json"
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {out}")
    if bench.problems:
        print(f"server logs kept in {tmp}")
        return 1
    shutil.rmtree(tmp, ignore_errors=True)
    if args.strict and any(t["verdict"] == "FAIL" for t in targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
