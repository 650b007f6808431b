"""The GPU substrate, read through NVML (``pynvml`` from the ``nvidia-ml-py`` distribution).

The NVML module is injected (``GpuCollector(nvml=...)``), so unit tests put a fake at the pynvml
boundary; by default ``pynvml`` is imported lazily on first use, so importing this module never
needs the NVIDIA driver.

Presence: ``nvmlInit`` failing (no ``libnvidia-ml.so.1``: ``NVMLError_LibraryNotFound``; no kernel
driver: ``NVMLError_DriverNotLoaded``; any other init error) or zero devices means the substrate
is absent. That is logged once, at info, and is never an error. (A device that NVML lists but
cannot describe at start makes the substrate absent too, logged once as a warning.) The result
is cached: a collector probes once; build a new one to probe again.

Geometry: ``units = sum over devices of SMs x tensor cores per SM x warp size``. SMs come from
``nvmlDeviceGetAttributes().multiprocessorCount``; when that is not supported they are derived from
``nvmlDeviceGetNumGpuCores`` (CUDA cores) and the CUDA cores per SM of the compute capability.
Tensor cores per SM are 4 for compute capability 7.0 (Volta) and later, and 0 before it: a
pre-Volta GPU has no tensor cores, contributes 0 units to the geometry (its SMs are still counted
in ``detail.sms``) and 1 to the ``nvidia.com/gpu`` capacity. The warp size is 32. ``detail``
holds ``sms`` (all devices), ``tensorCoresPerSm`` (the common value, or the smallest one when the
devices differ; ``units`` is always the exact per-device sum), ``warpSize`` and ``devices``.

Signals, all in [0, 1], one sample over every device:

``sm``
    mean SM utilisation (``nvmlDeviceGetUtilizationRates().gpu``): the node's GPUs are one
    capacity pool, so one busy GPU out of two is half the substrate.
``memory``
    the larger of memory used over total (summed over devices) and the mean memory-controller
    utilisation (``nvmlDeviceGetUtilizationRates().memory``).
``power``
    power drawn over the enforced power limit, summed over devices (devices that do not report
    power are left out; the signal is absent when none does).
``temperature``
    the hottest device's GPU temperature over its slowdown threshold (``NVML_TEMPERATURE_GPU`` vs
    ``NVML_TEMPERATURE_THRESHOLD_SLOWDOWN``, falling back to ``..._GPU_MAX``); absent when no device
    reports a threshold.
``throttled``
    the fraction of devices whose clocks are currently held down by a limit: power cap, hardware
    slowdown, software or hardware thermal slowdown, power brake, board limit or reliability.
    ``GpuIdle`` and the reasons that are configuration, not pressure (applications clocks setting,
    display clock setting, sync boost), do not count.

``load = max(sm, memory)``. Values in natural units (percent, bytes, degrees C, watts, reason
bit masks) are kept per device in ``raw`` as ``gpu<i>.<name>``.

A device call that fails during a sample raises :class:`CollectorError` naming the device and the
call (the agent counts it and marks the substrate stale); it never crashes the agent and never
reads as zero load. Metrics a device does not support (``NVMLError_NotSupported`` when the
collector starts) are left out for that device from then on.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from capacity_agent.collectors.base import Collector, CollectorError, Sample
from capacity_api.models import Geometry, Substrate

log = logging.getLogger(__name__)

WARP_SIZE = 32
"""Threads per warp on every NVIDIA architecture so far."""
TENSOR_CORES_PER_SM_VOLTA_AND_LATER = 4
"""Tensor cores per SM from compute capability 7.0 (Volta) on; 0 before."""

# CUDA cores per SM by compute capability, to derive SMs from nvmlDeviceGetNumGpuCores when the
# device attributes are not supported. Keys are (major, minor); a (major, None) entry covers every
# minor version of that major.
_CORES_PER_SM: dict[tuple[int, int | None], int] = {
    (3, None): 192,  # Kepler
    (5, None): 128,  # Maxwell
    (6, 0): 64,  # Pascal GP100
    (6, None): 128,  # other Pascal
    (7, None): 64,  # Volta, Turing
    (8, 0): 64,  # Ampere GA100
    (8, None): 128,  # other Ampere, Ada
    (9, None): 128,  # Hopper
    (10, None): 128,  # Blackwell
    (12, None): 128,  # Blackwell (consumer)
}

# Clock event (throttle) reason bits, as in nvml.h; they are the same under the old "Throttle"
# and the new "Event" names. Only the ones that mean a limit holds the clocks down count.
_REASON_SW_POWER_CAP = 0x04
_REASON_HW_SLOWDOWN = 0x08
_REASON_SW_THERMAL = 0x20
_REASON_HW_THERMAL = 0x40
_REASON_HW_POWER_BRAKE = 0x80
_REASON_BOARD_LIMIT = 0x200
_REASON_RELIABILITY = 0x400
THROTTLING_REASONS = (
    _REASON_SW_POWER_CAP
    | _REASON_HW_SLOWDOWN
    | _REASON_SW_THERMAL
    | _REASON_HW_THERMAL
    | _REASON_HW_POWER_BRAKE
    | _REASON_BOARD_LIMIT
    | _REASON_RELIABILITY
)
"""Reason bits that count as throttled; GpuIdle, applications/display clocks and sync boost
do not."""

_REASON_FUNCTIONS = (
    "nvmlDeviceGetCurrentClocksEventReasons",  # NVML 12.x and later
    "nvmlDeviceGetCurrentClocksThrottleReasons",  # the older name, removed in CUDA 14
)


@dataclass(slots=True)
class _Device:
    index: int
    handle: Any
    name: str
    compute_capability: tuple[int, int]
    sms: int
    tensor_cores_per_sm: int
    slowdown_c: float | None
    power: bool = True
    reasons: Callable[[Any], int] | None = None
    skipped: list[str] = field(default_factory=list)

    @property
    def units(self) -> int:
        return self.sms * self.tensor_cores_per_sm * WARP_SIZE


@dataclass(frozen=True, slots=True)
class _Reading:
    """One device's values in natural units."""

    sm_pct: float
    mem_pct: float
    used: float
    total: float
    temp_c: float
    power_mw: float | None
    limit_mw: float | None
    reasons: int | None

    def raw(self, prefix: str, slowdown_c: float | None) -> dict[str, float]:
        values = {
            f"{prefix}.sm_percent": self.sm_pct,
            f"{prefix}.memory_util_percent": self.mem_pct,
            f"{prefix}.memory_used_bytes": self.used,
            f"{prefix}.memory_total_bytes": self.total,
            f"{prefix}.temperature_c": self.temp_c,
        }
        if slowdown_c is not None:
            values[f"{prefix}.slowdown_c"] = slowdown_c
        if self.power_mw is not None and self.limit_mw is not None:
            values[f"{prefix}.power_w"] = self.power_mw / 1000.0
            values[f"{prefix}.power_limit_w"] = self.limit_mw / 1000.0
        if self.reasons is not None:
            values[f"{prefix}.clock_event_reasons"] = float(self.reasons)
        return values


