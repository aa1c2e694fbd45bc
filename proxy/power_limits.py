"""The power-limits API shared by `joulegate agent` and the simulated backend.

  GET /v1/power/limits -> {"gpus": [{"index", "uuid", "power_limit_w", "min_w", "max_w", "default_w"}]}
  PUT /v1/power/limits <- {"gpus": [{"index": 0, "power_limit_w": 420}]}
      -> the GET object after the change. A limit outside [min_w, max_w] is clamped to it;
      `"power_limit_w": null` restores default_w. An unknown index or a malformed body is a 400
      and changes nothing.

One governor at a time: a PUT with `x-joulegate-governor: ID` claims the limits for that
governor for `x-joulegate-governor-hold-s` seconds (default 60, within 5-86400), renewed by its
next PUT; while the claim is live a PUT from another ID is a 409 (`limits_held`) and changes
nothing, so two proxies (replicas, a second deployment) never fight over one GPU's limit.
`?release=true` on the holder's PUT (its limits put back when it stops) ends the claim at once.
A PUT without the header (an operator's) is not refused. Units: watts, seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

PATH = "/v1/power/limits"
HOLDER_HEADER = "x-joulegate-governor"
HOLD_HEADER = "x-joulegate-governor-hold-s"
HOLD_S = 60.0
HOLD_RANGE_S = (5.0, 86400.0)


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


@dataclass(slots=True)
class Claim:
    """Which governor holds the limits (None: none), and until when (monotonic s)."""

    holder: str | None = None
    until_s: float = 0.0


def claim(current: Claim, headers: Any, now_s: float) -> str | None:
    """Take or renew `current` for the PUT with these headers (a mapping, case-insensitive as
    aiohttp's); None if the PUT may go on, else why not (another governor's live claim)."""
    who = headers.get(HOLDER_HEADER)
    if not who:
        return None
    if current.holder not in (None, who) and now_s < current.until_s:
        return ("another governor holds these power limits (it renews its claim with each change); "
                "this one only advises until that claim ends")
    try:
        hold_s = float(headers.get(HOLD_HEADER) or HOLD_S)
    except ValueError:
        hold_s = HOLD_S
    hold_s = min(max(hold_s, HOLD_RANGE_S[0]), HOLD_RANGE_S[1]) if math.isfinite(hold_s) else HOLD_S
    current.holder, current.until_s = who, now_s + hold_s
    return None


def release(current: Claim, headers: Any, query: Any) -> None:
    """End `current` after its holder's PUT with `?release=true`."""
    if str(query.get("release", "")).lower() == "true" and headers.get(HOLDER_HEADER) == current.holder:
        current.holder, current.until_s = None, 0.0


def held_json(message: str) -> dict[str, Any]:
    """The 409 body for a PUT refused because another governor holds the limits."""
    return {"error": {"message": message, "type": "conflict_error", "code": "limits_held"}}
