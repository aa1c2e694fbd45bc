"""FLEET.yaml for `joulegate simulate`: the simulated GPUs of a virtual fleet, their profiles,
concurrency caps and sites.

`backends: [{name, profile, count?, max_concurrency?, site?}]` (`count` expands `l4` to `l4-0`,
`l4-1`...) and optional `sites: [{name, pue, carbon}]` (proxy/sim/sites.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import yaml

from proxy.sim.profiles import GpuProfile, get_profile, profile_names
from proxy.sim.sites import Site, parse_sites


class FleetError(ValueError):
    """A FLEET.yaml that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True, slots=True)
class FleetBackend:
    """One simulated GPU: its name, profile and optional concurrency cap (as in the config)."""

    name: str
    profile: GpuProfile
    max_concurrency: int | None = None
    site: Site | None = None  # PUE and grid intensity; None: no carbon figures


def parse_fleet(data: Any, source: str = "fleet", base_dir: str = ".") -> list[FleetBackend]:
    """`{backends: [{name, profile, count?, max_concurrency?, site?}, ...], sites?: [...]}` ->
    backends; `count: k` expands `name` to `name-0` .. `name-(k-1)`. With `sites:` every
    backend names one (`proxy/sim/sites.py`); a relative CSV is read from `base_dir`."""
    if not isinstance(data, dict) or not isinstance(data.get("backends"), list) or not data["backends"]:
        raise FleetError(f"{source}: expected `backends:` with a non-empty list")
    sites: dict[str, Site] = {}
    if "sites" in data:
        try:
            sites = parse_sites(data["sites"], source, base_dir)
        except ValueError as exc:
            raise FleetError(str(exc)) from None
    out: list[FleetBackend] = []
    for i, item in enumerate(data["backends"]):
        where = f"{source}: backends[{i}]"
        if not isinstance(item, dict):
            raise FleetError(f"{where}: expected a mapping with `profile`")
        unknown = set(item) - {"name", "profile", "count", "max_concurrency", "site"}
        if unknown:
            raise FleetError(f"{where}: unknown field {sorted(unknown)[0]!r}")
        try:
            profile = get_profile(str(item.get("profile")))
        except ValueError:
            raise FleetError(f"{where}: profile must be one of {', '.join(profile_names())}") from None
        name = str(item.get("name") or profile.name)
        count, cap = item.get("count", 1), item.get("max_concurrency")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise FleetError(f"{where}: count must be an integer >= 1")
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
            raise FleetError(f"{where}: max_concurrency must be an integer >= 1")
        site = None
        if sites or "site" in item:
            site = sites.get(item.get("site"))  # type: ignore[arg-type]
            if site is None:
                raise FleetError(f"{where}: site must name one of `sites:` "
                                 f"({', '.join(sites) or 'none declared'})")
        names = [name] if "count" not in item else [f"{name}-{j}" for j in range(count)]
        out.extend(FleetBackend(n, profile, cap, site) for n in names)
    seen: set[str] = set()
    for b in out:
        if b.name in seen:
            raise FleetError(f"{source}: backend name {b.name!r} appears twice")
        seen.add(b.name)
    return out


def load_fleet(path: str) -> list[FleetBackend]:
    """Read FLEET.yaml; FleetError with one line for anything wrong."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise FleetError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise FleetError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_fleet(data, path, os.path.dirname(os.path.abspath(path)))
