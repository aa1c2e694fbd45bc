"""A fake `pynvml` (nvidia-ml-py) for tests: the API surface JouleGate uses, answering from a script.

Load it in place of the real module: PYTHONPATH=tests/fake_nvml for a child process, or put it
in sys.modules["pynvml"] in-process. The script is JSON, from the file named by the environment
variable JOULEGATE_FAKE_NVML (read at each nvmlInit) or given directly with `fake_load(dict)`:

    {"init_error": null,                     # or an NVML_ERROR_* name, e.g. "DRIVER_NOT_LOADED"
     "gpus": [{"uuid": "GPU-...", "name": "NVIDIA H100 80GB HBM3",
               "power_w": 250.0,             # or {"mean_w": 250, "amp_w": 50, "period_s": 1.0}
                                             # or {"steps": [[0, 100], [2.5, 300]]} (s since init, W)
               "energy_counter": true,       # nvmlDeviceGetTotalEnergyConsumption supported
               "power_instant": true,        # NVML_FI_DEV_POWER_INSTANT supported
               "power_average": true,        # nvmlDeviceGetPowerUsage supported
               "energy_start_mj": 1000000,   # the counter's value at init
               "power_limit_w": 700.0,       # nvmlDeviceGetEnforcedPowerLimit (absent: NOT_SUPPORTED)
               "counter_update_s": 0.0}]}    # >0: the counter only moves every so many s

Without a script nvmlInit fails as on a host without a driver. Energy is the exact integral of
the scripted power since nvmlInit, on the monotonic clock. `fake_fail(index, n)` makes the next
n reads of that GPU raise NVMLError(NVML_ERROR_GPU_IS_LOST). `fake_counter_restart(index, to_mj)`
restarts a GPU's counter at `to_mj` (a driver reload); `fake_glitch(index, add_mj, n)` adds
`add_mj` to that GPU's next n counter reads only (a bad read).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from typing import Any

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999

NVML_VALUE_TYPE_DOUBLE = 0
NVML_VALUE_TYPE_UNSIGNED_INT = 1
NVML_VALUE_TYPE_UNSIGNED_LONG = 2
NVML_VALUE_TYPE_UNSIGNED_LONG_LONG = 3
NVML_VALUE_TYPE_SIGNED_LONG_LONG = 4
NVML_VALUE_TYPE_SIGNED_INT = 5
NVML_VALUE_TYPE_UNSIGNED_SHORT = 6

NVML_FI_DEV_POWER_INSTANT = 186

_STRINGS = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    """As in pynvml: `.value` is the NVML_ERROR_* code; str() its description."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _STRINGS.get(self.value, f"NVML Error with code {self.value}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NVMLError) and self.value == other.value

    __hash__ = Exception.__hash__


class c_nvmlValue_t:  # noqa: N801 - the real name
    def __init__(self) -> None:
        self.dVal = 0.0
        self.uiVal = self.ulVal = self.ullVal = self.sllVal = self.siVal = self.usVal = 0


class c_nvmlFieldValue_t:  # noqa: N801 - the real name
    def __init__(self, field_id: int) -> None:
        self.fieldId = field_id
        self.scopeId = 0
        self.timestamp = 0
        self.latencyUsec = 0
        self.valueType = NVML_VALUE_TYPE_UNSIGNED_INT
        self.nvmlReturn = NVML_SUCCESS
        self.value = c_nvmlValue_t()


class _Handle:
    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"<fake nvmlDevice {self.index}>"


_lock = threading.Lock()
_script: dict[str, Any] | None = None
_init_count = 0
_t0_mono = 0.0
_failures: dict[int, int] = {}
_shift_mj: dict[int, int] = {}  # added to a GPU's counter from a restart on
_glitches: dict[int, tuple[int, int]] = {}  # index -> (mJ added, reads left)
calls: dict[str, int] = {}


def fake_load(script: dict[str, Any] | None) -> None:
    """Use this script (instead of the JOULEGATE_FAKE_NVML file) from the next nvmlInit on."""
    global _script
    _script = script


def fake_fail(index: int, reads: int) -> None:
    """The next `reads` reads of GPU `index` raise NVMLError(NVML_ERROR_GPU_IS_LOST)."""
    with _lock:
        _failures[index] = reads


def fake_counter_restart(index: int, to_mj: int = 0) -> None:
    """GPU `index`'s counter reads `to_mj` now and counts on from there (a driver reload)."""
    with _lock:
        _shift_mj[index] = 0
        gpu = _active.get("gpus", [])[index]
    raw_mj = _counter_mj(gpu, index)
    with _lock:
        _shift_mj[index] = to_mj - raw_mj


def fake_glitch(index: int, add_mj: int, reads: int = 1) -> None:
    """The next `reads` counter reads of GPU `index` are `add_mj` too high (a bad read)."""
    with _lock:
        _glitches[index] = (add_mj, reads)


