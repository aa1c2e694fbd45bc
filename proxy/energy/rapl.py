"""Host CPU package and DRAM energy from the Linux powercap interface (Intel/AMD RAPL).

Zones under `root` (default /sys/class/powercap): top-level `intel-rapl:N` zones named
`package-N` (the CPU socket, its cores and uncore) and their sub-zones named `dram`. Each has
`energy_uj`, a counter that wraps at `max_energy_range_uj`. `RaplReader.read()` sums the zones'
increments since the first read into one continuous counter (J), wraps unrolled per zone.

The files are often readable by root only (since Linux 5.10, CVE-2020-8694): where no zone is
readable, `RaplReader.open` returns None and the proxy's `power.host_w` stands in.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

__all__ = ["DEFAULT_ROOT", "RaplReader", "RaplZone"]

DEFAULT_ROOT = "/sys/class/powercap"


def _read_int(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


@dataclass(slots=True)
class RaplZone:
    """One counter: its directory, name, wrap modulus (µJ) and last raw reading (µJ)."""

    path: str
    name: str
    max_uj: int
    last_uj: int


class RaplReader:
    """Package + DRAM energy of this host as one continuous counter, joules since opened."""

    def __init__(self, zones: list[RaplZone]) -> None:
        self.zones = zones
        self.energy_j = 0.0
        self._last: tuple[float, float] | None = None  # (t_s, energy_j) of the previous read
        self.power_w: float | None = None

    @classmethod
    def open(cls, root: str = DEFAULT_ROOT) -> RaplReader | None:
        """The readable package and DRAM zones under `root`; None if there are none."""
        zones: list[RaplZone] = []
        for top in sorted(glob.glob(os.path.join(root, "intel-rapl:*"))):
            if os.path.basename(top).count(":") != 1:
                continue  # a sub-zone: taken with its package below
            candidates = [top, *sorted(glob.glob(os.path.join(top, "intel-rapl:*:*")))]
            for path in candidates:
                try:
                    with open(os.path.join(path, "name")) as f:
                        name = f.read().strip()
                    if not (name.startswith("package") or name == "dram"):
                        continue  # core/uncore are inside the package's figure already
                    zones.append(RaplZone(path, name, _read_int(os.path.join(path, "max_energy_range_uj")),
                                          _read_int(os.path.join(path, "energy_uj"))))
                except (OSError, ValueError):
                    continue  # unreadable (not root) or not a counter
        return cls(zones) if zones else None

    def read(self, t_s: float) -> float:
        """Joules since opened at wall-clock `t_s`; updates `power_w` (W since the last read).
        A zone that fails to read this time adds nothing until it reads again."""
        for z in self.zones:
            try:
                raw = _read_int(os.path.join(z.path, "energy_uj"))
            except (OSError, ValueError):
                continue
            delta = raw - z.last_uj
            if delta < 0:  # wrapped past max_energy_range_uj back to 0
                delta += z.max_uj
            z.last_uj = raw
            self.energy_j += max(delta, 0) / 1e6
        if self._last is not None and t_s > self._last[0]:
            self.power_w = (self.energy_j - self._last[1]) / (t_s - self._last[0])
        self._last = (t_s, self.energy_j)
        return self.energy_j
