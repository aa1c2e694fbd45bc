"""Routing policies: pure functions of backend views; no I/O, time passed in."""

from policies.base import BackendView, Policy, RequestInfo
from policies.least_loaded import LeastLoaded
from policies.round_robin import RoundRobin

POLICIES: dict[str, type] = {"round_robin": RoundRobin, "least_loaded": LeastLoaded}


def make_policy(name: str) -> Policy:
    """A policy by its config name; `efficiency` falls back to least_loaded until it lands."""
    cls = POLICIES.get(name, LeastLoaded)
    return cls()


__all__ = ["BackendView", "Policy", "RequestInfo", "make_policy", "POLICIES"]