def fake_reset() -> None:
    """Forget the script, injected failures and init count (between in-process tests)."""
    global _script, _init_count
    with _lock:
        _script = None
        _init_count = 0
        _failures.clear()
        _shift_mj.clear()
        _glitches.clear()
        calls.clear()
        set_calls.clear()


def _count(name: str) -> None:
    calls[name] = calls.get(name, 0) + 1


def _load_script() -> dict[str, Any] | None:
    if _script is not None:
        return _script
    path = os.environ.get("JOULEGATE_FAKE_NVML")
    if not path:
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


_active: dict[str, Any] = {}


def nvmlInit() -> None:  # noqa: N802 - the real name
    global _init_count, _t0_mono, _active
    _count("nvmlInit")
    with _lock:
        script = _load_script()
        if script is None:
            raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
        if script.get("init_error"):
            raise NVMLError(globals()[f"NVML_ERROR_{script['init_error']}"])
        if _init_count == 0:
            _active = script
            _t0_mono = time.monotonic()
        _init_count += 1


def nvmlShutdown() -> None:  # noqa: N802
    global _init_count
    _count("nvmlShutdown")
    with _lock:
        if _init_count == 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        _init_count -= 1


def _gpus() -> list[dict[str, Any]]:
    if _init_count == 0:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    return _active.get("gpus", [])


def _gpu(handle: _Handle) -> dict[str, Any]:
    gpus = _gpus()
    if not isinstance(handle, _Handle) or not 0 <= handle.index < len(gpus):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return gpus[handle.index]


def _maybe_fail(handle: _Handle) -> None:
    with _lock:
        left = _failures.get(handle.index, 0)
        if left > 0:
            _failures[handle.index] = left - 1
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)


def _elapsed_s() -> float:
    return time.monotonic() - _t0_mono


def power_w_at(gpu: dict[str, Any], t_s: float) -> float:
    """The scripted power of `gpu` at t_s seconds after init, W."""
    spec = gpu.get("power_w", 100.0)
    if isinstance(spec, int | float):
        return float(spec)
    if "steps" in spec:
        watts = 0.0
        for start_s, w in spec["steps"]:
            if t_s >= start_s:
                watts = float(w)
        return watts
    period_s = float(spec["period_s"])
    return float(spec["mean_w"]) + float(spec["amp_w"]) * math.sin(2 * math.pi * t_s / period_s)


def energy_j_until(gpu: dict[str, Any], t_s: float) -> float:
    """The exact integral of the scripted power from init to t_s, J."""
    spec = gpu.get("power_w", 100.0)
    if isinstance(spec, int | float):
        return float(spec) * t_s
    if "steps" in spec:
        total, steps = 0.0, [(float(a), float(w)) for a, w in spec["steps"]]
        for i, (start_s, w) in enumerate(steps):
            end_s = steps[i + 1][0] if i + 1 < len(steps) else math.inf
            if t_s > start_s:
                total += w * (min(t_s, end_s) - start_s)
        return total
    period_s, mean_w, amp_w = float(spec["period_s"]), float(spec["mean_w"]), float(spec["amp_w"])
    return mean_w * t_s + amp_w * period_s / (2 * math.pi) * (1 - math.cos(2 * math.pi * t_s / period_s))


def nvmlDeviceGetCount() -> int:  # noqa: N802
    _count("nvmlDeviceGetCount")
    return len(_gpus())


def nvmlDeviceGetHandleByIndex(index: int) -> _Handle:  # noqa: N802
    _count("nvmlDeviceGetHandleByIndex")
    if not 0 <= int(index) < len(_gpus()):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return _Handle(int(index))


def nvmlDeviceGetHandleByUUID(uuid: str | bytes) -> _Handle:  # noqa: N802
    _count("nvmlDeviceGetHandleByUUID")
    want = uuid.decode() if isinstance(uuid, bytes) else uuid
    for i, gpu in enumerate(_gpus()):
        if gpu["uuid"] == want:
            return _Handle(i)
    raise NVMLError(NVML_ERROR_NOT_FOUND)


def nvmlDeviceGetIndex(handle: _Handle) -> int:  # noqa: N802
    _gpu(handle)
    return handle.index


def nvmlDeviceGetUUID(handle: _Handle) -> str:  # noqa: N802
    return str(_gpu(handle)["uuid"])


def nvmlDeviceGetName(handle: _Handle) -> str:  # noqa: N802
    return str(_gpu(handle).get("name", "NVIDIA H100 80GB HBM3"))


def nvmlDeviceGetTotalEnergyConsumption(handle: _Handle) -> int:  # noqa: N802
    """mJ since init (plus energy_start_mj), as the driver's counter."""
    _count("nvmlDeviceGetTotalEnergyConsumption")
    gpu = _gpu(handle)
    if not gpu.get("energy_counter", True):
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    _maybe_fail(handle)
    value_mj = _counter_mj(gpu, handle.index)
    with _lock:
        add_mj, left = _glitches.get(handle.index, (0, 0))
        if left > 0:
            _glitches[handle.index] = (add_mj, left - 1)
            value_mj += add_mj
    return value_mj


