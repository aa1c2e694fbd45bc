"""Routing policies: pure functions of backend views; no I/O, time passed in."""

from collections.abc import Mapping

from policies.base import BackendView, Policy, RequestInfo
from policies.efficiency import Efficiency
from policies.least_loaded import LeastLoaded
from policies.model import EfficiencyModel
from policies.round_robin import RoundRobin

POLICIES: dict[str, type[Policy]] = {
    "round_robin": RoundRobin, "least_loaded": LeastLoaded, "efficiency": Efficiency,
}


def make_policy(name: str, *, models: Mapping[str, EfficiencyModel] | None = None,
                slo_ttft_s: float = 2.0, slo_tpot_s: float = 0.2,
                objective: str = "joules") -> Policy:
    """A fresh policy by its config name. `efficiency` routes on `models` (backend name ->
    its learned model, fed by the caller) against the SLO, minimising `objective` (`joules`
    or `carbon`); unknown names get least_loaded."""
    if name == "efficiency":
        return Efficiency(models, slo_ttft_s=slo_ttft_s, slo_tpot_s=slo_tpot_s,
                          objective=objective)
    return POLICIES.get(name, LeastLoaded)()


__all__ = ["BackendView", "Efficiency", "EfficiencyModel", "Policy", "RequestInfo", "make_policy",
           "POLICIES"]
