"""Hostile-input fuzzing of every public endpoint, over raw sockets, against a real proxy.

    python -m bench.fuzz [--cases 5000] [--seed N] [--workers 4]

Starts two simulated GPUs and `joulegate serve` in front of them (server.max_body_bytes 64 KiB,
a SQLite ledger, one tenant with a tiny energy budget), sends hypothesis-generated cases from
`bench/fuzz_cases.py` and judges every answer:

- no 5xx at all (the simulators are healthy, so none is genuinely upstream);
- every 4xx is OpenAI-shaped JSON `{"error": {"message", "type", "param", "code"}}`, except
  uvicorn's own plain-text 400 for bytes that are not valid HTTP/1.1 (the app never sees them);
- path tricks (`/v1/../metrics`, `%2e%2e`, `%3F`) answered by the proxy, never forwarded;
- an answer to every complete request, the proxy alive at the end, no traceback in its log,
  and RSS growth after the first 500 cases under 50 MiB.

Prints one row per endpoint family and exits 1 on any failure. `tests/test_fuzz.py` runs a
small sample of the same cases with the same oracle.
"""

from __future__ import annotations

import argparse
import http.client
import io
import select
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed

from bench.fuzz_cases import KNOWN_ID, MAX_BODY, Case, cases
from tests.conftest import KEYS, MODEL, ProxyProc, SimBackend, backend_yaml, tenants_yaml

#: Per-case limit: the longest valid request decodes ~1k tokens on the fastest simulated GPU.
CASE_TIMEOUT_S = 30.0
#: Incomplete requests: the proxy owes no answer; it only has to let go of the connection.
INCOMPLETE_TIMEOUT_S = 5.0
RSS_WARMUP_CASES = 500
RSS_GROWTH_LIMIT_KIB = 50 * 1024


def fuzz_config(sims: list[SimBackend], ledger_path: Path) -> str:
    """The proxy under test: small body limit, SQLite ledger, globex on a tiny energy budget."""
    config = f"server: {{max_body_bytes: {MAX_BODY}, request_timeout_s: {CASE_TIMEOUT_S}}}\nbackends:\n"
    for sim in sims:
        config += backend_yaml(sim.profile.split("-")[0], sim.url, [MODEL],
                               f", power: {{source: sim, url: '{sim.url}', interval_s: 0.1}}")
    config += f"routing: {{policy: least_loaded}}\nledger: 'sqlite://{ledger_path}'\n" + tenants_yaml()
    return config.replace("- {name: globex,", "- {energy_budget: {joules: 5, per: day}, name: globex,")


@contextmanager
def fleet(tmp: Path) -> Iterator[ProxyProc]:
    """Two simulators and a proxy in front of them; one known request booked for lookups."""
    sims: list[SimBackend] = []
    proxy = None
    try:
        sims = [SimBackend("b200-llama3.1-8b", tmp), SimBackend("h100-llama3.1-8b", tmp)]
        proxy = ProxyProc(fuzz_config(sims, tmp / "fuzz-ledger.db"), tmp)
        resp = httpx.post(proxy.url + "/v1/chat/completions", timeout=30, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            headers={"Authorization": f"Bearer {KEYS['acme']}", "X-Request-Id": KNOWN_ID})
        assert resp.status_code == 200, resp.text
        yield proxy
    finally:
        if proxy is not None:
            proxy.stop()
        for sim in sims:
            sim.stop()


# -- the wire ---------------------------------------------------------------------------------------

def exchange(port: int, case: Case) -> tuple[bytes, bool]:
    """Write `case.raw` while reading whatever comes back, until EOF or the timeout.

    Reading while writing matters: the proxy may answer 413 before the body is all sent.
    Returns the bytes received and whether the timeout cut the exchange short.
    """
    timeout_s = CASE_TIMEOUT_S if case.complete else INCOMPLETE_TIMEOUT_S
    deadline = time.monotonic() + timeout_s
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.setblocking(False)
        out = memoryview(case.raw)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(received), True
            readable, writable, _ = select.select([sock], [sock] if out else [], [], remaining)
            if writable:
                try:
                    out = out[sock.send(out[:65536]):]
                    if not out and not case.complete:
                        sock.shutdown(socket.SHUT_WR)  # the body never completes: let go
                except OSError:
                    out = memoryview(b"")  # the server stopped reading (413, bad request)
            if readable:
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    return bytes(received), False
                if not chunk:
                    return bytes(received), False
                received += chunk


class _Bytes:
    """Enough of a socket for http.client.HTTPResponse to parse bytes already received."""

    def __init__(self, data: bytes) -> None:
        self._file = io.BytesIO(data)

    def makefile(self, *_: object, **__: object) -> io.BytesIO:
        return self._file


@dataclass(slots=True)
class Verdict:
    status: int | None  # None: no answer
    problem: str | None  # None: acceptable
    shape: bool = False  # the problem is a 4xx that is not OpenAI-shaped


def judge(case: Case, data: bytes, timed_out: bool) -> Verdict:
    """The oracle for one exchange."""
    if not data:
        if not case.complete or not case.valid_http:
            return Verdict(None, None)
        return Verdict(None, "no answer in time" if timed_out else "connection closed without an answer")
    method = case.raw.split(b" ", 1)[0].decode("latin-1")
    try:
        resp = http.client.HTTPResponse(_Bytes(data), method=method)  # type: ignore[arg-type]
        resp.begin()
        body = resp.read()
    except (http.client.HTTPException, ValueError) as exc:
        if case.complete and case.valid_http:
            return Verdict(None, f"unparseable answer: {type(exc).__name__} {data[:120]!r}")
        return Verdict(None, None)
    status = resp.status
    if not case.may_forward and resp.getheader("x-energy-backend"):
        return Verdict(status, f"forwarded to backend {resp.getheader('x-energy-backend')}: {body[:200]!r}")
    if status >= 500:
        return Verdict(status, f"HTTP {status}: {body[:300]!r}")
    plain = resp.getheader("content-type", "").startswith("text/plain")
    uvicorn_400 = status == 400 and plain and not case.valid_http  # refused before the app saw it
    if status >= 400 and method != "HEAD" and not _openai_error(body) and not uvicorn_400:
        return Verdict(status, f"HTTP {status} not OpenAI-shaped: {body[:200]!r}", shape=True)
    if not uvicorn_400 and not resp.getheader("x-request-id"):
        return Verdict(status, f"HTTP {status} without an x-request-id: {body[:120]!r}", shape=True)
    return Verdict(status, None)


