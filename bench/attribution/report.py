"""The report: targets and their PASS/FAIL verdicts, the printed tables (per configuration, per
request class, breakdowns, worst requests) and helpers for the JSON result.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path
from typing import Any

from bench.attribution.measure import Outcome

# Targets (issue 3, "Figures to reach and report").
TARGET_CONSERVATION_PCT = 0.1
TARGET_100MS_TENANT_PCT = 2.0
TARGET_100MS_MEDIAN_PCT = 10.0
TARGET_100MS_P90_PCT = 25.0
TARGET_1S_TENANT_PCT = 5.0


def _f(v: float | None, nd: int = 2, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.{nd}f}" if signed else f"{v:.{nd}f}"


def targets_for(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def target(cfg: str, name: str, value: float | None, limit: float) -> None:
        verdict = "N/A" if value is None else ("PASS" if value <= limit else "FAIL")
        out.append({"config": cfg, "target": name, "value": value, "limit": limit, "verdict": verdict})

    for s in summaries:
        cfg = s["config"]
        cons = s["conservation_pct"]
        label = "conservation |attributed + idle - measured| / measured %"
        if cons is None:
            cons = s["conservation_ext_pct"]
            label = "conservation (external: attributed + sims' idle vs sims' joules) %"
        target(cfg, label, None if cons is None else abs(cons), TARGET_CONSERVATION_PCT)
        for cls, f in s["classes"].items():
            if not f["n"]:
                continue
            if abs(s["interval_s"] - 0.1) < 1e-9:
                target(cfg, f"{cls}: per-tenant totals max |error| %", f["tenant_max_abs_err_pct"],
                       TARGET_100MS_TENANT_PCT)
                target(cfg, f"{cls}: per-request median |error| %", f["median_abs_err_pct"],
                       TARGET_100MS_MEDIAN_PCT)
                target(cfg, f"{cls}: per-request p90 |error| %", f["p90_abs_err_pct"],
                       TARGET_100MS_P90_PCT)
            if abs(s["interval_s"] - 1.0) < 1e-9:
                target(cfg, f"{cls}: per-tenant totals max |error| %", f["tenant_max_abs_err_pct"],
                       TARGET_1S_TENANT_PCT)
    return out


def print_classes(summaries: list[dict[str, Any]]) -> None:
    """One row per config and request class: the figures the targets are set on."""
    cols = ["config", "class", "n", "total err%", "tenant max%", "req med%", "req p90%", "cons%"]
    rows = []
    for s in summaries:
        cons = s["conservation_pct"] if s["conservation_pct"] is not None else s["conservation_ext_pct"]
        for cls, f in s["classes"].items():
            rows.append([s["config"], cls, str(f["n"]), _f(f["total_err_pct"], 2, True),
                         _f(f["tenant_max_abs_err_pct"]), _f(f["median_abs_err_pct"], 1),
                         _f(f["p90_abs_err_pct"], 1), _f(cons, 4, True) if cls == "all" else ""])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))


def print_table(summaries: list[dict[str, Any]]) -> None:
    cols = ["config", "reqs", "fleet err%", "cons%", "cons-ext%", "tenant max%", "req med%",
            "req p90%", "resp med%", "measured@resp", "est@resp", "n/v@resp"]
    rows = []
    for s in summaries:
        m = s["method_at_response"]
        share = s["measured_at_response_share"]
        rows.append([
            s["config"], f"{s['compared']}/{s['requests']}", _f(s["fleet_err_pct"], 2, True),
            _f(s["conservation_pct"], 4, True), _f(s["conservation_ext_pct"], 2, True),
            _f(s["tenant_max_abs_err_pct"]), _f(s["median_abs_err_pct"], 1),
            _f(s["p90_abs_err_pct"], 1), _f(s["response_time_median_abs_err_pct"], 1),
            "-" if share is None else f"{100 * share:.0f}% ({m['measured']})",
            str(m["estimated"]), str(m["not visible"]),
        ])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))


def print_breakdown(s: dict[str, Any]) -> None:
    print(f"  {s['config']}:")
    for by in ("class", "backend", "prefill", "edge"):
        parts = [f"{r['group']} n={r['n']} tot {_f(r['total_err_pct'], 1, True)}% "
                 f"med {_f(r['median_abs_err_pct'], 1)}%" for r in s["breakdown"] if r["by"] == by]
        print("    " + "; ".join(parts))
    if s.get("idle_excess_j") is not None:
        print(f"    proxy idle - engine idle over the window: {s['idle_excess_j']:+.1f} J "
              f"({s['idle_excess_pct_of_busy']:+.2f}% of the engines' busy joules)")
    learned = {n: w for n, w in (s.get("split_weights") or {}).items() if w}
    if learned:
        print("    split weights at the end (energy.learn): " + "; ".join(
            f"{n} prefill {w['prefill_weight']:.3f} + {w['prefill_weight_sq']:.2e}/tok, decode ctx "
            f"{w['decode_context_weight']:.2e}/tok, step {w.get('step_weight', 0.0):.1f}"
            f"{'' if w['learned'] else ' (prior)'}"
            for n, w in learned.items()))
    cal = s.get("calibration") or {}
    print("    implied prefill_weight from the truth: " + ", ".join(
        f"{n} {_f(c['implied_prefill_weight'], 3)} ({_f(c['prefill_j_per_token'], 3)} J/prompt tok"
        f" vs {_f(c['decode_j_per_token'], 3)} J/decode tok)" for n, c in cal.items()))


def print_worst(s: dict[str, Any], outcomes: list[Outcome], n: int) -> None:
    ok = sorted((o for o in outcomes if o.err_pct is not None), key=lambda o: -abs(o.err_pct or 0))
    print(f"\nworst {n} requests of {s['config']} (err% = (proxy - truth) / truth; conc = mean "
          "requests on that engine during it; idle = engine idle s before/after it)")
    print("   err%  tenant   kind        stream  be    prompt  compl  dur_s  ttft_s  conc  "
          "idle_b  idle_a  edge  pf%  truth_J  proxy_J")
    for o in ok[:n]:
        dur = (o.truth_end_s or 0) - (o.truth_arrival_s or 0)
        ttft = (o.truth_first_s - o.truth_arrival_s) if o.truth_first_s and o.truth_arrival_s else None
        stream = ("yes+u" if o.include_usage else "yes") if o.stream else "no"
        print(f"{o.err_pct:+7.1f}  {o.tenant:<7}  {o.kind:<10}  {stream:<6}  {o.backend or '?':<4}  "
              f"{o.truth_prompt_tokens or 0:>6}  {o.truth_completion_tokens or 0:>5}  {dur:5.2f}  "
              f"{_f(ttft, 3):>6}  {_f(o.backend_concurrency, 1):>4}  {_f(o.idle_before_s, 2):>6}  "
              f"{_f(o.idle_after_s, 2):>6}  {'yes' if o.near_idle_edge else 'no':>4}  "
              f"{100 * (o.prefill_share or 0):3.0f}  {o.truth_joules or 0:7.2f}  {o.final_joules or 0:7.2f}")


def _git_state() -> dict[str, Any]:
    """The commit the proxy code came from, and whether proxy/ or policies/ had local edits."""
    repo = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "proxy", "policies"], cwd=repo,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "proxy_dirty": None}
    return {"commit": rev or None, "proxy_dirty": bool(dirty) if rev else None}


def _json_default(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return str(v)
