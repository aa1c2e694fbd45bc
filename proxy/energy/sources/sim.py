"""The simulator's power: `joulegate sim-backend` serves the agent's API (`/v1/power`,
`/v1/power/stream`) from its own energy counter, so this is the agent source under another
name. The clock-offset logic stays on: the simulator usually shares the proxy's host and clock
(offset ~0), but nothing requires it to.
"""

from __future__ import annotations

from proxy.energy.sources.agent import AgentSource


class SimSource(AgentSource):
    """Power of a simulated backend, read through the agent API."""

    kind = "sim"
