"""Offline attribution of a whole recorded schedule, through the live `Attributor`.

Pure: no I/O, no clock reads.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Literal

from proxy.energy.attribution.attributor import Attributor, IdleMode
from proxy.energy.attribution.weights import TokenWeights
from proxy.energy.timeline import EnergyTimeline

__all__ = ["ScheduledRequest", "attribute_schedule"]


@dataclass(slots=True, frozen=True)
class ScheduledRequest:
    """A finished request for offline attribution (times in seconds)."""

    request_id: str
    start_s: float
    end_s: float
    prompt_tokens: int
    completion_tokens: int
    stream: bool = True
    # Streamed only: (arrival time s, tokens) of each chunk.
    token_arrivals: Sequence[tuple[float, int]] = ()


def attribute_schedule(
    samples: Iterable[tuple[float, float]],
    requests: Iterable[ScheduledRequest],
    prefill_weight: float = 0.1,
    idle: IdleMode = "separate",
    *,
    sample_kind: Literal["energy_j", "power_w"] = "energy_j",
    share_max_s: float = 60.0,
    learn_idle_power: bool = True,
    place_by_steps: bool = False,
    weights: TokenWeights | None = None,
) -> tuple[dict[str, float], float]:
    """Attribute a whole schedule offline: (joules per request id, idle joules).

    `samples`: (time s, cumulative counter joules) readings, or (time s, watts) with
    `sample_kind="power_w"`. Replays the events in time order through the live `Attributor`.
    Idle joules include share mode's carry left after the last request. Raises ValueError if
    the samples do not reach some request's end. `place_by_steps`: see
    `Attributor.place_by_steps` (off by default here: the plain rule, exact by hand);
    `weights`: all the split weights (instead of `prefill_weight` alone).
    """
    attributor = Attributor(EnergyTimeline(max_age_s=math.inf), prefill_weight=prefill_weight,
                            idle=idle, max_pending_s=math.inf, share_max_s=share_max_s,
                            learn_idle_power=learn_idle_power)
    attributor.place_by_steps = place_by_steps
    if weights is not None:
        attributor.weights = weights
    timeline = attributor.timeline
    add = timeline.add_energy_sample if sample_kind == "energy_j" else timeline.add_power_sample
    # (t_s, order, request or (request id, tokens) or sample value); at one instant requests
    # move before samples are read, as they would live.
    events: list[tuple[float, int, Any]] = []
    for req in requests:
        events.append((req.start_s, 0, req))
        if req.stream:
            events.extend((t_s, 1, (req.request_id, n)) for t_s, n in req.token_arrivals)
        events.append((req.end_s, 2, req))
    events.extend((t_s, 3, value) for t_s, value in samples)
    events.sort(key=itemgetter(0, 1))
    joules: dict[str, float] = {}
    for t_s, order, item in events:
        if order == 0:
            attributor.open(item.request_id, t_s, item.stream, item.prompt_tokens)
            if not item.stream:
                # Its end is known already: its weights too, so nothing waits for it.
                attributor._close(item.request_id, item.end_s, item.prompt_tokens,
                                  item.completion_tokens)
        elif order == 1:
            attributor.tokens(item[0], t_s, item[1])
        elif order == 2:
            if item.stream:
                attributor._close(item.request_id, t_s, item.prompt_tokens,
                                  item.completion_tokens)
        else:
            add(t_s, item)
            joules.update((f.request_id, f.joules) for f in attributor.advance())
    joules.update((f.request_id, f.joules) for f in attributor.advance())
    if attributor.unsettled.by_key:
        missing = ", ".join(sorted(attributor.unsettled.by_key)[:5])
        raise ValueError(f"samples end before these requests do: {missing}")
    return joules, attributor.finalized_joules_idle + attributor.carried_joules
