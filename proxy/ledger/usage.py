"""Usage queries: the ledger's units and row shapes, parsing the API's parameters, grouping
aggregate cells, and the JSON, CSV and table forms that `GET /v1/energy/usage` and
`joulegate usage` print. Imports nothing from the rest of the ledger.

Joules are summed as integer micro-joules and only turned into floats at the end, so totals are
exact; CSV writes them as exact decimals with six places.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

#: What a budget counts: joules (stored as µJ) or grams CO2e (stored as µg).
BudgetUnit = Literal["joules", "gco2e"]

GROUP_KEYS: tuple[str, ...] = ("tenant", "model", "backend", "hour", "site")
UG_PER_G = 1_000_000  # grams CO2e are summed as integer micrograms, like joules in µJ
HOUR_S = 3600
UJ_PER_J = 1_000_000


def joules_to_uj(joules: float) -> int:
    """Joules to integer micro-joules, rounded to nearest."""
    return round(joules * UJ_PER_J)


def grams_to_ug(grams: float) -> int:
    """Grams to integer micrograms, rounded to nearest."""
    return round(grams * UG_PER_G)


def hour_floor_s(t_s: float) -> int:
    """Start of the UTC hour containing `t_s` (epoch seconds)."""
    return int(t_s // HOUR_S) * HOUR_S


def hour_iso(hour_s: int) -> str:
    """An hour start as the API shows it: `2026-11-27T04:00:00Z`."""
    return time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(hour_s))


@dataclass(frozen=True, slots=True)
class Bucket:
    """One aggregate cell: tenant x model x backend x hour, in integer units."""

    tenant: str
    model: str
    backend: str
    hour_s: int
    requests: int
    prompt_tokens: int
    completion_tokens: int
    joules_uj: int
    reasoning_tokens: int = 0
    joules_all_in_uj: int = 0  # (GPU + host) x PUE; 0 in cells written before it was recorded
    gco2e_ug: int = 0


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One row of a usage answer. Grouping keys not asked for are None."""

    requests: int
    prompt_tokens: int
    completion_tokens: int
    joules_uj: int  # exact, micro-joules
    joules: float  # joules_uj / 1e6
    tenant: str | None = None
    model: str | None = None
    backend: str | None = None
    hour: str | None = None  # UTC hour start, "2026-11-27T04:00:00Z"
    reasoning_tokens: int = 0  # of completion_tokens
    joules_all_in_uj: int = 0
    gco2e_ug: int = 0
    site: str | None = None  # the backend's site in the config (proxy/carbon.py); "" if none

    @property
    def joules_all_in(self) -> float:
        return self.joules_all_in_uj / UJ_PER_J

    @property
    def gco2e(self) -> float:
        return self.gco2e_ug / UG_PER_G

    def to_dict(self, group_by: Sequence[str]) -> dict[str, Any]:
        """The contract's row object: the grouping keys asked for, then the sums."""
        out: dict[str, Any] = {key: getattr(self, key) for key in GROUP_KEYS if key in group_by}
        out.update(requests=self.requests, prompt_tokens=self.prompt_tokens,
                   completion_tokens=self.completion_tokens, reasoning_tokens=self.reasoning_tokens,
                   joules=self.joules, joules_all_in=self.joules_all_in, gco2e=self.gco2e)
        return out


def validate_group_by(group_by: Iterable[str]) -> tuple[str, ...]:
    """The grouping keys in canonical order; ValueError naming an unknown one."""
    wanted = set()
    for key in group_by:
        if key not in GROUP_KEYS:
            raise ValueError(f"unknown group_by key {key!r}; expected some of {', '.join(GROUP_KEYS)}")
        wanted.add(key)
    return tuple(key for key in GROUP_KEYS if key in wanted)


SUM_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "reasoning_tokens", "joules",
              "joules_all_in", "gco2e")



