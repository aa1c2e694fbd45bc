"""The figures of one configuration, pure functions of its outcomes: per-request error and
context, calibration, per-class and per-tenant errors, conservation from the books, breakdowns.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from bench.attribution.measure import Outcome
from bench.attribution.workload import CLASSES, TENANT_KEYS, Setup


def annotate(outcomes: list[Outcome], interval_s: float, prefill_j_per_token: dict[str, float]
             ) -> None:
    """Per request: error, share of its true joules that is prefill, mean engine concurrency
    during it, idle time around it, and whether it is in flight within one sampling interval
    of an engine idle/busy transition."""
    by_backend: dict[str, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        if o.truth_arrival_s is not None and o.truth_end_s is not None:
            by_backend[o.backend or ""].append(o)
        if o.final_joules is not None and o.truth_joules:
            o.err_pct = 100.0 * (o.final_joules - o.truth_joules) / o.truth_joules
            pj = prefill_j_per_token.get(o.backend or "")
            if pj is not None and o.truth_prompt_tokens is not None:
                o.prefill_share = min(1.0, pj * o.truth_prompt_tokens / o.truth_joules)
    for group in by_backend.values():
        spans = sorted((o.truth_arrival_s, o.truth_end_s) for o in group)  # type: ignore[misc]
        # Busy periods of the engine: the union of its requests' spans; their ends are the
        # idle/busy transitions.
        edges: list[float] = []
        cur_s, cur_e = spans[0]
        for s_, e_ in spans[1:]:
            if s_ > cur_e:
                edges += [cur_s, cur_e]
                cur_s, cur_e = s_, e_
            else:
                cur_e = max(cur_e, e_)
        edges += [cur_s, cur_e]
        for o in group:
            a, b = o.truth_arrival_s, o.truth_end_s
            assert a is not None and b is not None
            overlap = sum(max(0.0, min(b, e) - max(a, s)) for s, e in spans)
            o.backend_concurrency = overlap / (b - a) if b > a else 1.0
            busy_before = [e for s, e in spans if s < a]
            o.idle_before_s = 0.0 if any(e > a for e in busy_before) else (
                a - max(busy_before) if busy_before else None)
            later = [s for s, e in spans if e > b or s > b]
            o.idle_after_s = 0.0 if any(s <= b for s in later) else (
                min(later) - b if later else None)
            o.near_idle_edge = any(a < t + interval_s and b > t - interval_s for t in edges)


def calibration(outcomes: list[Outcome], prefill_j_per_token: dict[str, float]
                ) -> dict[str, dict[str, float | None]]:
    """Per backend, from the ground truth: decode joules per decode token during this run and
    the prefill weight that would make one prompt token cost what it really cost (the proxy's
    `energy.prefill_weight` is one number for every backend)."""
    out: dict[str, dict[str, float | None]] = {}
    for name, pj in prefill_j_per_token.items():
        dec_j = dec_n = 0.0
        for o in outcomes:
            if (o.backend == name and o.kind != "embedding" and o.truth_joules
                    and o.truth_prompt_tokens and o.truth_completion_tokens):
                # The first token comes out of the prefill step, which the simulator bills as
                # prefill; each later token is one decode step's share.
                dec_j += o.truth_joules - pj * o.truth_prompt_tokens
                dec_n += o.truth_completion_tokens - 1
        per_tok = dec_j / dec_n if dec_n else None
        out[name] = {"prefill_j_per_token": pj, "decode_j_per_token": per_tok,
                     "implied_prefill_weight": pj / per_tok if per_tok else None}
    return out


def _pct(a: float, b: float) -> float | None:
    return 100.0 * (a - b) / b if b else None


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def class_figures(ok: list[Outcome]) -> dict[str, Any]:
    """For one group of compared requests: count, total error, per-tenant totals error (the
    largest), per-request median and p90 |error|, all in %."""
    tenant_errs = []
    for t in TENANT_KEYS:
        mine = [o for o in ok if o.tenant == t]
        err = _pct(math.fsum(o.final_joules for o in mine),  # type: ignore[misc]
                   math.fsum(o.truth_joules for o in mine))  # type: ignore[misc]
        if err is not None:
            tenant_errs.append(abs(err))
    abs_err = [abs(o.err_pct) for o in ok]  # type: ignore[arg-type]
    return {
        "n": len(ok),
        "total_err_pct": _pct(math.fsum(o.final_joules for o in ok),  # type: ignore[misc]
                              math.fsum(o.truth_joules for o in ok)),  # type: ignore[misc]
        "tenant_max_abs_err_pct": max(tenant_errs) if tenant_errs else None,
        "median_abs_err_pct": _quantile(abs_err, 0.5),
        "p90_abs_err_pct": _quantile(abs_err, 0.9),
    }


def summarize(setup: Setup, outcomes: list[Outcome], energy: dict[str, Any]) -> dict[str, Any]:
    """The table row (and its parts) for one configuration."""
    ok = [o for o in outcomes if o.err_pct is not None]
    measured = [o for o in ok if o.final_method == "measured"]
    s_proxy = math.fsum(o.final_joules for o in ok)  # type: ignore[misc]
    s_truth = math.fsum(o.truth_joules for o in ok)  # type: ignore[misc]
    tenants: dict[str, dict[str, float]] = {}
    for t in TENANT_KEYS:
        mine = [o for o in ok if o.tenant == t]
        p_j = math.fsum(o.final_joules for o in mine)  # type: ignore[misc]
        t_j = math.fsum(o.truth_joules for o in mine)  # type: ignore[misc]
        tenants[t] = {"requests": len(mine), "proxy_j": p_j, "truth_j": t_j, "err_pct": _pct(p_j, t_j)}
    abs_err = [abs(o.err_pct) for o in ok]  # type: ignore[arg-type]
    resp_abs = [abs(100.0 * (o.resp_joules - o.truth_joules) / o.truth_joules)
                for o in ok if o.resp_joules is not None and o.truth_joules]
    methods = {"measured": 0, "estimated": 0, "not visible": 0}
    for o in outcomes:
        if o.error is None:
            methods[o.resp_method if o.resp_method in methods else "not visible"] += 1
    visible = methods["measured"] + methods["estimated"]
    tenant_errs = [abs(v["err_pct"]) for v in tenants.values() if v["err_pct"] is not None]
    return {
        "config": setup.name,
        "source": setup.source,
        "interval_s": setup.interval_s,
        "requests": len(outcomes),
        "compared": len(ok),
        "errors": sum(1 for o in outcomes if o.error is not None),
        "not_measured": len(ok) - len(measured),
        # A dropped stream's engine may have made tokens the client never saw.
        "token_mismatches": sum(1 for o in ok if not o.aborted and (o.prompt_tokens, o.completion_tokens)
                                != (o.truth_prompt_tokens, o.truth_completion_tokens)),
        "aborted": sum(1 for o in outcomes if o.aborted),
        "classes": {"all": class_figures(ok),
                    **{c: class_figures([o for o in ok if o.cls == c]) for c in CLASSES}},
        "tenant_mismatches": sum(1 for o in ok if o.final_tenant != o.tenant),
        "fleet_proxy_j": s_proxy,
        "fleet_truth_j": s_truth,
        "fleet_err_pct": _pct(s_proxy, s_truth),
        "tenants": tenants,
        "tenant_max_abs_err_pct": max(tenant_errs) if tenant_errs else None,
        "median_abs_err_pct": _quantile(abs_err, 0.5),
        "p90_abs_err_pct": _quantile(abs_err, 0.9),
        "response_time_median_abs_err_pct": _quantile(resp_abs, 0.5),
        "method_at_response": methods,
        "measured_at_response_share": methods["measured"] / visible if visible else None,
        **energy,
    }


def energy_books(books: dict[str, Any] | None, sims_before: dict[str, dict[str, float]],
                 sims_after: dict[str, dict[str, float]], idle_w: dict[str, float],
                 outcomes: list[Outcome]) -> dict[str, Any]:
    """Conservation, two ways.

    conservation_pct (needs the proxy's books): |sum of the requests' final joules (the API) +
    the proxy's idle (+ share-mode carry) - the simulator's counter over the proxy's settled
    window| / that counter delta. The window's ends lie in idle time before the first and after
    the last request, so the counter there is extrapolated at the profile's idle power from a
    /sim/energy reading taken in the same idle stretch.

    conservation_ext_pct (the brief's fallback, no proxy books): |sum attributed (the API) + the
    simulators' idle joules - the simulators' joules| / the simulators' joules, whole lifetime.
    The simulators' idle is "nothing running on the engine", not the proxy's "nothing in flight".
    """
    per_backend_api: dict[str, float] = defaultdict(float)
    for o in outcomes:
        if o.final_joules is not None and o.backend:
            per_backend_api[o.backend] += o.final_joules
    sum_api = math.fsum(per_backend_api.values())
    sim_j = math.fsum(v["joules"] for v in sims_after.values())
    sim_idle = math.fsum(v["idle_joules"] for v in sims_after.values())
    out: dict[str, Any] = {
        "conservation_ext_pct": _pct(sum_api + sim_idle, sim_j),
        "sims": {n: {"before": sims_before.get(n), "after": sims_after.get(n)} for n in sims_after},
        "conservation_pct": None,
        "books": books,
    }
    if not books:
        return out
    window_j, proxy_j, internal, idle_excess, busy_j = [], [], [], [], []
    window_ok = True
    detail = {}
    for name, b in books.items():
        first_s, until_s = b.get("first_finalized_s"), b.get("finalized_until_s")
        before, after = sims_before.get(name), sims_after.get(name)
        if first_s is None or until_s is None or before is None or after is None:
            return out
        # The counter at the window's ends, extrapolated at idle power: valid only if the window
        # starts before `before` was read (before any request) and ends after the last request
        # on this engine ended and before `after` was read.
        last_end = max((o.truth_end_s for o in outcomes if o.backend == name and o.truth_end_s),
                       default=first_s)
        if not (first_s <= before["t"] and last_end <= until_s <= after["t"]):
            window_ok = False
        e_first = before["joules"] - idle_w[name] * (before["t"] - first_s)
        e_until = after["joules"] - idle_w[name] * (after["t"] - until_s)
        sim_window = e_until - e_first
        attributed, idle = b["finalized_joules_attributed"], b["finalized_joules_idle"]
        carried = b.get("carried_joules") or 0.0
        sim_idle = ((after["idle_joules"] - idle_w[name] * (after["t"] - until_s))
                    - (before["idle_joules"] - idle_w[name] * (before["t"] - first_s)))
        window_j.append(sim_window)
        proxy_j.append(per_backend_api[name] + idle + carried)
        idle_excess.append(idle + carried - sim_idle)
        busy_j.append(sim_window - sim_idle)
        internal.append(abs(attributed + idle + carried - b["finalized_joules_measured"]))
        detail[name] = {
            "sim_window_j": sim_window, "proxy_measured_j": b["finalized_joules_measured"],
            "proxy_attributed_j": attributed, "api_attributed_j": per_backend_api[name],
            "proxy_idle_j": idle, "proxy_carried_j": carried,
            "timeline_vs_counter_pct": _pct(b["finalized_joules_measured"], sim_window),
            "sim_idle_window_j": sim_idle, "idle_excess_j": idle + carried - sim_idle,
            "window_s": until_s - first_s,
        }
    total_window = math.fsum(window_j)
    out["conservation_pct"] = _pct(math.fsum(proxy_j), total_window)
    out["conservation_window_ok"] = window_ok
    out["books_internal_abs_j"] = math.fsum(internal)
    # Busy joules the proxy booked as idle (> 0) or idle joules it billed (< 0), as a share of
    # the joules the engines spent on requests in the window.
    out["idle_excess_j"] = math.fsum(idle_excess)
    out["idle_excess_pct_of_busy"] = 100.0 * math.fsum(idle_excess) / math.fsum(busy_j)
    out["books_detail"] = detail
    return out


def breakdown(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """Signed total error and median |error| per request class and per backend."""
    ok = [o for o in outcomes if o.err_pct is not None]

    def cls(o: Outcome) -> str:
        if o.kind == "embedding":
            return "embedding"
        return "aborted" if o.aborted else ("stream" if o.stream else "non-stream")

    def prefill(o: Outcome) -> str:
        share = o.prefill_share or 0.0
        return "prefill<10%" if share < 0.1 else ("prefill10-40%" if share < 0.4 else "prefill>=40%")

    def edge(o: Outcome) -> str:
        return "near-idle-edge" if o.near_idle_edge else "inside-busy"

    rows = []
    for label, key in (("class", cls), ("backend", lambda o: o.backend or "?"),
                       ("prefill", prefill), ("edge", edge)):
        groups: dict[str, list[Outcome]] = defaultdict(list)
        for o in ok:
            groups[key(o)].append(o)
        for g in sorted(groups):
            os_ = groups[g]
            p_j = math.fsum(o.final_joules for o in os_)  # type: ignore[misc]
            t_j = math.fsum(o.truth_joules for o in os_)  # type: ignore[misc]
            rows.append({"by": label, "group": g, "n": len(os_), "total_err_pct": _pct(p_j, t_j),
                         "median_abs_err_pct": _quantile([abs(o.err_pct) for o in os_], 0.5),  # type: ignore[arg-type]
                         "share_of_truth_pct": 100.0 * t_j / max(1e-9, math.fsum(
                             o.truth_joules for o in ok))})  # type: ignore[misc]
    return rows
