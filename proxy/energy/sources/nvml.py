"""NVML: the GPUs of this host through NVIDIA's official bindings (`nvidia-ml-py`, module `pynvml`).

Per GPU, in order of preference:
  energy: `nvmlDeviceGetTotalEnergyConsumption`, a cumulative counter in mJ since the driver
      loaded (Volta and newer); it updates about every 20-100 ms.
  power: the `NVML_FI_DEV_POWER_INSTANT` field through `nvmlDeviceGetFieldValues` (mW, instant);
      else `nvmlDeviceGetPowerUsage` (mW), which on Ampere and newer (but GA100) is a 1 s
      average: the last resort, logged as such and visible as `method == "power_average"`.
  power limit: `nvmlDeviceGetEnforcedPowerLimit` (mW), read once at init; a reading implying
      more than 1.5x it is discarded (see counters.py). None where unsupported.
  power limits (`limits`, `set_limit_w`, for the agent's /v1/power/limits):
      `nvmlDeviceGetPowerManagementLimit`, `...LimitConstraints`, `...DefaultLimit` and
      `nvmlDeviceSetPowerManagementLimit`, all in mW.

NVML calls block, so `NvmlSource` runs them on one dedicated thread. `NvmlReader` is the small
synchronous reader shared with `joulegate agent` (proxy/agent.py).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any, NamedTuple

from proxy.config import PowerConfig
from proxy.energy.sources.base import (
    METHOD_ENERGY_COUNTER,
    METHOD_POWER_AVERAGE,
    METHOD_POWER_INSTANT,
    Backoff,
    GpuRead,
    PowerSource,
    SampleCallback,
)
from proxy.power_limits import GpuLimits

log = logging.getLogger("joulegate.power.nvml")

POWER_INSTANT = "instant"
POWER_AVERAGE = "average"


class GpuReading(NamedTuple):
    """One GPU at one moment. energy_mj: cumulative counter in mJ (None: no counter);
    power_w: power in W (instant where the GPU offers it, else the 1 s average; None: neither);
    power_limit_w: the enforced power limit in W (None: unknown)."""

    index: int  # type: ignore[assignment]  # shadows tuple.index(), which nothing here calls
    uuid: str
    name: str
    energy_mj: int | None
    power_w: float | None
    power_limit_w: float | None = None


class NvmlError(Exception):
    """NVML failed; `str()` is one line."""


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _field_value(field: Any, nvml: ModuleType) -> float:
    """The number in a `c_nvmlFieldValue_t`, by its `valueType`."""
    kinds = {
        getattr(nvml, "NVML_VALUE_TYPE_DOUBLE", 0): "dVal",
        getattr(nvml, "NVML_VALUE_TYPE_UNSIGNED_INT", 1): "uiVal",
        getattr(nvml, "NVML_VALUE_TYPE_UNSIGNED_LONG", 2): "ulVal",
        getattr(nvml, "NVML_VALUE_TYPE_UNSIGNED_LONG_LONG", 3): "ullVal",
        getattr(nvml, "NVML_VALUE_TYPE_SIGNED_LONG_LONG", 4): "sllVal",
        getattr(nvml, "NVML_VALUE_TYPE_SIGNED_INT", 5): "siVal",
        getattr(nvml, "NVML_VALUE_TYPE_UNSIGNED_SHORT", 6): "usVal",
    }
    return float(getattr(field.value, kinds.get(int(field.valueType), "uiVal")))


class _Gpu:
    __slots__ = ("handle", "index", "uuid", "name", "has_counter", "power", "limit_w")

    def __init__(self, handle: Any, index: int, uuid: str, name: str) -> None:
        self.handle = handle
        self.index = index
        self.uuid = uuid
        self.name = name
        self.has_counter = False
        self.power: str | None = None  # POWER_INSTANT, POWER_AVERAGE or None
        self.limit_w: float | None = None


class NvmlReader:
    """Synchronous NVML reader for a set of GPUs (blocking: call it from a worker thread).

    gpus: indices or UUIDs (an all-digit string is an index); empty or None = every GPU.
    nvml: the `pynvml` module to use (tests pass a fake); imported lazily by default.
    """

    def __init__(self, gpus: list[int | str] | None = None, nvml: ModuleType | None = None) -> None:
        self.selectors: list[int | str] = list(gpus or [])
        self._nvml = nvml
        self._gpus: list[_Gpu] = []
        self.initialised = False

    @property
    def nvml(self) -> ModuleType:
        if self._nvml is None:
            self._nvml = importlib.import_module("pynvml")
        return self._nvml

    def init(self) -> None:
        """Initialise NVML, find the selected GPUs and what each can report. Raises NvmlError."""
        try:
            nvml = self.nvml
        except ImportError as exc:
            raise NvmlError(f"the nvidia-ml-py package (module pynvml) is not installed: {exc}") from None
        try:
            nvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - NVMLError and ctypes/OS errors alike
            raise NvmlError(f"NVML could not initialise ({_describe(exc)}); is there an NVIDIA GPU "
                            "and driver on this host?") from None
        try:
            self._gpus = [self._open(h) for h in self._handles()]
            if not self._gpus:
                raise NvmlError("NVML found no GPU")
            for gpu in self._gpus:
                self._probe(gpu)
        except NvmlError:
            self._shutdown_quietly()
            raise
        except Exception as exc:  # noqa: BLE001
            self._shutdown_quietly()
            raise NvmlError(f"NVML device setup failed: {_describe(exc)}") from None
        self.initialised = True
        for gpu in self._gpus:
            if not gpu.has_counter and gpu.power == POWER_AVERAGE:
                log.warning("GPU %d (%s): no energy counter and no instant power field; falling "
                            "back to nvmlDeviceGetPowerUsage, a 1 s average", gpu.index, gpu.uuid)
            elif not gpu.has_counter and gpu.power is None:
                log.warning("GPU %d (%s): reports neither energy nor power", gpu.index, gpu.uuid)

    def _handles(self) -> list[Any]:
        nvml = self.nvml
        count = int(nvml.nvmlDeviceGetCount())
        if not self.selectors:
            return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        handles = []
        for selector in self.selectors:
            if isinstance(selector, int) or selector.strip().isdigit():
                index = int(selector)
                if not 0 <= index < count:
                    raise NvmlError(f"GPU index {index} does not exist (this host has {count} GPUs)")
                handles.append(nvml.nvmlDeviceGetHandleByIndex(index))
            else:
                uuid = selector.strip()
                if not uuid.upper().startswith(("GPU-", "MIG-")):
                    uuid = f"GPU-{uuid}"
                try:
                    handles.append(nvml.nvmlDeviceGetHandleByUUID(uuid))
                except nvml.NVMLError as exc:
                    raise NvmlError(f"no GPU with UUID {selector} ({_describe(exc)})") from None
        return handles

    def _open(self, handle: Any) -> _Gpu:
        nvml = self.nvml
        index = int(nvml.nvmlDeviceGetIndex(handle))
        uuid = nvml.nvmlDeviceGetUUID(handle)
        name = nvml.nvmlDeviceGetName(handle)
        uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
        name = name.decode() if isinstance(name, bytes) else str(name)
        return _Gpu(handle, index, uuid, name)

    def _not_supported(self, exc: Exception) -> bool:
        return getattr(exc, "value", None) in (
            getattr(self.nvml, "NVML_ERROR_NOT_SUPPORTED", 3),
            getattr(self.nvml, "NVML_ERROR_FUNCTION_NOT_FOUND", 13),
        )

    def _probe(self, gpu: _Gpu) -> None:
        """Find out once which readings this GPU supports (NOT_SUPPORTED never changes)."""
        nvml = self.nvml
        try:
            nvml.nvmlDeviceGetTotalEnergyConsumption(gpu.handle)
            gpu.has_counter = True
        except nvml.NVMLError as exc:
            if not self._not_supported(exc):
                raise
        gpu.limit_w = self._power_limit_w(gpu)
        if self._instant_power_w(gpu) is not None:
            gpu.power = POWER_INSTANT
            return
        try:
            nvml.nvmlDeviceGetPowerUsage(gpu.handle)
            gpu.power = POWER_AVERAGE
        except nvml.NVMLError as exc:
            if not self._not_supported(exc):
                raise

    def _power_limit_w(self, gpu: _Gpu) -> float | None:
        """The enforced power limit in W, or None: it only bounds plausible readings, so any
        failure to read it just leaves the 2 kW default in place."""
        read = getattr(self.nvml, "nvmlDeviceGetEnforcedPowerLimit", None)
        if read is None:
            return None
        try:
            limit_w = float(read(gpu.handle)) / 1000.0
        except Exception as exc:  # noqa: BLE001 - NVMLError or a binding without the call
            log.debug("GPU %d: no enforced power limit (%s)", gpu.index, _describe(exc))
            return None
        return limit_w if limit_w > 0 else None

    def _instant_power_w(self, gpu: _Gpu) -> float | None:
        """Instant power in W, or None where the field is not supported; raises other errors."""
        nvml = self.nvml
        field_id = getattr(nvml, "NVML_FI_DEV_POWER_INSTANT", None)
        if field_id is None:
            return None
        try:
            values = nvml.nvmlDeviceGetFieldValues(gpu.handle, [field_id])
        except nvml.NVMLError as exc:
            if self._not_supported(exc):
                return None
            raise
        field = values[0]
        ret = int(field.nvmlReturn)
        if ret != getattr(nvml, "NVML_SUCCESS", 0):
            if ret in (getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", 3),
                       getattr(nvml, "NVML_ERROR_FUNCTION_NOT_FOUND", 13)):
                return None
            raise nvml.NVMLError(ret)
        return _field_value(field, nvml) / 1000.0

    @property
    def gpus(self) -> list[tuple[int, str, str]]:
        """(index, uuid, name) of the selected GPUs, after init()."""
        return [(g.index, g.uuid, g.name) for g in self._gpus]

    @property
    def power_methods(self) -> dict[int, str | None]:
        """Per GPU index: "instant", "average" or None (no power reading at all)."""
        return {g.index: g.power for g in self._gpus}

    @property
    def counters(self) -> dict[int, bool]:
        """Per GPU index: whether it has the cumulative energy counter."""
        return {g.index: g.has_counter for g in self._gpus}

    def read(self) -> list[GpuReading]:
        """Every selected GPU now. Raises NvmlError if any GPU fails (no partial readings)."""
        if not self.initialised:
            raise NvmlError("NVML is not initialised")
        nvml = self.nvml
        out: list[GpuReading] = []
        try:
            for gpu in self._gpus:
                energy_mj = int(nvml.nvmlDeviceGetTotalEnergyConsumption(gpu.handle)) if gpu.has_counter else None
                power_w: float | None = None
                if gpu.power == POWER_INSTANT:
                    power_w = self._instant_power_w(gpu)
                    if power_w is None:
                        raise NvmlError(f"GPU {gpu.index}: instant power field stopped answering")
                elif gpu.power == POWER_AVERAGE:
                    power_w = float(nvml.nvmlDeviceGetPowerUsage(gpu.handle)) / 1000.0
                out.append(GpuReading(gpu.index, gpu.uuid, gpu.name, energy_mj, power_w, gpu.limit_w))
        except NvmlError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise NvmlError(f"GPU {gpu.index} read failed: {_describe(exc)}") from None
        return out

    def limits(self) -> list[GpuLimits]:
        """Every selected GPU's power limit and accepted range, W. Raises NvmlError (also where
        the GPU does not support power management)."""
        if not self.initialised:
            raise NvmlError("NVML is not initialised")
        nvml = self.nvml
        out: list[GpuLimits] = []
        try:
            for gpu in self._gpus:
                min_mw, max_mw = nvml.nvmlDeviceGetPowerManagementLimitConstraints(gpu.handle)
                out.append(GpuLimits(
                    gpu.index, gpu.uuid, float(nvml.nvmlDeviceGetPowerManagementLimit(gpu.handle)) / 1000.0,
                    float(min_mw) / 1000.0, float(max_mw) / 1000.0,
                    float(nvml.nvmlDeviceGetPowerManagementDefaultLimit(gpu.handle)) / 1000.0))
        except Exception as exc:  # noqa: BLE001 - NVMLError (NOT_SUPPORTED...) or a bad binding
            raise NvmlError(f"GPU {gpu.index} power limits unreadable: {_describe(exc)}") from None
        return out

    def set_limit_w(self, index: int, watts: float) -> None:
        """Set GPU `index`'s power limit to `watts` (the caller clamps it; NVML takes mW and
        needs root or CAP_SYS_ADMIN). Raises NvmlError. The enforced limit read at init, which
        bounds plausible readings, follows."""
        gpu = next((g for g in self._gpus if g.index == index), None)
        if gpu is None or not self.initialised:
            raise NvmlError(f"no initialised GPU with index {index}")
        try:
            self.nvml.nvmlDeviceSetPowerManagementLimit(gpu.handle, int(round(watts * 1000.0)))
        except Exception as exc:  # noqa: BLE001
            raise NvmlError(f"GPU {index}: setting the power limit to {watts:g} W failed: {_describe(exc)}") from None
        gpu.limit_w = self._power_limit_w(gpu)

    def shutdown(self) -> None:
        """Release NVML; init() may be called again afterwards."""
        if self.initialised:
            self.initialised = False
            self._shutdown_quietly()
        self._gpus = []

    def _shutdown_quietly(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception as exc:  # noqa: BLE001
            log.debug("nvmlShutdown failed: %s", exc)


def power_method(reader: NvmlReader) -> str | None:
    """The source method the reader's GPUs allow as a whole (the weakest GPU decides)."""
    if reader.counters and all(reader.counters.values()):
        return METHOD_ENERGY_COUNTER
    methods = set(reader.power_methods.values())
    if not methods or None in methods:
        return None
    return METHOD_POWER_AVERAGE if POWER_AVERAGE in methods else METHOD_POWER_INSTANT