def tensor_cores_per_sm(compute_capability: tuple[int, int]) -> int:
    """4 from Volta (7.0) on, 0 before: pre-Volta GPUs have no tensor cores."""
    return TENSOR_CORES_PER_SM_VOLTA_AND_LATER if compute_capability >= (7, 0) else 0


def cuda_cores_per_sm(compute_capability: tuple[int, int]) -> int | None:
    """CUDA cores per SM of a compute capability, or None when it is not known."""
    major, minor = compute_capability
    return _CORES_PER_SM.get((major, minor), _CORES_PER_SM.get((major, None)))


def _unit(value: float) -> float:
    return min(1.0, max(0.0, value))


class GpuCollector(Collector):
    """NVIDIA GPUs of this node through NVML.

    ``nvml`` is the pynvml module or a stand-in with the same functions, constants and
    ``NVMLError`` class; ``None`` imports ``pynvml`` on first use. ``clock`` gives the sample time.
    """

    substrate = Substrate.GPU

    def __init__(self, nvml: Any = None, *, clock: Callable[[], float] = time.time) -> None:
        self._nvml: Any = nvml
        self._clock = clock
        self._probed = False
        self._initialised = False
        self._devices: list[_Device] = []

    # -- presence ----------------------------------------------------------------------------

    def present(self) -> bool:
        if not self._probed:
            self._probed = True
            self._probe()
        return bool(self._devices)

    def _probe(self) -> None:
        nvml = self._nvml
        if nvml is None:
            try:
                nvml = importlib.import_module("pynvml")
            except ImportError as exc:
                log.info("gpu substrate absent: pynvml is not installed (%s)", exc)
                return
            self._nvml = nvml
        error: type[BaseException] = getattr(nvml, "NVMLError", Exception)
        try:
            nvml.nvmlInit()
        except error as exc:
            log.info("gpu substrate absent: nvmlInit failed: %s", self._describe(exc))
            return
        self._initialised = True
        try:
            count = int(nvml.nvmlDeviceGetCount())
            devices = [self._open(index) for index in range(count)]
        except error as exc:
            # NVML works but a device cannot even be described: absent, and worth a warning.
            log.warning("gpu substrate absent: reading devices failed: %s", self._describe(exc))
            self._shutdown()
            return
        if not devices:
            log.info("gpu substrate absent: NVML reports no devices")
            self._shutdown()
            return
        self._devices = devices
        for device in devices:
            log.info(
                "gpu%d: %s, compute capability %d.%d, %d SMs, %d tensor cores/SM%s",
                device.index,
                device.name,
                *device.compute_capability,
                device.sms,
                device.tensor_cores_per_sm,
                f" (not supported: {', '.join(device.skipped)})" if device.skipped else "",
            )

    def _describe(self, exc: BaseException) -> str:
        """The NVML error with its class name (NVMLError_LibraryNotFound, ...)."""
        return f"{type(exc).__name__}: {exc}"

    def _not_supported(self, exc: BaseException) -> bool:
        nvml = self._nvml
        codes = {
            getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", 3),
            getattr(nvml, "NVML_ERROR_FUNCTION_NOT_FOUND", 13),
        }
        return getattr(exc, "value", None) in codes

    def _open(self, index: int) -> _Device:
        """Static facts of one device; optional features that are not supported are skipped."""
        nvml = self._nvml
        error: type[BaseException] = nvml.NVMLError
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        name = nvml.nvmlDeviceGetName(handle)
        if isinstance(name, bytes):  # very old pynvml releases return bytes
            name = name.decode(errors="replace")
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        cc = (int(major), int(minor))
        skipped: list[str] = []
        sms = self._sm_count(handle, cc, skipped)
        slowdown = self._slowdown_threshold(handle)
        if slowdown is None:
            skipped.append("temperature threshold")
        device = _Device(index, handle, str(name), cc, sms, tensor_cores_per_sm(cc), slowdown)
        device.skipped = skipped
        try:
            nvml.nvmlDeviceGetPowerUsage(handle)
            nvml.nvmlDeviceGetEnforcedPowerLimit(handle)
        except error as exc:
            if not self._not_supported(exc):
                raise
            device.power = False
            skipped.append("power")
        device.reasons = self._reasons_function(handle)
        if device.reasons is None:
            skipped.append("clock event reasons")
        return device

    def _slowdown_threshold(self, handle: Any) -> float | None:
        """The slowdown temperature (or the GPU max one), or None when neither is supported."""
        nvml = self._nvml
        for name in ("NVML_TEMPERATURE_THRESHOLD_SLOWDOWN", "NVML_TEMPERATURE_THRESHOLD_GPU_MAX"):
            try:
                value = float(nvml.nvmlDeviceGetTemperatureThreshold(handle, getattr(nvml, name)))
            except nvml.NVMLError as exc:
                if not self._not_supported(exc):
                    raise
                continue
            if value > 0:
                return value
        return None

    def _reasons_function(self, handle: Any) -> Callable[[Any], int] | None:
        """The clock event reasons call this pynvml and driver support (new name first)."""
        for function in _REASON_FUNCTIONS:
            call: Callable[[Any], int] | None = getattr(self._nvml, function, None)
            if call is None:
                continue
            try:
                call(handle)
            except self._nvml.NVMLError as exc:
                if not self._not_supported(exc):
                    raise
                continue
            return call
        return None

    def _sm_count(self, handle: Any, cc: tuple[int, int], skipped: list[str]) -> int:
        nvml = self._nvml
        error: type[BaseException] = nvml.NVMLError
        get_attributes = getattr(nvml, "nvmlDeviceGetAttributes", None)
        if get_attributes is not None:
            try:
                return int(get_attributes(handle).multiprocessorCount)
            except error as exc:
                if not self._not_supported(exc):
                    raise
        get_cores = getattr(nvml, "nvmlDeviceGetNumGpuCores", None)
        per_sm = cuda_cores_per_sm(cc)
        if get_cores is not None and per_sm:
            try:
                return int(get_cores(handle)) // per_sm
            except error as exc:
                if not self._not_supported(exc):
                    raise
        skipped.append("SM count")
        return 0

    # -- description -------------------------------------------------------------------------

    def geometry(self) -> Geometry | None:
        if not self.present():
            return None
        per_sm = {device.tensor_cores_per_sm for device in self._devices}
        return Geometry(
            units=sum(device.units for device in self._devices),
            detail={
                "sms": sum(device.sms for device in self._devices),
                "tensorCoresPerSm": min(per_sm),
                "warpSize": WARP_SIZE,
                "devices": len(self._devices),
            },
        )

    def capacity(self) -> dict[str, str]:
        if not self.present():
            return {}
        return {"nvidia.com/gpu": str(len(self._devices))}

    # -- sampling ----------------------------------------------------------------------------

    def _read(self, device: _Device) -> _Reading:
        """One device's readings; an NVML error becomes a CollectorError naming the call."""
        nvml = self._nvml
        handle = device.handle
        call = "nvmlDeviceGetUtilizationRates"
        try:
            rates = nvml.nvmlDeviceGetUtilizationRates(handle)
            call = "nvmlDeviceGetMemoryInfo"
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            call = "nvmlDeviceGetTemperature"
            temp_c = float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
            power_mw = limit_mw = None
            if device.power:
                call = "nvmlDeviceGetPowerUsage"
                power_mw = float(nvml.nvmlDeviceGetPowerUsage(handle))
                call = "nvmlDeviceGetEnforcedPowerLimit"
                limit_mw = float(nvml.nvmlDeviceGetEnforcedPowerLimit(handle))
            reasons = None
            if device.reasons is not None:
                call = "clock event reasons"
                reasons = int(device.reasons(handle))
        except nvml.NVMLError as exc:
            raise CollectorError(
                f"gpu{device.index}: {call} failed: {self._describe(exc)}"
            ) from exc
        reading = _Reading(
            sm_pct=float(rates.gpu),
            mem_pct=float(rates.memory),
            used=float(memory.used),
            total=float(memory.total),
            temp_c=temp_c,
            power_mw=power_mw,
            limit_mw=limit_mw,
            reasons=reasons,
        )
        if reading.total <= 0:
            raise CollectorError(
                f"gpu{device.index}: nvmlDeviceGetMemoryInfo reports {reading.total} bytes total"
            )
        return reading

    def sample(self) -> Sample:
        if not self.present():
            raise CollectorError("gpu: substrate absent (no NVML library, driver or device)")
        readings = [(device, self._read(device)) for device in self._devices]
        raw: dict[str, float] = {}
        for device, reading in readings:
            raw |= reading.raw(f"gpu{device.index}", device.slowdown_c)
        n = len(readings)
        sm = _unit(sum(r.sm_pct for _, r in readings) / n / 100.0)
        memory = _unit(
            max(
                sum(r.used for _, r in readings) / sum(r.total for _, r in readings),
                sum(r.mem_pct for _, r in readings) / n / 100.0,
            )
        )
        throttled = sum(1 for _, r in readings if (r.reasons or 0) & THROTTLING_REASONS)
        signals = {"sm": sm, "memory": memory, "throttled": throttled / n}
        powered = [r for _, r in readings if r.power_mw is not None and (r.limit_mw or 0) > 0]
        if powered:
            used_mw = sum(r.power_mw or 0.0 for r in powered)
            signals["power"] = _unit(used_mw / sum(r.limit_mw or 0.0 for r in powered))
        temperatures = [r.temp_c / d.slowdown_c for d, r in readings if d.slowdown_c is not None]
        if temperatures:
            signals["temperature"] = _unit(max(temperatures))
        return Sample(
            substrate=self.substrate,
            time=self._clock(),
            load=max(sm, memory),
            signals=signals,
            raw=raw,
        )

    def close(self) -> None:
        self._shutdown()
        self._devices = []

    def _shutdown(self) -> None:
        if not self._initialised:
            return
        self._initialised = False
        error: type[BaseException] = getattr(self._nvml, "NVMLError", Exception)
        try:
            self._nvml.nvmlShutdown()
        except error as exc:
            log.debug("nvmlShutdown failed: %s", exc)
