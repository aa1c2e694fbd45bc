"""Governor bench: tokens/J and SLO attainment of round_robin, efficiency and
efficiency+governor (caps only, then caps and parking) at 10/30/60/90% of fleet capacity, in
virtual time.

    python -m bench.governor                # 300 s traces, seeds 1 and 2 (~3 min on a shared core)
    python -m bench.governor 60 1           # trace seconds, comma-separated seeds

Fleet, trace shape and SLO as bench/routing.py (2x h100, 2x a100, 2x l4; TTFT <= 2 s, TPOT <=
200 ms). tokens/J pools the seeds (all output tokens / all joules, idle included); SLO% is the
mean of the seeds' attainment; p99s are the worst seed's. The governor's cap model is the
simulator's own (proxy/governor/capmodel.py), so these figures are an upper bound on what the same
decisions earn on a GPU whose response to a cap differs. Parking: asleep at half the idle
power (derived), a wake-up takes 2 s (proxy/sim/parking.py); `park%` is the share of GPU-time
asleep, pooled over the seeds.
"""

from __future__ import annotations

import sys

from bench.routing import FLEET, SLO_TPOT_S, SLO_TTFT_S, capacity_rps
from proxy.sim.fleet import parse_fleet, simulate
from proxy.sim.traces import synth_trace

# (label, policy, park): `+governor` once with caps only and once with parking too.
POLICIES = (("round_robin", "round_robin", False), ("efficiency", "efficiency", False),
            ("efficiency+governor nopark", "efficiency+governor", False),
            ("efficiency+governor", "efficiency+governor", True))
LOADS = (0.1, 0.3, 0.6, 0.9)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    duration_s = float(args[0]) if args else 300.0
    seeds = [int(s) for s in (args[1] if len(args) > 1 else "1,2").split(",")]
    capacity = capacity_rps()
    print(f"capacity {capacity:.2f} req/s; {duration_s:.0f} s traces; seeds {seeds}")
    print(f"{'load':>5} {'policy':<28}{'tok/J':>8}{'SLO%':>7}{'TTFT p99':>10}{'TPOT p99':>10}{'park%':>7}")
    for load in LOADS:
        for label, policy, park in POLICIES:
            tokens = joules = parked_s = gpu_s = 0.0
            slo, ttft, tpot = [], [], []
            for seed in seeds:
                r = simulate(parse_fleet(FLEET), synth_trace(load * capacity, duration_s, seed=seed), policy,
                             slo_ttft_s=SLO_TTFT_S, slo_tpot_s=SLO_TPOT_S, park=park)
                tokens += r.output_tokens
                joules += r.joules
                slo.append(r.slo_attainment)
                ttft.append(r.ttft_p99_ms)
                tpot.append(r.tpot_p99_ms)
                parked_s += sum(g.get("parked_s", 0.0) for g in (r.governor or {}).values())
                gpu_s += len(r.backends) * r.makespan_s
            print(f"{load:>5.0%} {label:<28}{tokens / joules:>8.3f}{100 * sum(slo) / len(slo):>7.1f}"
                  f"{max(ttft):>10.0f}{max(tpot):>10.0f}{100 * parked_s / gpu_s:>7.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