def _counter_mj(gpu: dict[str, Any], index: int) -> int:
    t_s = _elapsed_s()
    update_s = float(gpu.get("counter_update_s", 0.0))
    if update_s > 0:
        t_s = math.floor(t_s / update_s) * update_s
    return (int(gpu.get("energy_start_mj", 0)) + int(energy_j_until(gpu, t_s) * 1000.0)
            + _shift_mj.get(index, 0))


def nvmlDeviceGetEnforcedPowerLimit(handle: _Handle) -> int:  # noqa: N802
    """mW, from the script's power_limit_w; NOT_SUPPORTED without it."""
    _count("nvmlDeviceGetEnforcedPowerLimit")
    gpu = _gpu(handle)
    if gpu.get("power_limit_w") is None:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return int(round(float(gpu["power_limit_w"]) * 1000.0))


def nvmlDeviceGetFieldValues(handle: _Handle, fieldIds: list[Any]) -> list[c_nvmlFieldValue_t]:  # noqa: N802, N803
    _count("nvmlDeviceGetFieldValues")
    gpu = _gpu(handle)
    _maybe_fail(handle)
    out = []
    for field_id in fieldIds:
        fid = field_id[0] if isinstance(field_id, tuple) else field_id
        value = c_nvmlFieldValue_t(fid)
        value.timestamp = int(time.time() * 1e6)
        if fid == NVML_FI_DEV_POWER_INSTANT and gpu.get("power_instant", True):
            value.valueType = NVML_VALUE_TYPE_UNSIGNED_INT
            value.value.uiVal = int(round(power_w_at(gpu, _elapsed_s()) * 1000.0))
        else:
            value.nvmlReturn = NVML_ERROR_NOT_SUPPORTED
        out.append(value)
    return out


def nvmlDeviceGetPowerUsage(handle: _Handle) -> int:  # noqa: N802
    """mW; the real one is a 1 s average on Ampere and newer: here the mean over the last 1 s."""
    _count("nvmlDeviceGetPowerUsage")
    gpu = _gpu(handle)
    if not gpu.get("power_average", True):
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    _maybe_fail(handle)
    t_s = _elapsed_s()
    start_s = max(0.0, t_s - 1.0)
    if t_s - start_s <= 0:
        return int(round(power_w_at(gpu, t_s) * 1000.0))
    avg_w = (energy_j_until(gpu, t_s) - energy_j_until(gpu, start_s)) / (t_s - start_s)
    return int(round(avg_w * 1000.0))


# -- power management limits: the script's "power_limit_w" is the current (enforced) limit, and
# "min_limit_w" / "max_limit_w" / "default_limit_w" its range (defaults 100 W, 1.0x and 1.0x it).

def _limit_range_mw(gpu: dict[str, Any]) -> tuple[int, int, int]:
    if gpu.get("power_limit_w") is None:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    default_w = float(gpu.get("default_limit_w", gpu["power_limit_w"]))
    return (int(round(float(gpu.get("min_limit_w", 100.0)) * 1000.0)),
            int(round(float(gpu.get("max_limit_w", default_w)) * 1000.0)), int(round(default_w * 1000.0)))


def nvmlDeviceGetPowerManagementLimit(handle: _Handle) -> int:  # noqa: N802
    """mW: the limit set (the enforced one, here)."""
    _count("nvmlDeviceGetPowerManagementLimit")
    return nvmlDeviceGetEnforcedPowerLimit(handle)


def nvmlDeviceGetPowerManagementLimitConstraints(handle: _Handle) -> list[int]:  # noqa: N802
    """[min mW, max mW], as the real binding returns them."""
    _count("nvmlDeviceGetPowerManagementLimitConstraints")
    min_mw, max_mw, _ = _limit_range_mw(_gpu(handle))
    return [min_mw, max_mw]


def nvmlDeviceGetPowerManagementDefaultLimit(handle: _Handle) -> int:  # noqa: N802
    _count("nvmlDeviceGetPowerManagementDefaultLimit")
    return _limit_range_mw(_gpu(handle))[2]


def nvmlDeviceSetPowerManagementLimit(handle: _Handle, limit: int) -> None:  # noqa: N802
    """mW; INVALID_ARGUMENT outside the constraints (as the driver), NO_PERMISSION if the script
    says "set_permission": false. Every call is logged in `set_calls` as (index, mW)."""
    _count("nvmlDeviceSetPowerManagementLimit")
    gpu = _gpu(handle)
    min_mw, max_mw, _ = _limit_range_mw(gpu)
    if not gpu.get("set_permission", True):
        raise NVMLError(NVML_ERROR_NO_PERMISSION)
    if not min_mw <= int(limit) <= max_mw:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    with _lock:
        gpu["power_limit_w"] = int(limit) / 1000.0
        set_calls.append((handle.index, int(limit)))


set_calls: list[tuple[int, int]] = []
