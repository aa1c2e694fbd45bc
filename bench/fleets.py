"""Routing across fleet mixes: efficiency vs round_robin on fleets other than bench/routing's.

    python -m bench.fleets               # 4 fleets x loads 10, 30% x seeds 1, 2; 300 s traces
    python -m bench.fleets 60 1          # trace seconds, comma-separated seeds

A policy tuned on one fleet is tuned to a test: this runs the same virtual-time simulation as
bench/routing (synthetic Gamma trace, SLO TTFT <= 2 s and TPOT <= 200 ms) on four mixes of the
B200, H100, A100 and L4 profiles, each at 10% and 30% of its own capacity, and prints tokens/J
(idle included, pooled over seeds), SLO attainment and efficiency / round_robin per fleet and
load. Target: efficiency >= 1.4x round_robin at light load (10%) with SLO attainment within
0.5 point.
"""

from __future__ import annotations

import sys

from bench.routing import SLO_TPOT_S, SLO_TTFT_S
from proxy.sim.fleet import fleet_capacity_rps, parse_fleet, simulate
from proxy.sim.traces import synth_trace

FLEETS: dict[str, list[tuple[str, int]]] = {
    "h100+a100+l4 (bench/routing)": [("h100-llama3.1-8b", 2), ("a100-llama3.1-8b", 2), ("l4-llama3.1-8b", 2)],
    "b200+h100+l4": [("b200-llama3.1-8b", 1), ("h100-llama3.1-8b", 2), ("l4-llama3.1-8b", 3)],
    "b200+a100": [("b200-llama3.1-8b", 1), ("a100-llama3.1-8b", 3)],
    "h100+l4 (many small)": [("h100-llama3.1-8b", 1), ("l4-llama3.1-8b", 6)],
}
POLICIES = ("round_robin", "efficiency")
LOADS = (0.1, 0.3)
TARGET_RATIO = 1.4
SLO_SLACK_POINTS = 0.5


def fleet_spec(mix: list[tuple[str, int]]) -> dict[str, list[dict[str, object]]]:
    return {"backends": [{"name": p.split("-")[0], "profile": p, "count": n} for p, n in mix]}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    duration_s = float(args[0]) if args else 300.0
    seeds = [int(s) for s in (args[1] if len(args) > 1 else "1,2").split(",")]
    reference = synth_trace(10.0, 5000.0, seed=12345)
    print(f"{duration_s:.0f} s traces; seeds {seeds}; tokens/J idle included")
    print(f"{'fleet':<30}{'load':>5} {'policy':<13}{'tok/J':>8}{'SLO%':>7}{'vs rr':>7}")
    failed = 0
    for name, mix in FLEETS.items():
        spec = fleet_spec(mix)
        capacity = fleet_capacity_rps(parse_fleet(spec), reference, SLO_TPOT_S)
        for load in LOADS:
            results: dict[str, tuple[float, float]] = {}
            for policy in POLICIES:
                tokens = joules = 0.0
                slo = []
                for seed in seeds:
                    r = simulate(parse_fleet(spec), synth_trace(load * capacity, duration_s, seed=seed), policy,
                                 slo_ttft_s=SLO_TTFT_S, slo_tpot_s=SLO_TPOT_S)
                    tokens += r.output_tokens
                    joules += r.joules  # idle over the offered span included
                    slo.append(r.slo_attainment)
                results[policy] = (tokens / joules, 100.0 * sum(slo) / len(slo))
            rr_tpj, rr_slo = results["round_robin"]
            for policy, (tpj, slo_pct) in results.items():
                print(f"{name:<30}{load * 100:>4.0f}% {policy:<13}{tpj:>8.3f}{slo_pct:>7.1f}{tpj / rr_tpj:>6.2f}x")
            if load == LOADS[0]:
                tpj, slo_pct = results["efficiency"]
                ok = tpj / rr_tpj >= TARGET_RATIO and slo_pct >= rr_slo - SLO_SLACK_POINTS
                failed += not ok
                print(f"{'':<30}{'':>5} {'PASS' if ok else 'FAIL'}  efficiency >= {TARGET_RATIO}x round_robin, "
                      f"SLO within {SLO_SLACK_POINTS} point")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
