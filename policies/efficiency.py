"""Efficiency routing: send each request where its tokens cost the fewest extra joules.

For every eligible backend b at load n_b (requests on its engine, queue included) the
learned model predicts the marginal joules per output token of its next requests,

    (P_b(n_b + D) - P_b(n_b)) / (R_b(n_b + D) - R_b(n_b)),   D = 1 + the fleet's load,

(the end point capped at b's SLO cap; P power, R output tokens/s). D = 1 would be the
one-request marginal; one common step as large as the fleet's load prices every backend for
the load it would really take: at light load what waking a GPU costs at that scale, under
heavy load what each achieves when well filled (docs/routing.md says why neither D = 1 nor
"to the SLO cap" works). Among the backends whose predicted TPOT at n + 1 and TTFT behind the
requests now awaiting their first token meet the SLO (upper estimates, not means), and whose
oldest such request has not waited too long already, the cheapest wins. If none qualifies,
the one with the most relative headroom takes it (the least over its worst guard: in flight vs
its cap, waiting vs its wait cap, its oldest wait vs the wait limit), so load spreads in
proportion to what each backend holds and a backend with a standing queue is fed last.

Why this packs. A GPU's power is strongly concave in its batch while its token rate grows
almost linearly, so the first request on an idle GPU costs ~1.7 J per token (it wakes the
GPU from idle to ~2.5x idle power) while one more request on a GPU already at batch 64 costs
a few hundredths of a joule. An idle GPU still draws idle power, whichever policy runs, so
concentrating load saves exactly the difference between the busy GPUs' concave curves and
the spread-out operating points; the SLO guard decides how far packing may go.

Carbon objective. With `objective="carbon"` a backend's cost is that marginal joules per token
x its site's PUE x its grid's gCO2e/kWh now (`BackendView.pue`, `.gco2e_per_kwh`): grams per
token, under the same SLO guard. A backend whose intensity is unknown is priced at the highest
intensity among the candidates (never preferred for being unmeasured); if none is known, PUE
alone weighs the joules.

Pure: no I/O, no clock reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from policies.base import BackendView, RequestInfo
from policies.curves import RoutePlan
from policies.model import EfficiencyModel

__all__ = ["MAX_WAIT_FRACTION", "Efficiency", "takes_more"]

_INF = float("inf")
#: A backend whose oldest request awaiting its first token has waited this share of the TTFT
#: SLO takes nothing new (`Efficiency`'s default `max_wait_fraction`).
MAX_WAIT_FRACTION = 0.3


def takes_more(plan: RoutePlan, in_flight: int, waiting: int, oldest_wait_s: float, max_wait_s: float) -> bool:
    """Whether the SLO guard lets a backend take one more request: `in_flight` requests on it
    (its engine's count if larger), `waiting` of them awaiting their first token, the oldest
    for `oldest_wait_s` s, against its `plan` for the SLO and a wait limit of `max_wait_s` s.
    `Efficiency.choose` applies the same test inline (its hot path); the governor asks it
    between decisions whether a burst has left the router nowhere within the SLO."""
    return (in_flight + 1 <= plan.cap and waiting + 1 <= plan.wait_cap
            and (waiting == 0 or oldest_wait_s <= max_wait_s))


class Efficiency:
    """Lowest predicted marginal joules per token among backends that keep the SLO.

    `models` maps backend names to their learned models; the mapping is read on every call,
    so the caller may add backends to it later. A backend without a model gets a private
    prior-only one (it routes, but learns nothing until the caller feeds it).

    The guard holds each model's upper estimate (mean + 2 standard deviations at that load,
    `EfficiencyModel.spread_z`) against the SLO: the SLO is met per request, and latency
    spreads around its mean at a given load (arrival bursts, other requests' prefills).
    `ttft_margin` / `tpot_margin` scale the SLO for that check (1.0: the SLO itself). And a
    backend whose oldest request still awaiting its first token has waited more than
    `max_wait_fraction` of the TTFT SLO takes nothing new: a full batch queues requests
    behind completions, which this shows at once while the TTFT curve learns it only when
    those requests start. `now_s` must be on the clock the models' events use.
    """

    name = "efficiency"

    def __init__(
        self,
        models: Mapping[str, EfficiencyModel] | None = None,
        *,
        slo_ttft_s: float = 2.0,
        slo_tpot_s: float = 0.2,
        ttft_margin: float = 1.0,
        tpot_margin: float = 1.0,
        max_wait_fraction: float = MAX_WAIT_FRACTION,
        objective: str = "joules",
    ) -> None:
        if objective not in ("joules", "carbon"):
            raise ValueError("objective must be joules or carbon")
        self.objective = objective
        if slo_ttft_s <= 0 or slo_tpot_s <= 0:
            raise ValueError("SLO limits must be positive")
        if not (0 < ttft_margin <= 1 and 0 < tpot_margin <= 1):
            raise ValueError("margins must be in (0, 1]")
        self.models: Mapping[str, EfficiencyModel] = models if models is not None else {}
        self.slo_ttft_s = slo_ttft_s
        self.slo_tpot_s = slo_tpot_s
        self.ttft_limit_s = slo_ttft_s * ttft_margin
        self.tpot_limit_s = slo_tpot_s * tpot_margin
        self.max_wait_s = slo_ttft_s * max_wait_fraction
        self._limits = (self.ttft_limit_s, self.tpot_limit_s)
        self._priors: dict[str, EfficiencyModel] = {}
        # name -> (model, its version, its plan for our limits): no tuple hashing per call.
        self._plans: dict[str, tuple[EfficiencyModel, int, RoutePlan]] = {}

    def model_for(self, name: str) -> EfficiencyModel:
        """The model this policy uses for backend `name`."""
        model = self.models.get(name)
        if model is None:
            model = self._priors.get(name)
            if model is None:
                model = self._priors[name] = EfficiencyModel()
        return model

    def choose(self, request: RequestInfo, views: Sequence[BackendView], now_s: float) -> str | None:
        # The hot path: 16 backends in ~10 us, so attribute lookups are hoisted and
        # BackendView.load is computed inline.
        models, plans = self.models, self._plans
        limits, max_wait_s = self._limits, self.max_wait_s
        loads = []
        # Every backend is priced for the same step: as many requests again as the fleet has
        # in flight. At light load that compares what waking a GPU costs at the load it would
        # really get; under heavy load, what each achieves when well filled.
        delta = 1.0
        for v in views:
            n = v.in_flight
            engine = v.queued + (v.running or 0)
            if engine > n:
                n = engine
            loads.append(n)
            delta += n
        carbon = self.objective == "carbon"
        if carbon:
            known = [v.gco2e_per_kwh for v in views if v.gco2e_per_kwh is not None]
            unknown_kwh = max(known) if known else 1.0
        best: str | None = None
        best_cost = _INF
        spill: str | None = None
        spill_load = _INF
        for v, n in zip(views, loads, strict=True):
            if not v.healthy:
                continue
            limit = v.max_concurrency
            if limit is not None and v.in_flight >= limit:
                continue
            name = v.name
            model = models.get(name) or self.model_for(name)
            cached = plans.get(name)
            if cached is None or cached[0] is not model or cached[1] != model.version:
                plan = model.plan(*limits)
                plans[name] = (model, model.version, plan)
            else:
                plan = cached[2]
            # Requests awaiting their first token: ours, or the engine's queue if it reports
            # more (other proxy replicas' requests).
            q = model.waiting
            if v.queued > q:
                q = v.queued
            cap, wait_cap = plan.cap, plan.wait_cap
            # `takes_more`, inline: this runs per backend per request.
            if n + 1 <= cap and q + 1 <= wait_cap and (
                    model.waiting == 0 or model.oldest_wait_s(now_s) <= max_wait_s):
                cost = plan.cost(n, delta)
                if carbon:
                    kwh = v.gco2e_per_kwh
                    cost *= v.pue * (unknown_kwh if kwh is None else kwh)
                if cost < best_cost:  # ties go to the first listed
                    best, best_cost = name, cost
            elif best is None:
                # Nobody qualifies (yet): remember the one with the most relative headroom, by
                # all three guards: a backend whose queue has waited 10x the limit is 10x over,
                # however far below its learnt caps its counts are (those curves can be wrong
                # for minutes; the wait is measured now). A cap of 0 (one request alone breaks
                # the SLO there) ranks last.
                over = max((n + 1) / cap if cap > 0 else 1e18 * (n + 1),
                           (q + 1) / wait_cap if wait_cap > 0 else 1e18 * (q + 1),
                           model.oldest_wait_s(now_s) / max_wait_s if model.waiting else 0.0)
                if over < spill_load:
                    spill, spill_load = name, over
        return best if best is not None else spill
