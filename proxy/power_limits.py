"""The power-limits API shared by `joulegate agent` and the simulated backend.

  GET /v1/power/limits -> {"gpus": [{"index", "uuid", "power_limit_w", "min_w", "max_w", "default_w"}]}
  PUT /v1/power/limits <- {"gpus": [{"index": 0, "power_limit_w": 420}]}
      -> the GET object after the change. A limit outside [min_w, max_w] is clamped to it;
      `"power_limit_w": null` restores default_w. An unknown index or a malformed body is a 400
      and changes nothing.
Units: watts.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

PATH = "/v1/power/limits"


class GpuLimits(NamedTuple):
    """One GPU's power limit and the range the driver accepts, W."""

    index: int  # type: ignore[assignment]  # shadows tuple.index(), which nothing here calls
    uuid: str
    power_limit_w: float
    min_w: float
    max_w: float
    default_w: float


def limits_json(gpus: list[GpuLimits]) -> dict[str, Any]:
    """The GET body."""
    return {"gpus": [g._asdict() for g in gpus]}


def parse_put(body: Any, known: set[int]) -> dict[int, float | None]:
    """{index: watts or None (the default)} from a PUT body; ValueError (one line) if malformed
    or naming a GPU not in `known`."""
    if not isinstance(body, dict) or not isinstance(body.get("gpus"), list) or not body["gpus"]:
        raise ValueError("the body must be {\"gpus\": [{\"index\": 0, \"power_limit_w\": 420}]}")
    out: dict[int, float | None] = {}
    for item in body["gpus"]:
        if not isinstance(item, dict) or set(item) != {"index", "power_limit_w"}:
            raise ValueError("each entry of 'gpus' needs exactly 'index' and 'power_limit_w'")
        index, watts = item["index"], item["power_limit_w"]
        if isinstance(index, bool) or not isinstance(index, int) or index not in known:
            raise ValueError(f"no GPU with index {index!r} here (GPUs: {sorted(known)})")
        if watts is not None and (isinstance(watts, bool) or not isinstance(watts, int | float)
                                  or not math.isfinite(watts) or watts <= 0):
            raise ValueError("'power_limit_w' must be a positive number of watts, or null for the default")
        if index in out:
            raise ValueError(f"GPU {index} is named twice")
        out[index] = None if watts is None else float(watts)
    return out


def clamp_w(watts: float | None, gpu: GpuLimits) -> float:
    """The limit to set: `watts` (None: the default) within the GPU's accepted range."""
    return min(max(gpu.default_w if watts is None else watts, gpu.min_w), gpu.max_w)
