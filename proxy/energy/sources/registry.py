"""Which PowerSource `power.source` names: the one module that knows every source.

Kept apart from base.py, which every source imports, so the interface never imports the
sources built on it. Each source is imported only when chosen (NVML, DCGM, HTTP clients load
nothing for "none").
"""

from __future__ import annotations

from proxy.config import PowerConfig
from proxy.energy.sources.base import PowerSource, SampleCallback

__all__ = ["make_source"]


def make_source(config: PowerConfig, on_sample: SampleCallback) -> PowerSource | None:
    """The source `config.source` names, not yet started; None for "none"."""
    if config.source == "none":
        return None
    if config.source == "nvml":
        from proxy.energy.sources.nvml import NvmlSource

        return NvmlSource(config, on_sample)
    if config.source == "dcgm":
        from proxy.energy.sources.dcgm import DcgmSource

        return DcgmSource(config, on_sample)
    if config.source == "agent":
        from proxy.energy.sources.agent import AgentSource

        return AgentSource(config, on_sample)
    if config.source == "sim":
        from proxy.energy.sources.sim import SimSource

        return SimSource(config, on_sample)
    raise ValueError(f"unknown power source {config.source!r}")
