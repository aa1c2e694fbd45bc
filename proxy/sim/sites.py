"""Sites of a simulated fleet: PUE and grid carbon intensity over virtual time, and the books
that turn each backend's energy into grams of CO2e.

A fleet file may declare `sites: [{name, pue, carbon: {gco2e_per_kwh: N} | {csv: FILE}}]` and
give each backend a `site:`. The CSV holds `t_s,gco2e_per_kwh` rows (seconds of the trace's
virtual clock); a value holds from its `t_s` until the next row (the shape of hourly grid
exports), the first row's value before it and the last row's after it. A relative `csv:` path
is read beside the fleet file.

Grams: energy in J x PUE x intensity in gCO2e/kWh / 3.6e6 (J per kWh).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.carbon import read_csv_points

__all__ = ["J_PER_KWH", "CarbonSchedule", "Site", "parse_sites", "read_schedule_csv",
           "CarbonBooks"]

J_PER_KWH = 3.6e6


@dataclass(frozen=True, slots=True)
class CarbonSchedule:
    """Grid intensity in gCO2e/kWh as a step function of time in s (`times_s` ascending)."""

    times_s: tuple[float, ...]
    values: tuple[float, ...]

    @classmethod
    def constant(cls, gco2e_per_kwh: float) -> CarbonSchedule:
        return cls((0.0,), (float(gco2e_per_kwh),))

    def at(self, t_s: float) -> float:
        """gCO2e/kWh at `t_s`: the last row at or before it (the first row before any)."""
        i = bisect.bisect_right(self.times_s, t_s) - 1
        return self.values[max(i, 0)]


class _SiteError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Site:
    """A data centre: power usage effectiveness (facility / IT energy, >= 1) and its grid."""

    name: str
    pue: float
    carbon: CarbonSchedule

    def gco2e_per_j(self, t_s: float) -> float:
        """Grams per joule of IT (GPU) energy at `t_s`, facility overhead included."""
        return self.pue * self.carbon.at(t_s) / J_PER_KWH


def read_schedule_csv(path: str) -> CarbonSchedule:
    """`t_s,gco2e_per_kwh` rows (header required, t_s increasing) -> schedule; ValueError
    naming the line."""
    points = read_csv_points(path, ("t_s", "gco2e_per_kwh"))
    for n, (a, b) in enumerate(zip(points, points[1:], strict=False), start=3):
        if b[0] <= a[0]:
            raise _SiteError(f"{path}: row {n - 1}: t_s must increase")
    return CarbonSchedule(tuple(p[0] for p in points), tuple(p[1] for p in points))


def parse_sites(data: Any, source: str, base_dir: str) -> dict[str, Site]:
    """The fleet file's `sites:` list -> sites by name; ValueError with one line if bad."""
    if not isinstance(data, list) or not data:
        raise _SiteError(f"{source}: `sites:` must be a non-empty list")
    out: dict[str, Site] = {}
    for i, item in enumerate(data):
        where = f"{source}: sites[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise _SiteError(f"{where}: expected a mapping with `name`, `pue`, `carbon`")
        unknown = set(item) - {"name", "pue", "carbon"}
        if unknown:
            raise _SiteError(f"{where}: unknown field {sorted(unknown)[0]!r}")
        pue = item.get("pue", 1.0)
        if isinstance(pue, bool) or not isinstance(pue, int | float) or not 1.0 <= pue <= 5.0:
            raise _SiteError(f"{where}: pue must be a number in [1, 5]")
        carbon = item.get("carbon")
        if isinstance(carbon, dict) and set(carbon) == {"gco2e_per_kwh"}:
            value = carbon["gco2e_per_kwh"]
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise _SiteError(f"{where}: carbon.gco2e_per_kwh must be a number >= 0")
            schedule = CarbonSchedule.constant(value)
        elif isinstance(carbon, dict) and set(carbon) == {"csv"} and isinstance(carbon["csv"], str):
            schedule = read_schedule_csv(os.path.join(base_dir, carbon["csv"]))
        else:
            raise _SiteError(f"{where}: carbon must be {{gco2e_per_kwh: N}} or {{csv: FILE}}")
        if item["name"] in out:
            raise _SiteError(f"{where}: site name {item['name']!r} appears twice")
        out[item["name"]] = Site(item["name"], float(pue), schedule)
    return out


class _Meter(Protocol):
    def energy_j(self, at_s: float) -> float: ...

    def idle_energy_j(self, at_s: float) -> float: ...


class CarbonBooks:
    """Integrates each backend's energy x its site's PUE x intensity over virtual time.

    `advance(t_s, count_idle)` books every backend's energy since the last call at the
    intensity at the start of that interval (the caller calls it every 100 ms sample, so the
    step is at most that). With `count_idle=False` idle energy is left out (after the last
    arrival, as the fleet's joules leave it out).
    """

    def __init__(self, meters: Sequence[_Meter], sites: Sequence[Site]) -> None:
        self.meters, self.sites = list(meters), list(sites)
        n = len(self.meters)
        self.grams = [0.0] * n
        self.idle_grams = [0.0] * n
        self._t_s = 0.0
        self._e_j = [0.0] * n
        self._idle_j = [0.0] * n

    def advance(self, t_s: float, count_idle: bool = True) -> None:
        if t_s <= self._t_s:
            return
        for b, (meter, site) in enumerate(zip(self.meters, self.sites, strict=True)):
            e_j, idle_j = meter.energy_j(t_s), meter.idle_energy_j(t_s)
            de_j, didle_j = e_j - self._e_j[b], idle_j - self._idle_j[b]
            self._e_j[b], self._idle_j[b] = e_j, idle_j
            k = site.gco2e_per_j(self._t_s)
            if count_idle:
                self.grams[b] += de_j * k
                self.idle_grams[b] += didle_j * k
            else:
                self.grams[b] += (de_j - didle_j) * k
        self._t_s = t_s
