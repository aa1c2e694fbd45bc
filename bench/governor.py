"""Governor bench: tokens/J and SLO attainment of round_robin, efficiency and
efficiency+governor (caps only, then caps and parking) at 10/30/60/90% of fleet capacity, in
virtual time.

    python -m bench.governor                # 300 s traces, seeds 1 and 2 (~3 min on a shared core)
    python -m bench.governor 60 1           # trace seconds, comma-separated seeds
    python -m bench.governor 300 1,2 --loads 0.6,0.9 --policies governor --fast
    python -m bench.governor 300 1,2 --fleet "b200+a100"      # a fleet of bench/fleets.py

Fleet, trace shape and SLO as bench/routing.py (2x h100, 2x a100, 2x l4; TTFT <= 2 s, TPOT <=
200 ms), or `--fleet` one of bench/fleets.py's mixes at its own capacity. tokens/J pools the
seeds (all output tokens / all joules, idle included); SLO% is the mean of the seeds'
attainment; p99s are the worst seed's; `vs rr` is tokens/J over round_robin's and `dSLO` the
SLO points over round_robin's (when round_robin ran). The governor's cap model is the
simulator's own (proxy/governor/capmodel.py), so these figures are an upper bound on what the same
decisions earn on a GPU whose response to a cap differs. Parking: asleep at half the idle
power (derived), a wake-up takes 2 s (proxy/sim/parking.py); `park%` is the share of GPU-time
asleep, pooled over the seeds. `--fast`: the governor with the fast raise (deeper caps, raised at
once when a queue forms; governor.fast_raise); `fast%`: fast raises per backend-minute.
`--slo-target T`: the governor with an attainment target (governor.slo_target; caps also follow
a fleet clock set from measured latency, proxy/governor/clock.py).
"""

from __future__ import annotations

import argparse
from typing import Any

from bench.fleets import FLEETS, fleet_spec
from bench.routing import FLEET, SLO_TPOT_S, SLO_TTFT_S, capacity_rps
from proxy.sim.fleet import fleet_capacity_rps, parse_fleet, simulate
from proxy.sim.traces import synth_trace

# (label, policy, park): `+governor` once with caps only and once with parking too.
POLICIES = (("round_robin", "round_robin", False), ("efficiency", "efficiency", False),
            ("efficiency+governor nopark", "efficiency+governor", False),
            ("efficiency+governor", "efficiency+governor", True))
LOADS = (0.1, 0.3, 0.6, 0.9)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.governor", description=__doc__.split("\n\n")[0])
    p.add_argument("duration_s", nargs="?", type=float, default=300.0, help="trace seconds (300)")
    p.add_argument("seeds", nargs="?", default="1,2", help="comma-separated seeds (1,2)")
    p.add_argument("--loads", default=",".join(f"{x:g}" for x in LOADS), help="shares of capacity (0.1,0.3,0.6,0.9)")
    p.add_argument("--policies", default="all", choices=("all", "governor"),
                   help="governor: round_robin and the two efficiency+governor rows only")
    p.add_argument("--fleet", choices=sorted(FLEETS), help="a bench/fleets.py mix instead of bench/routing's")
    p.add_argument("--fast", action="store_true", help="the governor with the fast raise (governor.fast_raise)")
    p.add_argument("--slo-target", type=float, default=None,
                   help="the governor's attainment target (governor.slo_target), e.g. 0.95")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    spec: dict[str, Any] = fleet_spec(FLEETS[args.fleet]) if args.fleet else FLEET
    reference = synth_trace(10.0, 5000.0, seed=12345)
    capacity = fleet_capacity_rps(parse_fleet(spec), reference, SLO_TPOT_S) if args.fleet else capacity_rps()
    policies = [x for x in POLICIES if args.policies == "all" or x[1] != "efficiency"]
    print(f"fleet {args.fleet or 'bench/routing'}; capacity {capacity:.2f} req/s; {args.duration_s:.0f} s traces; "
          f"seeds {seeds}; fast raise {'on' if args.fast else 'off'}; attainment target {args.slo_target or 'none'}")
    print(f"{'load':>5} {'policy':<28}{'tok/J':>8}{'SLO%':>7}{'TTFT p99':>10}{'TPOT p99':>10}{'park%':>7}"
          f"{'fast%':>7}{'vs rr':>7}{'dSLO':>6}")
    for load in (float(x) for x in args.loads.split(",")):
        rr: tuple[float, float] | None = None
        for label, policy, park in policies:
            tokens = joules = parked_s = gpu_s = fast = 0.0
            slo, ttft, tpot = [], [], []
            for seed in seeds:
                r = simulate(parse_fleet(spec), synth_trace(load * capacity, args.duration_s, seed=seed), policy,
                             slo_ttft_s=SLO_TTFT_S, slo_tpot_s=SLO_TPOT_S, park=park, fast_raise=args.fast,
                             slo_target=args.slo_target)
                tokens += r.output_tokens
                joules += r.joules
                slo.append(r.slo_attainment)
                ttft.append(r.ttft_p99_ms)
                tpot.append(r.tpot_p99_ms)
                parked_s += sum(g.get("parked_s", 0.0) for g in (r.governor or {}).values())
                fast += sum(g.get("fast_raises", 0) for g in (r.governor or {}).values())
                gpu_s += len(r.backends) * r.makespan_s
            tpj, slo_pct = tokens / joules, 100 * sum(slo) / len(slo)
            rr = (tpj, slo_pct) if policy == "round_robin" else rr
            vs = f"{tpj / rr[0]:>6.2f}x{slo_pct - rr[1]:>+6.1f}" if rr else ""
            print(f"{load:>5.0%} {label:<28}{tpj:>8.3f}{slo_pct:>7.1f}{max(ttft):>10.0f}{max(tpot):>10.0f}"
                  f"{100 * parked_s / gpu_s:>7.1f}{60 * fast / gpu_s:>7.2f}{vs}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
