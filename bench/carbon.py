"""Carbon bench: gCO2e per 1k output tokens of `efficiency` routing with `--objective joules`
against `--objective carbon`, on two-site fleets, at light and heavy load.

    python -m bench.carbon                    # 10% and 80% load, seeds 1 and 2, both fleets
    python -m bench.carbon --loads 0.1 --seeds 1
    python -m bench.carbon --policy efficiency+governor   # with caps and parking (--no-park: caps
                                                          # only; --no-caps: parking only)

Fleets (docs/examples/): `carbon-fleet.yaml` (2x H100 on a steady 450 gCO2e/kWh grid at PUE
1.3, 2x A100 on a solar-heavy grid at PUE 1.1 whose intensity follows a day curve, 40..400,
`solar-day.csv`) and `carbon-fleet-mixed.yaml` (one H100 and one A100 at each site). Traces:
`proxy/sim/traces.py` synthetic (Gamma arrivals CV 1.5), 1200 s: the CSV's compressed day.

Columns: grams per 1k output tokens under each objective (idle and PUE included), the cut,
the cut of the busy (non-idle) grams alone, the idle share of the joules run's grams (idle
power is drawn whatever the routing, so it bounds the cut; parking, with `+governor`, lowers
it: asleep time is idle at sleep power), SLO attainment of both.
Writes bench/results/carbon-<policy>-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from proxy.sim.fleet import fleet_capacity_rps, load_fleet, simulate
from proxy.sim.traces import synth_trace

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(HERE, "..", "docs", "examples")
FLEETS = ("carbon-fleet.yaml", "carbon-fleet-mixed.yaml")
DURATION_S = 1200.0


def run_case(fleet_file: str, load: float, seed: int, policy: str = "efficiency",
             park: bool = True, caps: bool = True) -> dict[str, Any]:
    """Both objectives on one (fleet, load, seed); grams, SLO and the cut."""
    fleet = load_fleet(os.path.join(EXAMPLES, fleet_file))
    probe = synth_trace(1.0, DURATION_S, seed=seed)
    capacity_rps = fleet_capacity_rps(fleet, probe)
    trace = synth_trace(load * capacity_rps, DURATION_S, seed=seed)
    runs = {obj: simulate(fleet, trace, policy, objective=obj, park=park, power_caps=caps)
            for obj in ("joules", "carbon")}
    j, c = runs["joules"], runs["carbon"]
    assert j.gco2e_total and c.gco2e_total and j.idle_gco2e is not None and c.idle_gco2e is not None
    busy_j, busy_c = j.gco2e_total - j.idle_gco2e, c.gco2e_total - c.idle_gco2e
    return {
        "fleet": fleet_file, "load": load, "seed": seed, "requests": len(trace),
        "policy": policy, "park": park and "+governor" in policy, "caps": caps and "+governor" in policy,
        "g_per_1k_joules": j.gco2e_per_1k_output_tokens,
        "g_per_1k_carbon": c.gco2e_per_1k_output_tokens,
        "cut": 1 - c.gco2e_total / j.gco2e_total,
        "busy_cut": 1 - busy_c / busy_j if busy_j > 0 else 0.0,
        "idle_share_joules": j.idle_gco2e / j.gco2e_total,
        "idle_g_joules": j.idle_gco2e, "idle_g_carbon": c.idle_gco2e,
        "slo_joules": j.slo_attainment, "slo_carbon": c.slo_attainment,
        "gpu_joules": {"joules": j.joules, "carbon": c.joules},
        "requests_by_backend": {obj: {b.name: b.requests for b in r.backends.values()}
                                for obj, r in runs.items()},
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'fleet':<26}{'load':>5}{'seed':>5}{'g/1k J-obj':>11}{'g/1k C-obj':>11}"
            f"{'cut':>7}{'busy cut':>9}{'idle%':>7}{'SLO J':>8}{'SLO C':>8}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['fleet']:<26}{100 * r['load']:>4.0f}%{r['seed']:>5}"
                     f"{r['g_per_1k_joules']:>11.4f}{r['g_per_1k_carbon']:>11.4f}"
                     f"{100 * r['cut']:>6.1f}%{100 * r['busy_cut']:>8.1f}%"
                     f"{100 * r['idle_share_joules']:>6.1f}%{100 * r['slo_joules']:>7.2f}%"
                     f"{100 * r['slo_carbon']:>7.2f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.carbon")
    p.add_argument("--loads", default="0.1,0.8", help="shares of fleet capacity")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--fleets", default=",".join(FLEETS))
    p.add_argument("--policy", default="efficiency", help="efficiency or efficiency+governor")
    p.add_argument("--no-park", action="store_true", help="+governor: caps only, nothing parked")
    p.add_argument("--no-caps", action="store_true", help="+governor: parking only, no power caps")
    args = p.parse_args(argv)
    if args.no_park and args.no_caps:
        p.error("--no-park and --no-caps together leave plain efficiency: use --policy efficiency")
    rows = []
    for fleet_file in args.fleets.split(","):
        for load in (float(x) for x in args.loads.split(",")):
            for seed in (int(x) for x in args.seeds.split(",")):
                rows.append(run_case(fleet_file, load, seed, args.policy, not args.no_park, not args.no_caps))
                print(format_table(rows[-1:]).splitlines()[1], file=sys.stderr, flush=True)
    governed = "+governor" in args.policy
    variant = " (no parking)" if args.no_park else " (no caps)" if args.no_caps else ""
    print(f"policy {args.policy}" + (variant if governed else ""))
    print(format_table(rows))
    out_dir = os.path.join(HERE, "results")
    os.makedirs(out_dir, exist_ok=True)
    tag = args.policy.replace("+", "-") + (("-nopark" if args.no_park else "-nocaps" if args.no_caps else "")
                                           if governed else "")
    path = os.path.join(out_dir, f"carbon-{tag}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