def parse_group_by(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """`"model,backend,hour"` (or a list) to canonical grouping keys; ValueError if unknown."""
    if value is None:
        return ()
    parts = value.split(",") if isinstance(value, str) else list(value)
    return validate_group_by(part.strip() for part in parts if part.strip())


def parse_time_s(value: str | float | None) -> float | None:
    """An API/CLI time to epoch seconds: ISO 8601 (`2026-11-27T04:00:00Z`, `2026-11-27`, with an
    offset or naive = UTC) or a number of epoch seconds. ValueError if it is neither."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return _in_range(float(value), value)
    text = value.strip()
    try:
        t_s = float(text)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise ValueError(f"not an ISO 8601 time or epoch seconds: {_short(value)}") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        t_s = parsed.timestamp()
    return _in_range(t_s, value)


#: Epoch seconds a datetime can hold (years 1 to 9999): the stores turn times into hours and
#: dates, so nan, inf or 1e300 would fail there, far from the parameter that caused it.
_MIN_TIME_S, _MAX_TIME_S = -62_135_596_800.0, 253_402_300_799.0


def _in_range(t_s: float, value: object) -> float:
    if not _MIN_TIME_S <= t_s <= _MAX_TIME_S:  # also false for nan
        raise ValueError(f"time out of range (years 1 to 9999): {_short(value)}")
    return t_s


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _row(key: tuple[Any, ...], group_by: tuple[str, ...], sums: list[int]) -> UsageRow:
    keys = dict(zip(group_by, key, strict=True))
    if "hour" in keys:
        keys["hour"] = hour_iso(keys["hour"])
    return UsageRow(requests=sums[0], prompt_tokens=sums[1], completion_tokens=sums[2],
                    joules_uj=sums[3], joules=sums[3] / UJ_PER_J, reasoning_tokens=sums[4],
                    joules_all_in_uj=sums[5], gco2e_ug=sums[6], **keys)


def group_buckets(buckets: Iterable[Bucket], group_by: Sequence[str],
                  site_of: Mapping[str, str] | None = None) -> list[UsageRow]:
    """Sum aggregate cells per group; rows sorted by the grouping keys (hours in time order).
    No cells -> no rows (also when group_by is empty). `site` groups by `site_of[backend]`
    ("" for a backend without one)."""
    keys = validate_group_by(group_by)
    attrs = tuple("hour_s" if key == "hour" else key for key in keys)
    sites = site_of or {}
    sums: dict[tuple[Any, ...], list[int]] = {}
    for b in buckets:
        key = tuple(sites.get(b.backend, "") if attr == "site" else getattr(b, attr) for attr in attrs)
        acc = sums.get(key)
        if acc is None:
            sums[key] = [b.requests, b.prompt_tokens, b.completion_tokens, b.joules_uj,
                         b.reasoning_tokens, b.joules_all_in_uj, b.gco2e_ug]
        else:
            acc[0] += b.requests
            acc[1] += b.prompt_tokens
            acc[2] += b.completion_tokens
            acc[3] += b.joules_uj
            acc[4] += b.reasoning_tokens
            acc[5] += b.joules_all_in_uj
            acc[6] += b.gco2e_ug
    return [_row(key, keys, sums[key]) for key in sorted(sums)]


def totals(rows: Iterable[UsageRow]) -> dict[str, Any]:
    """The contract's `total` object: exact sums over rows."""
    req = pt = ct = rt = uj = all_in_uj = ug = 0
    for row in rows:
        req += row.requests
        pt += row.prompt_tokens
        ct += row.completion_tokens
        rt += row.reasoning_tokens
        uj += row.joules_uj
        all_in_uj += row.joules_all_in_uj
        ug += row.gco2e_ug
    return {"requests": req, "prompt_tokens": pt, "completion_tokens": ct, "reasoning_tokens": rt,
            "joules": uj / UJ_PER_J, "joules_all_in": all_in_uj / UJ_PER_J, "gco2e": ug / UG_PER_G}


def usage_payload(rows: Sequence[UsageRow], group_by: Sequence[str]) -> dict[str, Any]:
    """The body of `GET /v1/energy/usage`: {"object": "list", "data": [...], "total": {...}}."""
    keys = validate_group_by(group_by)
    return {"object": "list", "data": [row.to_dict(keys) for row in rows], "total": totals(rows)}


def format_uj(joules_uj: int) -> str:
    """Micro-joules as an exact decimal number of joules: 1234567 -> "1.234567"."""
    sign = "-" if joules_uj < 0 else ""
    whole, frac = divmod(abs(joules_uj), UJ_PER_J)
    return f"{sign}{whole}.{frac:06d}"


def rows_to_csv(rows: Iterable[UsageRow], group_by: Sequence[str]) -> str:
    """CSV with a header: the grouping keys, then requests, prompt_tokens, completion_tokens,
    reasoning_tokens, joules, joules_all_in, gco2e (exact to the micro-joule, microgram)."""
    keys = validate_group_by(group_by)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*keys, *SUM_FIELDS])
    for row in rows:
        writer.writerow([*(getattr(row, key) for key in keys), row.requests, row.prompt_tokens,
                         row.completion_tokens, row.reasoning_tokens, format_uj(row.joules_uj),
                         format_uj(row.joules_all_in_uj), format_uj(row.gco2e_ug)])
    return out.getvalue()


def format_table(rows: Sequence[UsageRow], group_by: Sequence[str]) -> str:
    """An aligned text table with a TOTAL line, for `joulegate usage`."""
    keys = validate_group_by(group_by)
    header = [*keys, *SUM_FIELDS]
    body = [[*(str(getattr(row, key)) for key in keys), str(row.requests), str(row.prompt_tokens),
             str(row.completion_tokens), str(row.reasoning_tokens), f"{row.joules_uj / UJ_PER_J:.3f}",
             f"{row.joules_all_in:.3f}", f"{row.gco2e:.4f}"]
            for row in rows]
    total = totals(rows)
    label = ["TOTAL", *([""] * (len(keys) - 1))] if keys else []
    body.append([*label, str(total["requests"]), str(total["prompt_tokens"]),
                 str(total["completion_tokens"]), str(total["reasoning_tokens"]), f"{total['joules']:.3f}",
                 f"{total['joules_all_in']:.3f}", f"{total['gco2e']:.4f}"])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    numeric = [False] * len(keys) + [True] * len(SUM_FIELDS)

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(cells, widths, numeric, strict=True)).rstrip()

    lines = [fmt(header), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in body[:-1]]
    if rows and keys:
        lines.append(fmt(["-" * w for w in widths]))
    lines.append(fmt(body[-1]))
    return "\n".join(lines) + "\n"
