"""dcgm-exporter: scrape its Prometheus `/metrics` page every `interval_s`.

Metrics, in order of preference (labels `gpu` = index, `UUID`):
  DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION  counter, mJ since boot  -> energy_j (mJ / 1000)
  DCGM_FI_DEV_POWER_USAGE_INSTANT       gauge, W (not in the exporter's default counters)
  DCGM_FI_DEV_POWER_USAGE               gauge, W (averaged by the driver: the last resort)
and, where the exporter has it, DCGM_FI_DEV_POWER_MGMT_LIMIT (W): a reading implying more than
1.5x a GPU's limit is discarded (2 kW per GPU without it; see counters.py).

The exporter's collect interval (default 30 s, `-c` / `DCGM_EXPORTER_INTERVAL`) is usually far
coarser than ours, so most scrapes return the values of an older collection:
  - energy counter: a scrape whose selected counters all equal the previous scrape's is a
    repeat, and no sample is emitted (a repeated counter value at a new time would read as zero
    power). A changed value is stamped with the scrape time, the midpoint of our request: the
    exporter collected it somewhere between the previous scrape and this one, so the stamp is
    late by 0 to `interval_s` (interval_s / 2 on average) plus DCGM's own field update delay.
    Scraping faster than the exporter collects keeps that bias small; energy between two
    collections is spread evenly by the timeline.
  - if the page carries sample timestamps (ms since the epoch, the exporter host's clock, not
    offset-corrected), a changed reading is stamped with them instead (their mean over the
    selected GPUs); for power-only pages a scrape with unchanged timestamps is a repeat.
  - power only, without timestamps: every scrape emits (a repeated gauge is still a valid,
    if stale, power reading: up to one collect interval old).
Only the three metric families are parsed (lines are filtered before the Prometheus parser), so
a large page costs little time on the event loop. With MIG or several series per GPU, the first
series of each GPU counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import PowerConfig
from proxy.energy.sources.base import (
    METHOD_ENERGY_COUNTER,
    METHOD_POWER_AVERAGE,
    METHOD_POWER_INSTANT,
    Backoff,
    GpuRead,
    PowerSource,
    SampleCallback,
    select_gpus,
)

log = logging.getLogger("joulegate.power.dcgm")

ENERGY_MJ = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
POWER_INSTANT_W = "DCGM_FI_DEV_POWER_USAGE_INSTANT"
POWER_W = "DCGM_FI_DEV_POWER_USAGE"
LIMIT_W = "DCGM_FI_DEV_POWER_MGMT_LIMIT"
_WANTED = (ENERGY_MJ, POWER_INSTANT_W, POWER_W)
_PARSED = (*_WANTED, LIMIT_W)


@dataclass(frozen=True, slots=True)
class GpuValue:
    """One series of one metric: the GPU it belongs to, its value, its timestamp (s) if any."""

    index: int | None
    uuid: str | None
    value: float
    timestamp_s: float | None


def parse_page(text: str) -> dict[str, list[GpuValue]]:
    """The power metrics (and limit) of an exporter page, per metric one value per GPU (page order).

    Raises ValueError for a page the Prometheus parser rejects.
    """
    # Sample lines only: no TYPE comments, so the parser keeps the names as they are (it would
    # otherwise rename a counter's samples to *_total).
    lines = [line for line in text.splitlines() if line.startswith(_PARSED)]
    out: dict[str, list[GpuValue]] = {}
    seen: set[tuple[str, int | None, str | None]] = set()
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for sample in family.samples:
            name = sample.name
            if name not in _PARSED:
                continue
            gpu = sample.labels.get("gpu")
            index = int(gpu) if gpu is not None and gpu.strip().isdigit() else None
            uuid = sample.labels.get("UUID") or None
            if index is None and uuid is None:
                continue
            key = (name, index, uuid)
            if key in seen:
                continue
            seen.add(key)
            ts = sample.timestamp
            timestamp_s = None if ts is None else float(ts)
            out.setdefault(name, []).append(GpuValue(index, uuid, float(sample.value), timestamp_s))
    return out


@dataclass(frozen=True, slots=True)
class Reading:
    """What one scrape says about the selected GPUs."""

    energy_mj: tuple[float, ...] | None
    power_w: float | None
    power_metric: str | None
    timestamp_s: float | None
    gpus: tuple[GpuRead, ...] = ()  # per selected GPU, for the counter tracker


def reading_from(page: dict[str, list[GpuValue]], selectors: list[int | str]) -> Reading:
    """Pick the selected GPUs out of a parsed page. Raises ValueError when one is missing."""

    def pick(metric: str) -> list[GpuValue] | None:
        series = page.get(metric)
        if not series:
            return None
        chosen = select_gpus(selectors, ((s.index, s.uuid) for s in series))
        return None if chosen is None else [series[i] for i in chosen]

    energy = pick(ENERGY_MJ)
    power_metric = next((m for m in (POWER_INSTANT_W, POWER_W) if pick(m) is not None), None)
    power = pick(power_metric) if power_metric else None
    if energy is None and power is None:
        present = [m for m in _WANTED if page.get(m)]
        if present:
            raise ValueError(f"the exporter page lacks GPU(s) {selectors} in {', '.join(present)}")
        raise ValueError(f"the exporter page has none of {', '.join(_WANTED)}")
    stamps = [s.timestamp_s for s in (energy or power or [])]
    timestamp_s = sum(stamps) / len(stamps) if stamps and None not in stamps else None  # type: ignore[arg-type]
    # Per GPU, matched on its labels: the metrics need not list the GPUs in the same order.
    limits = {(s.index, s.uuid): s.value for s in page.get(LIMIT_W, [])}
    powers = {(s.index, s.uuid): s.value for s in power or []}
    gpus = tuple(GpuRead(s.uuid or str(s.index), s.value if energy is not None else None,
                         powers.get((s.index, s.uuid)), limits.get((s.index, s.uuid)))
                 for s in energy or power or [])
    return Reading(
        energy_mj=tuple(s.value for s in energy) if energy is not None else None,
        power_w=sum(s.value for s in power) if power is not None else None,
        power_metric=power_metric,
        timestamp_s=timestamp_s,
        gpus=gpus,
    )


class DcgmSource(PowerSource):
    """Scrapes a dcgm-exporter (or anything that speaks its metric names) every interval_s."""

    kind = "dcgm"

    def __init__(self, config: PowerConfig, on_sample: SampleCallback) -> None:
        super().__init__(config, on_sample)
        if not config.url:
            raise ValueError("the dcgm power source needs power.url")
        self.url = config.url
        self.scrapes = 0
        self.repeats = 0  # scrapes that returned the previous collection again
        self._last_key: tuple[object, ...] | None = None
        self._client: httpx.AsyncClient | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        timeout_s = max(2.0, 5.0 * self.interval_s)
        await self._release()  # a client left by a crashed earlier run
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), follow_redirects=True)
        backoff = Backoff(0.2, 5.0)
        while True:
            deadline_s = loop.time() + self.interval_s
            try:
                await self.scrape_once()
            except (httpx.HTTPError, ValueError) as exc:
                detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                self._failed(f"scrape of {self.url} failed: {detail}")
                await asyncio.sleep(backoff.next_s())
                continue
            backoff.reset()
            await asyncio.sleep(max(0.0, deadline_s - loop.time()))

    async def scrape_once(self) -> bool:
        """One scrape; True when it emitted a sample. Raises httpx.HTTPError / ValueError."""
        assert self._client is not None
        send_s = time.time()
        t0 = time.perf_counter()
        response = await self._client.get(self.url)
        rtt_s = time.perf_counter() - t0
        response.raise_for_status()
        scrape_s = send_s + rtt_s / 2.0
        reading = reading_from(parse_page(response.text), self.config.gpus)
        self.scrapes += 1
        self._ok()
        if reading.energy_mj is not None:
            self._set_method(METHOD_ENERGY_COUNTER)
            key: tuple[object, ...] = ("energy", reading.energy_mj)
        else:
            self._set_method(METHOD_POWER_INSTANT if reading.power_metric == POWER_INSTANT_W
                             else METHOD_POWER_AVERAGE)
            # Without timestamps a repeated gauge is still a (stale) reading: emit it.
            key = ("power", reading.timestamp_s) if reading.timestamp_s is not None else ("power", scrape_s)
        if key == self._last_key:
            self.repeats += 1
            return False
        self._last_key = key
        t_s = reading.timestamp_s if reading.timestamp_s is not None else scrape_s
        return self._emit_reads(t_s, reading.gpus)

    async def _release(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
