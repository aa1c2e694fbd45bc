"""Grid carbon intensity per site, and the all-in energy and grams of one request.

A site (config `sites:`) has a PUE (facility energy / IT energy) and an intensity source:
  - constant: `{gco2e_per_kwh: N}`;
  - CSV schedule: `{csv: FILE}` with rows `timestamp,gco2e_per_kwh` (ISO 8601 or epoch seconds,
    the shape of public hourly exports); a row's value holds until the next row;
  - HTTP: `{url: URL, field: a.b.c, interval_s: 300}`, polled; the last good value is kept, and
    figures made with it once it is older than 3 polls are `estimated`.

A request's all-in joules = (GPU joules + host joules) x PUE; its grams = all-in kWh x the
site's gCO2e/kWh at the request's end. `x-energy-joules` keeps meaning GPU joules.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import csv
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx

from proxy.redact import redact_text

if TYPE_CHECKING:
    from proxy.config import Config, SiteConfig
    from proxy.records import RequestRecord

__all__ = ["J_PER_KWH", "ConstantIntensity", "CsvIntensity", "HttpIntensity", "Site",
           "CarbonBook", "check_site_files", "read_csv_points", "read_intensity_csv", "grams"]

log = logging.getLogger("joulegate.carbon")

J_PER_KWH = 3.6e6
_STALE_POLLS = 3  # an HTTP value older than this many polls makes figures `estimated`


def grams(joules_all_in: float, gco2e_per_kwh: float) -> float:
    """gCO2e of `joules_all_in` (J, facility included) on a grid at `gco2e_per_kwh`."""
    return joules_all_in / J_PER_KWH * gco2e_per_kwh


class ConstantIntensity:
    """A fixed gCO2e/kWh."""

    def __init__(self, gco2e_per_kwh: float) -> None:
        self.value = float(gco2e_per_kwh)

    def at(self, t_s: float) -> tuple[float | None, bool]:
        """(gCO2e/kWh at wall-clock `t_s`, whether it is current)."""
        return self.value, True


def _parse_time(text: str) -> float:
    """Epoch seconds from epoch seconds or ISO 8601 (naive times are UTC)."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()


def read_csv_points(path: str, header: tuple[str, str],
                    parse_t: Callable[[str], float] = float) -> list[tuple[float, float]]:
    """Rows of (time, gCO2e/kWh) under `header` -> points in file order; ValueError naming the
    file and line. Shared with the simulator's `t_s,gco2e_per_kwh` schedules."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not rows or tuple(c.strip() for c in rows[0][:2]) != header:
        raise ValueError(f"{path}: expected the header `{','.join(header)}`")
    points: list[tuple[float, float]] = []
    for n, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        try:
            t_s, value = parse_t(row[0]), float(row[1])
        except (ValueError, IndexError):
            raise ValueError(f"{path}:{n}: expected a {header[0]} and a number") from None
        if not (math.isfinite(t_s) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{path}:{n}: values must be finite and >= 0")
        points.append((t_s, value))
    if not points:
        raise ValueError(f"{path}: no rows")
    return points


def check_site_files(config: Config) -> None:
    """Read every site's CSV schedule once, so a bad file fails at start-up (ValueError naming
    the site, the file and the line), not at the first request."""
    for site in config.sites:
        if site.carbon.csv is not None:
            try:
                read_intensity_csv(site.carbon.csv)
            except ValueError as exc:
                raise ValueError(f"sites: {site.name}: {exc}") from None


def read_intensity_csv(path: str) -> tuple[list[float], list[float]]:
    """`timestamp,gco2e_per_kwh` rows (ISO 8601 or epoch s) -> (epoch seconds ascending, values)."""
    points = sorted(read_csv_points(path, ("timestamp", "gco2e_per_kwh"), _parse_time))
    return [p[0] for p in points], [p[1] for p in points]


class CsvIntensity:
    """A schedule read once: the last row at or before t (the first row before any)."""

    def __init__(self, path: str) -> None:
        self.times_s, self.values = read_intensity_csv(path)

    def at(self, t_s: float) -> tuple[float | None, bool]:
        i = bisect.bisect_right(self.times_s, t_s) - 1
        # Past the last row the schedule is extrapolated: figures are estimates then.
        return self.values[max(i, 0)], self.times_s[0] <= t_s and (
            i < len(self.times_s) - 1 or t_s - self.times_s[-1] <= 3600.0)


def _dig(data: Any, field: str) -> float | None:
    """The number at dotted `field` (list indices allowed) in a JSON value, or None."""
    for part in field.split("."):
        if isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        elif isinstance(data, dict) and part in data:
            data = data[part]
        else:
            return None
    if isinstance(data, bool) or not isinstance(data, int | float) or not math.isfinite(data) or data < 0:
        return None
    return float(data)


class HttpIntensity:
    """Polls a JSON endpoint every `interval_s`; keeps the last good value (None before one)."""

    def __init__(self, url: str, field: str, interval_s: float = 300.0,
                 headers: dict[str, str] | None = None) -> None:
        self.url, self.field, self.interval_s = url, field, interval_s
        self.headers = headers or {}
        self.value: float | None = None
        self.fetched_s: float | None = None
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    def at(self, t_s: float) -> tuple[float | None, bool]:
        fresh = self.fetched_s is not None and t_s - self.fetched_s <= _STALE_POLLS * self.interval_s
        return self.value, fresh

    async def poll_once(self, client: httpx.AsyncClient) -> bool:
        """One fetch; True if it gave a value. Errors are kept in `last_error`, never raised."""
        try:
            resp = await client.get(self.url, headers=self.headers, timeout=10.0)
            resp.raise_for_status()
            value = _dig(resp.json(), self.field)
        except (httpx.HTTPError, ValueError) as exc:
            # httpx puts the URL in its messages; a token in its query must not reach the log.
            self.last_error = redact_text(f"{type(exc).__name__}: {exc}")[:200]
            return False
        if value is None:
            self.last_error = f"no number >= 0 at `{self.field}` in the answer"
            return False
        self.value, self.fetched_s, self.last_error = value, time.time(), None
        return True

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="carbon-poll")

    async def _run(self) -> None:
        async with httpx.AsyncClient() as client:
            while True:
                if not await self.poll_once(client):
                    log.warning("carbon intensity poll failed (%s); keeping the last value",
                                self.last_error)
                await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


IntensitySource = ConstantIntensity | CsvIntensity | HttpIntensity


class Site:
    """A data centre: its PUE and its grid's intensity source."""

    def __init__(self, name: str, pue: float, source: IntensitySource) -> None:
        self.name, self.pue, self.source = name, pue, source

    @classmethod
    def from_config(cls, site: SiteConfig) -> Site:
        c = site.carbon
        source: IntensitySource
        if c.gco2e_per_kwh is not None:
            source = ConstantIntensity(c.gco2e_per_kwh)
        elif c.csv is not None:
            source = CsvIntensity(c.csv)
        else:
            assert c.url is not None
            source = HttpIntensity(c.url, c.field, c.interval_s, c.headers)
        return cls(site.name, site.pue, source)

    def gco2e_per_kwh(self, t_s: float | None = None) -> float | None:
        """The grid's gCO2e/kWh at `t_s` (default now); None while unknown."""
        return self.source.at(time.time() if t_s is None else t_s)[0]