def timed_read(reader: NvmlReader, clock: Any = time.time) -> tuple[float, list[GpuReading]]:
    """(wall-clock midpoint of the read in s, readings): the stamp the sample gets."""
    before_s = clock()
    readings = reader.read()
    after_s = clock()
    return (before_s + after_s) / 2.0, readings


def gpu_reads(readings: list[GpuReading]) -> list[GpuRead]:
    """The readings as the per-GPU counter tracker takes them (keyed by UUID)."""
    return [GpuRead(r.uuid, r.energy_mj, r.power_w, r.power_limit_w) for r in readings]


class NvmlSource(PowerSource):
    """The GPUs of the proxy's own host, read with NVML on a dedicated thread."""

    kind = "nvml"
    #: Consecutive failed reads after which NVML is shut down and initialised again.
    REINIT_AFTER_FAILURES = 5

    def __init__(self, config: PowerConfig, on_sample: SampleCallback,
                 nvml: ModuleType | None = None) -> None:
        super().__init__(config, on_sample)
        self.reader = NvmlReader(config.gpus, nvml=nvml)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="joulegate-nvml")
        self._executor_open = True

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        init_backoff = Backoff(0.5, 10.0)
        read_backoff = Backoff(max(0.05, self.interval_s), 5.0)
        failures = 0
        while True:
            if not self.reader.initialised:
                try:
                    await self._call(self.reader.init)
                    self._set_method(power_method(self.reader))
                    failures = 0
                    init_backoff.reset()
                except NvmlError as exc:
                    self._failed(str(exc))
                    await asyncio.sleep(init_backoff.next_s())
                    continue
            deadline_s = loop.time() + self.interval_s
            try:
                t_s, readings = await self._call(timed_read, self.reader)
            except NvmlError as exc:
                failures += 1
                self._failed(str(exc))
                if failures >= self.REINIT_AFTER_FAILURES:
                    await self._call(self.reader.shutdown)
                await asyncio.sleep(read_backoff.next_s())
                continue
            failures = 0
            read_backoff.reset()
            if not readings or (any(r.energy_mj is None for r in readings)
                                and any(r.power_w is None for r in readings)):
                self._failed("the selected GPUs report neither energy nor power")
            else:
                self._ok()
                self._emit_reads(t_s, gpu_reads(readings))
            # Absolute deadlines; after a stall, the next read comes at once, never a burst.
            await asyncio.sleep(max(0.0, deadline_s - loop.time()))

    async def _release(self) -> None:
        if self._executor_open:
            self._executor_open = False
            try:
                await asyncio.get_running_loop().run_in_executor(self._executor, self.reader.shutdown)
            finally:
                self._executor.shutdown(wait=False)
