"""`joulegate simulate`'s command line: flags, the table it prints, its JSON and plot."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from proxy.sim.fleet import (
    DEFAULT_WAKE_S,
    OBJECTIVES,
    POLICY_NAMES,
    FleetError,
    SimResult,
    fleet_capacity_rps,
    load_fleet,
    simulate,
)
from proxy.sim.plot import svg_bars
from proxy.sim.traces import TraceError, read_trace


def add_simulate_parser(sub: argparse._SubParsersAction[Any]) -> argparse.ArgumentParser:
    """Add `simulate ...` to a subparsers object (proxy/cli.py calls this)."""
    p: argparse.ArgumentParser = sub.add_parser("simulate", help="virtual-time fleet simulation; one table row per policy")
    p.add_argument("--fleet", required=True, help="FLEET.yaml: backends: [{name, profile, count}]")
    p.add_argument("--trace", required=True, help="TRACE.csv: arrival_s,prompt_tokens,output_tokens")
    p.add_argument("--policy", default=",".join(POLICY_NAMES),
                   help="comma-separated policies (default: all three); NAME+governor adds power caps "
                        "and parks idle backends")
    p.add_argument("--objective", choices=OBJECTIVES, default="joules",
                   help="what `efficiency` minimises: GPU joules, or grams CO2e (needs sites:)")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=200.0)
    p.add_argument("--wake-s", type=float, default=DEFAULT_WAKE_S,
                   help=f"seconds a parked backend takes to wake up (default {DEFAULT_WAKE_S:g})")
    p.add_argument("--fast-raise", action="store_true",
                   help="+governor: deeper caps, raised at once when a queue forms (governor.fast_raise)")
    p.add_argument("--slo-target", type=float, default=None,
                   help="+governor: attainment target, the share of requests to meet the SLO (governor.slo_target): "
                        "caps also follow a fleet clock set from measured latency")
    p.add_argument("--no-park", action="store_true",
                   help="+governor sets caps only: nothing is parked (to see what parking saves)")
    p.add_argument("--json", dest="json_out", help="write the results as JSON here")
    p.add_argument("--plot", dest="plot_out", help="write an SVG of tokens/J per policy here")
    p.add_argument("--check-attribution", action="store_true",
                   help="also run the proxy's attribution over the sampled counters (slower)")
    return p


def run_simulate(args: argparse.Namespace) -> int:
    """Run a parsed `simulate` command: 0, or 2 with one line for bad input."""
    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    bad = [p for p in policies if p.partition("+")[0] not in POLICY_NAMES or p.partition("+")[2] not in ("", "governor")]
    if not policies or bad:
        print(f"joulegate: error: unknown policy {bad[0] if bad else '(none)'!r}; choose from "
              f"{', '.join(POLICY_NAMES)}", file=sys.stderr)
        return 2
    if not args.slo_ttft_ms > 0 or not args.slo_tpot_ms > 0:
        print("joulegate: error: --slo-ttft-ms and --slo-tpot-ms must be positive", file=sys.stderr)
        return 2
    slo_target = getattr(args, "slo_target", None)
    if slo_target is not None and not 0.5 < slo_target < 1.0:
        print("joulegate: error: --slo-target must be between 0.5 and 1 (exclusive)", file=sys.stderr)
        return 2
    if slo_target is not None and getattr(args, "fast_raise", False):
        print("joulegate: error: --fast-raise and --slo-target exclude each other (with a target the caps "
              "follow each backend's queue between decisions already)", file=sys.stderr)
        return 2
    wake_s = getattr(args, "wake_s", DEFAULT_WAKE_S)
    if not wake_s >= 0:
        print("joulegate: error: --wake-s must be >= 0", file=sys.stderr)
        return 2
    try:
        fleet = load_fleet(args.fleet)
        trace = read_trace(args.trace)
    except (FleetError, TraceError) as exc:
        print(f"joulegate: error: {exc}", file=sys.stderr)
        return 2
    objective = getattr(args, "objective", "joules")
    if objective == "carbon" and any(b.site is None for b in fleet):
        print(f"joulegate: error: {args.fleet}: --objective carbon needs `sites:` and a `site:` "
              "per backend", file=sys.stderr)
        return 2
    slo_ttft_s, slo_tpot_s = args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3
    results = [simulate(fleet, trace, p, slo_ttft_s=slo_ttft_s, slo_tpot_s=slo_tpot_s,
                        attribute=args.check_attribution, objective=objective,
                        park=not getattr(args, "no_park", False), wake_s=wake_s,
                        fast_raise=getattr(args, "fast_raise", False), slo_target=slo_target) for p in policies]
    capacity_rps = fleet_capacity_rps(fleet, trace, slo_tpot_s)
    print(format_results(results, capacity_rps, args.slo_ttft_ms, args.slo_tpot_ms))
    try:
        if args.json_out:
            payload = {"policies": {r.policy: r.contract_json() for r in results},
                       "details": {r.policy: r.details_json() for r in results},
                       "capacity_rps": capacity_rps,
                       "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms},
                       "objective": objective}
            with open(args.json_out, "w") as f:
                json.dump(payload, f, indent=2)
        if args.plot_out:
            load = results[0].offered_rps
            title = (f"output tokens/J at {load:.1f} req/s offered "
                     f"({100 * load / capacity_rps:.0f}% of fleet capacity)" if capacity_rps else "")
            with open(args.plot_out, "w") as f:
                f.write(svg_bars({r.policy: r.output_tokens_per_joule for r in results},
                                 title=title, y_label="output tokens / J"))
    except OSError as exc:
        print(f"joulegate: error: cannot write: {exc}", file=sys.stderr)
        return 2
    return 0


def format_results(results: Sequence[SimResult], capacity_rps: float, slo_ttft_ms: float,
                   slo_tpot_ms: float) -> str:
    """The table `simulate` prints: one row per policy, then per-backend utilisation."""
    if not results:
        return ""
    r0 = results[0]
    w = max(14, 2 + max(len(r.policy) for r in results))  # `efficiency+governor` is 19 wide
    load = f"{r0.offered_rps:.2f} req/s offered"
    if capacity_rps > 0:
        load += f" = {100 * r0.offered_rps / capacity_rps:.0f}% of capacity {capacity_rps:.1f} req/s"
    lines = [f"{r0.requests} requests, {load}; SLO: TTFT <= {slo_ttft_ms:g} ms and "
             f"TPOT <= {slo_tpot_ms:g} ms per request",
             f"{'policy':<{w}}{'tok/J':>8}{'J/req':>9}{'idle%':>7}{'park%':>7}{'SLO%':>8}{'TTFT p50':>10}"
             f"{'TTFT p99':>10}{'TPOT p99':>10}{'end s':>8}"]
    for r in results:
        parked = _parked_s(r)
        share = f"{100 * sum(parked.values()) / (len(parked) * r.makespan_s):.1f}" if parked and r.makespan_s else "-"
        lines.append(f"{r.policy:<{w}}{r.output_tokens_per_joule:>8.3f}{r.joules_per_request:>9.1f}"
                     f"{100 * r.idle_energy_share:>7.1f}{share:>7}{100 * r.slo_attainment:>8.2f}"
                     f"{r.ttft_p50_ms:>8.0f}ms{r.ttft_p99_ms:>8.0f}ms{r.tpot_p99_ms:>8.0f}ms"
                     f"{r.makespan_s:>8.0f}")
    if r0.gco2e_total is not None:
        lines.append(f"carbon (objective {r0.objective}; idle and PUE included):")
        for r in results:
            lines.append(f"  {r.policy:<{w}}{r.gco2e_total:>10.2f} gCO2e  "
                         f"{r.gco2e_per_1k_output_tokens:>8.4f} g/1k tok  "
                         f"idle {r.idle_gco2e:.2f} g")
    lines.append("utilisation (busy share of the run; parked share if any), per backend:")
    for r in results:
        parked = _parked_s(r)
        cells = "  ".join(f"{b.name} {100 * b.utilisation:.0f}%" + (
            f" (parked {100 * parked[b.name] / r.makespan_s:.0f}%)" if parked.get(b.name) else "")
            for b in r.backends.values())
        lines.append(f"  {r.policy:<{w}}{cells}")
    return "\n".join(lines)


def _parked_s(r: SimResult) -> dict[str, float]:
    """Seconds asleep per backend; empty without parking (no governor, or --no-park)."""
    gov = r.governor or {}
    return {name: g["parked_s"] for name, g in gov.items() if "parked_s" in g}


def main_simulate(argv: Sequence[str] | None = None) -> int:
    """`python -m proxy.sim.simulate_cli --fleet ... --trace ...`: `simulate` without the CLI."""
    parser = argparse.ArgumentParser(prog="joulegate")
    add_simulate_parser(parser.add_subparsers(dest="command", required=True))
    return run_simulate(parser.parse_args(["simulate", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    sys.exit(main_simulate())