def _openai_error(body: bytes) -> bool:
    try:
        error = orjson.loads(body)["error"]
    except (orjson.JSONDecodeError, TypeError, KeyError):
        return False
    return (isinstance(error, dict) and {"message", "type", "param", "code"} <= error.keys()
            and isinstance(error["message"], str) and isinstance(error["type"], str))


def check(port: int, case: Case) -> Verdict:
    """Send one case and judge the answer."""
    return judge(case, *exchange(port, case))


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def health_problems(proxy: ProxyProc, rss_start_kib: int) -> list[str]:
    """The proxy is alive, logged no traceback, and grew less than the limit."""
    problems = []
    if proxy.popen.poll() is not None:
        return [f"proxy exited with {proxy.popen.returncode}"]
    growth = rss_kib(proxy.popen.pid) - rss_start_kib
    if growth > RSS_GROWTH_LIMIT_KIB:
        problems.append(f"RSS grew {growth / 1024:.1f} MiB after warm-up (limit {RSS_GROWTH_LIMIT_KIB / 1024:.0f})")
    log = proxy.log()
    if "Traceback" in log:
        problems.append("traceback in the proxy log:\n" + log[log.index("Traceback"):][:3000])
    return problems


# -- the run ----------------------------------------------------------------------------------------

def generate(n: int, seed: int) -> list[Case]:
    """`n` cases from the strategies, reproducible for a given seed (generation phase only)."""
    out: list[Case] = []

    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @hypothesis_seed(seed)
    @given(cases)
    def collect(case: Case) -> None:
        out.append(case)

    collect()
    return out


@dataclass(slots=True)
class Family:
    """One table row."""

    cases: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    server_errors: int = 0
    bad_shape: int = 0


@dataclass(slots=True)
class Report:
    families: dict[str, Family] = field(default_factory=dict)
    failures: list[tuple[Case, Verdict]] = field(default_factory=list)
    rss_start_kib: int = 0
    rss_end_kib: int = 0
    problems: list[str] = field(default_factory=list)


def run(proxy: ProxyProc, todo: list[Case], workers: int) -> Report:
    """Send every case (`workers` at a time) and tally the verdicts."""
    report = Report()
    report.rss_start_kib = rss_kib(proxy.popen.pid)
    with ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(check, proxy.port, case): case for case in todo}
        for done, future in enumerate(as_completed(futures), 1):
            case, verdict = futures[future], future.result()
            row = report.families.setdefault(case.family, Family())
            row.cases += 1
            row.statuses[str(verdict.status or "none")] += 1
            row.server_errors += verdict.status is not None and verdict.status >= 500
            row.bad_shape += verdict.shape
            if verdict.problem:
                report.failures.append((case, verdict))
            if done == min(RSS_WARMUP_CASES, len(todo)):
                report.rss_start_kib = rss_kib(proxy.popen.pid)
    report.problems = health_problems(proxy, report.rss_start_kib)
    if proxy.popen.poll() is None:
        report.rss_end_kib = rss_kib(proxy.popen.pid)
    return report


def table(report: Report) -> str:
    lines = [f"{'family':<16} {'cases':>6} {'5xx':>4} {'bad4xx':>6}  statuses"]
    for name in sorted(report.families):
        row = report.families[name]
        statuses = " ".join(f"{k}:{v}" for k, v in sorted(row.statuses.items()))
        lines.append(f"{name:<16} {row.cases:>6} {row.server_errors:>4} {row.bad_shape:>6}  {statuses}")
    total = Family()
    for row in report.families.values():
        total.cases += row.cases
        total.server_errors += row.server_errors
        total.bad_shape += row.bad_shape
    lines.append(f"{'TOTAL':<16} {total.cases:>6} {total.server_errors:>4} {total.bad_shape:>6}")
    lines.append(f"proxy RSS: {report.rss_start_kib / 1024:.1f} MiB after {RSS_WARMUP_CASES} cases, "
                 f"{report.rss_end_kib / 1024:.1f} MiB at the end")
    return "\n".join(lines)


def describe(case: Case, verdict: Verdict) -> str:
    return f"[{case.family}] {case.note}: {verdict.problem}\n    request: {case.raw[:300]!r}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=4, help="cases in flight at once")
    args = parser.parse_args(argv)
    started = time.monotonic()
    todo = generate(args.cases, args.seed)
    print(f"generated {len(todo)} cases (seed {args.seed}) in {time.monotonic() - started:.1f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="joulegate-fuzz-") as tmp, fleet(Path(tmp)) as proxy:
        sent = time.monotonic()
        report = run(proxy, todo, args.workers)
        print(f"sent in {time.monotonic() - sent:.1f} s, {args.workers} at a time\n")
        print(table(report))
        for case, verdict in report.failures[:20]:
            print(describe(case, verdict))
        for problem in report.problems:
            print("PROBLEM:", problem)
    failed = bool(report.failures or report.problems)
    print("\nFAIL" if failed else "\nPASS", f"({len(report.failures)} failing cases)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
