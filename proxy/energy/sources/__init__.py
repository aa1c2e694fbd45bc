"""Power sources: one backend's GPUs -> PowerSample(t_s, energy_j, power_w) every interval_s.

`make_source(config.power, on_sample)` builds the one `power.source` names (None for "none");
`await source.start()` / `await source.close()`. See base.py for the contract, registry.py
for the list of sources.
"""

from proxy.energy.sources.base import (
    METHOD_ENERGY_COUNTER,
    METHOD_POWER_AVERAGE,
    METHOD_POWER_INSTANT,
    PowerSample,
    PowerSource,
)
from proxy.energy.sources.registry import make_source

__all__ = ["METHOD_ENERGY_COUNTER", "METHOD_POWER_AVERAGE", "METHOD_POWER_INSTANT", "PowerSample",
           "PowerSource", "make_source"]
