"""A GPU power cap in the simulator: a step planned uncapped, replayed under the cap.

The cap model itself (clock ratio, which phase slows by how much, the lowest limit) is
proxy/governor/capmodel.py, with its sources.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from proxy.governor.capmodel import capped_step, min_limit_w

if TYPE_CHECKING:
    from proxy.sim.engine import Step

__all__ = ["cap_step", "min_limit_w"]


def cap_step(step: Step, prefill_s: float, decode_s: float, cap_w: float, idle_w: float) -> Step:
    """`step` (planned uncapped, its prefill taking `prefill_s` and decode `decode_s`) under `cap_w`."""
    prefill_w = step.prefill_energy_j / prefill_s if prefill_s > 0 else 0.0
    decode_w = step.decode_energy_j / decode_s if decode_s > 0 else 0.0
    new_prefill_s, prefill_w, new_decode_s, decode_w = capped_step(
        prefill_s, prefill_w, decode_s, decode_w, cap_w, idle_w)
    prefill_j, decode_j = new_prefill_s * prefill_w, new_decode_s * decode_w
    # Each request's truth scales with its phase, so the step's per-request joules still sum to it.
    prefill_k = prefill_j / step.prefill_energy_j if step.prefill_energy_j > 0 else 0.0
    decode_k = decode_j / step.decode_energy_j if step.decode_energy_j > 0 else 0.0
    return replace(step, end_s=step.start_s + new_prefill_s + new_decode_s, prefill_s=new_prefill_s,
                   prefill_energy_j=prefill_j, decode_energy_j=decode_j,
                   prefill_j=[x * prefill_k for x in step.prefill_j],
                   decode_j=[x * decode_k for x in step.decode_j])
