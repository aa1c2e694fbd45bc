"""Workload traces: `joulegate trace synth`, and reading and writing TRACE.csv.

A trace has the fields of the Azure LLM inference traces (TIMESTAMP, ContextTokens,
GeneratedTokens) under the contract's names: `arrival_s,prompt_tokens,output_tokens`, one
request a row, sorted by arrival. Neither the Azure traces nor BurstGPT can be downloaded
here, so `synth_trace` draws one with their published shape:

- arrivals: a renewal process with Gamma inter-arrival times of mean 1 / rate and coefficient
  of variation `cv` (> 1: bursty; 1 would be Poisson), as BurstGPT fits Azure's arrivals;
- lengths: log-normal. The defaults follow the Azure 2023 conversation trace: prompt median
  ~1020 tokens, output median ~129 and mean ~210 tokens; clipped to [4, 8192] prompt tokens
  (longer prompts would be one multi-second prefill on an L4) and [1, 2048] output tokens.

Deterministic for a seed (one `random.Random(seed)`, draws in a fixed order).
"""

from __future__ import annotations

import argparse
import csv
import math
import random
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["TraceError", "TraceRequest", "TraceShape", "read_trace", "synth_trace", "write_trace",
           "main_trace", "add_trace_parser", "run_trace"]

HEADER = ("arrival_s", "prompt_tokens", "output_tokens")
DEFAULT_CV = 1.5


class TraceError(ValueError):
    """A trace file that cannot be used; the message names the file and the line."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace: arrival time in s from the trace start, token counts."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class TraceShape:
    """Length and burstiness parameters of a synthetic trace (tokens; `cv` is unitless)."""

    cv: float = DEFAULT_CV
    prompt_median_tokens: float = 1020.0
    prompt_sigma: float = 0.6
    output_median_tokens: float = 129.0
    output_sigma: float = 1.0
    prompt_min_tokens: int = 4
    prompt_max_tokens: int = 8192
    output_min_tokens: int = 1
    output_max_tokens: int = 2048


def synth_trace(rate_rps: float, duration_s: float, seed: int = 0,
                shape: TraceShape | None = None) -> list[TraceRequest]:
    """Requests arriving at `rate_rps` on average over [0, duration_s), bursty and seeded."""
    if not rate_rps > 0 or not duration_s > 0:
        raise ValueError("rate and duration must be positive")
    shape = shape or TraceShape()
    if not shape.cv > 0:
        raise ValueError("cv must be positive")
    rng = random.Random(seed)
    # Gamma(k, theta) has mean k * theta and CV 1 / sqrt(k).
    k = 1.0 / (shape.cv * shape.cv)
    theta = 1.0 / (rate_rps * k)
    mu_p, mu_o = math.log(shape.prompt_median_tokens), math.log(shape.output_median_tokens)
    out: list[TraceRequest] = []
    # Start with a draw too, so a trace does not always begin with a request at 0.
    t_s = rng.gammavariate(k, theta)
    while t_s < duration_s:
        prompt = round(rng.lognormvariate(mu_p, shape.prompt_sigma))
        output = round(rng.lognormvariate(mu_o, shape.output_sigma))
        out.append(TraceRequest(
            round(t_s, 6),
            min(max(prompt, shape.prompt_min_tokens), shape.prompt_max_tokens),
            min(max(output, shape.output_min_tokens), shape.output_max_tokens),
        ))
        t_s += rng.gammavariate(k, theta)
    return out


def write_trace(path: str, requests: Iterable[TraceRequest]) -> None:
    """Write TRACE.csv (header `arrival_s,prompt_tokens,output_tokens`)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for r in requests:
            w.writerow((f"{r.arrival_s:.6f}", r.prompt_tokens, r.output_tokens))


def read_trace(path: str) -> list[TraceRequest]:
    """Read TRACE.csv; TraceError naming the line for anything malformed. Rows are sorted by
    arrival (stable), so a hand-edited file out of order still replays as a timeline."""
    try:
        f = open(path, newline="")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header[:3]) != HEADER:
            raise TraceError(f"{path}:1: header must be {','.join(HEADER)}")
        out: list[TraceRequest] = []
        for line, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            try:
                arrival_s, prompt, output = float(row[0]), int(row[1]), int(row[2])
            except (ValueError, IndexError):
                raise TraceError(f"{path}:{line}: expected arrival_s,prompt_tokens,output_tokens "
                                 f"(a number and two integers), got {','.join(row)!r}") from None
            if not (math.isfinite(arrival_s) and arrival_s >= 0) or prompt < 1 or output < 1:
                raise TraceError(f"{path}:{line}: arrival_s must be >= 0 and token counts >= 1")
            out.append(TraceRequest(arrival_s, prompt, output))
    if not out:
        raise TraceError(f"{path}: no requests")
    out.sort(key=lambda r: r.arrival_s)
    return out


# -- `joulegate trace synth` -------------------------------------------------------------------


def add_trace_parser(sub: argparse._SubParsersAction[Any]) -> argparse.ArgumentParser:
    """Add `trace synth ...` to a subparsers object (proxy/cli.py calls this)."""
    trace: argparse.ArgumentParser = sub.add_parser("trace", help="workload traces")
    trace_sub = trace.add_subparsers(dest="trace_command", required=True,
                                     parser_class=type(trace))
    synth = trace_sub.add_parser("synth", help="synthetic bursty trace with Azure-like lengths")
    synth.add_argument("--rate", type=float, required=True, help="mean arrivals per second")
    synth.add_argument("--duration-s", type=float, required=True, help="trace length in s")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--cv", type=float, default=DEFAULT_CV,
                       help="coefficient of variation of inter-arrival times (default 1.5)")
    synth.add_argument("--out", required=True, help="TRACE.csv to write")
    return trace


def run_trace(args: argparse.Namespace) -> int:
    """Run a parsed `trace ...` command; 2 with one line on bad values."""
    if not args.rate > 0 or not args.duration_s > 0 or not args.cv > 0:
        print("joulegate: error: --rate, --duration-s and --cv must be positive", file=sys.stderr)
        return 2
    requests = synth_trace(args.rate, args.duration_s, args.seed, TraceShape(cv=args.cv))
    try:
        write_trace(args.out, requests)
    except OSError as exc:
        print(f"joulegate: error: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    mean_out = sum(r.output_tokens for r in requests) / max(len(requests), 1)
    mean_in = sum(r.prompt_tokens for r in requests) / max(len(requests), 1)
    print(f"{args.out}: {len(requests)} requests over {args.duration_s:g} s "
          f"({len(requests) / args.duration_s:.2f} req/s), mean prompt {mean_in:.0f} tokens, "
          f"mean output {mean_out:.0f} tokens")
    return 0


def main_trace(argv: Sequence[str] | None = None) -> int:
    """`python -m proxy.sim.traces synth ...`: the same command without the joulegate CLI."""
    parser = argparse.ArgumentParser(prog="joulegate")
    add_trace_parser(parser.add_subparsers(dest="command", required=True))
    return run_trace(parser.parse_args(["trace", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    sys.exit(main_trace())