class CarbonBook:
    """Sites by backend; fills a request record's all-in joules and grams."""

    def __init__(self, sites: dict[str, Site], backend_site: dict[str, str]) -> None:
        self.sites = sites
        self.by_backend = {b: sites[s] for b, s in backend_site.items()}

    @classmethod
    def from_config(cls, config: Config) -> CarbonBook:
        sites = {s.name: Site.from_config(s) for s in config.sites}
        return cls(sites, {b.name: b.site for b in config.backends if b.site is not None})

    def site_of(self, backend: str | None) -> Site | None:
        return self.by_backend.get(backend) if backend is not None else None

    def worst_g_per_j(self, t_s: float | None = None) -> float | None:
        """The most grams CO2e one joule of IT energy (GPU + host) costs at any site at `t_s`
        (default now): the largest PUE x gCO2e/kWh / 3.6e6. None while no site's intensity is
        known. Budget holds in grams use it: the backend is not chosen when a hold is made."""
        now_s = time.time() if t_s is None else t_s
        known = [site.pue * value for site in self.sites.values()
                 if (value := site.source.at(now_s)[0]) is not None]
        return max(known) / J_PER_KWH if known else None

    def fill(self, record: RequestRecord, host_joules: float, final: bool = False) -> None:
        """Set the record's host, all-in joules and grams from its GPU joules (no site: PUE 1
        and no grams). On the `final` figures a stale or extrapolated intensity makes the
        method `estimated` (earlier ones are estimates until the final anyway)."""
        if record.joules is None:
            return
        site = self.site_of(record.backend)
        record.host_joules = host_joules
        pue = site.pue if site is not None else 1.0
        record.joules_all_in = (record.joules + host_joules) * pue
        if site is None:
            record.gco2e = None
            return
        record.site = site.name
        value, fresh = site.source.at(record.end_s or record.start_s)
        record.gco2e = grams(record.joules_all_in, value) if value is not None else None
        if not fresh and final:
            record.energy_method = "estimated"

    async def start(self) -> None:
        for site in self.sites.values():
            if isinstance(site.source, HttpIntensity):
                await site.source.start()

    async def close(self) -> None:
        for site in self.sites.values():
            if isinstance(site.source, HttpIntensity):
                await site.source.close()
