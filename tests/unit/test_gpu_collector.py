"""GpuCollector against a fake NVML at the pynvml boundary.

The fake has pynvml's function names and constants and raises pynvml's own exception classes
(``pynvml.NVMLError(code)`` builds ``NVMLError_LibraryNotFound`` and friends), which import fine
without a driver; only the calls into libnvidia-ml are faked.
"""

# ruff: noqa: N802 - the fake mirrors pynvml's camelCase function names

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from capacity_agent.collectors.base import CollectorError
from capacity_agent.collectors.gpu import GpuCollector, cuda_cores_per_sm, tensor_cores_per_sm
from capacity_api.models import Substrate

pytestmark = pytest.mark.unit

GIB = 2**30
IDLE = pynvml.nvmlClocksEventReasonGpuIdle
POWER_CAP = pynvml.nvmlClocksEventReasonSwPowerCap
APP_CLOCKS = pynvml.nvmlClocksEventReasonApplicationsClocksSetting


@dataclass
class FakeDevice:
    name: str = "NVIDIA A100-SXM4-40GB"
    cc: tuple[int, int] = (8, 0)
    sms: int = 108
    cores: int = 6912
    sm_pct: int = 0
    mem_pct: int = 0
    used: int = 0
    total: int = 40 * GIB
    temp: int = 40
    slowdown: int = 90
    power_mw: int = 50_000
    limit_mw: int = 400_000
    reasons: int = IDLE
    errors: dict[str, int] = field(default_factory=dict)
    """Function name -> NVML error code that the call raises."""


class FakeNvml:
    """The pynvml functions GpuCollector uses, over a list of FakeDevice."""

    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
    NVML_TEMPERATURE_THRESHOLD_GPU_MAX = pynvml.NVML_TEMPERATURE_THRESHOLD_GPU_MAX
    NVML_ERROR_NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_FUNCTION_NOT_FOUND = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND

    def __init__(self, devices: list[FakeDevice], init_error: int | None = None) -> None:
        self.devices = devices
        self.init_error = init_error
        self.calls: list[str] = []

    def _call(self, name: str, handle: int | None = None) -> FakeDevice | None:
        self.calls.append(name)
        if handle is None:
            return None
        device = self.devices[handle]
        if name in device.errors:
            raise pynvml.NVMLError(device.errors[name])
        return device

    def _device(self, name: str, handle: int) -> FakeDevice:
        device = self._call(name, handle)
        assert device is not None
        return device

    def nvmlInit(self) -> None:
        self._call("nvmlInit")
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self._call("nvmlShutdown")

    def nvmlDeviceGetCount(self) -> int:
        self._call("nvmlDeviceGetCount")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._call("nvmlDeviceGetHandleByIndex", index)
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        return self._device("nvmlDeviceGetName", handle).name

    def nvmlDeviceGetCudaComputeCapability(self, handle: int) -> tuple[int, int]:
        return self._device("nvmlDeviceGetCudaComputeCapability", handle).cc

    def nvmlDeviceGetAttributes(self, handle: int) -> Any:
        device = self._device("nvmlDeviceGetAttributes", handle)
        return SimpleNamespace(multiprocessorCount=device.sms)

    def nvmlDeviceGetNumGpuCores(self, handle: int) -> int:
        return self._device("nvmlDeviceGetNumGpuCores", handle).cores

    def nvmlDeviceGetTemperatureThreshold(self, handle: int, threshold: int) -> int:
        device = self._device("nvmlDeviceGetTemperatureThreshold", handle)
        assert threshold in {
            pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN,
            pynvml.NVML_TEMPERATURE_THRESHOLD_GPU_MAX,
        }
        return device.slowdown

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        device = self._device("nvmlDeviceGetUtilizationRates", handle)
        return SimpleNamespace(gpu=device.sm_pct, memory=device.mem_pct)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        device = self._device("nvmlDeviceGetMemoryInfo", handle)
        return SimpleNamespace(
            used=device.used, total=device.total, free=device.total - device.used
        )

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._device("nvmlDeviceGetTemperature", handle).temp

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return self._device("nvmlDeviceGetPowerUsage", handle).power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: int) -> int:
        return self._device("nvmlDeviceGetEnforcedPowerLimit", handle).limit_mw

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: int) -> int:
        return self._device("nvmlDeviceGetCurrentClocksEventReasons", handle).reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: int) -> int:
        return self._device("nvmlDeviceGetCurrentClocksThrottleReasons", handle).reasons


class OldNvml(FakeNvml):
    """An older pynvml that only has the "Throttle" name."""

    def __getattribute__(self, name: str) -> Any:
        if name == "nvmlDeviceGetCurrentClocksEventReasons":
            raise AttributeError(name)
        return super().__getattribute__(name)


class NewNvml(FakeNvml):
    """A pynvml from after CUDA 14, where the "Throttle" name is gone."""

    def __getattribute__(self, name: str) -> Any:
        if name == "nvmlDeviceGetCurrentClocksThrottleReasons":
            raise AttributeError(name)
        return super().__getattribute__(name)


def clock() -> float:
    return 1_700_000_000.0


def two_devices() -> list[FakeDevice]:
    return [
        FakeDevice(sm_pct=50, mem_pct=20, used=8 * GIB, temp=60, power_mw=200_000, reasons=IDLE),
        FakeDevice(
            sm_pct=100, mem_pct=40, used=30 * GIB, temp=85, power_mw=390_000, reasons=POWER_CAP
        ),
    ]


def test_present_with_two_devices_describes_geometry_and_capacity() -> None:
    collector = GpuCollector(FakeNvml(two_devices()), clock=clock)

    assert collector.substrate is Substrate.GPU
    assert collector.present()
    geometry = collector.geometry()
    assert geometry is not None
    assert geometry.units == 2 * 108 * 4 * 32
    assert geometry.detail == {"sms": 216, "tensorCoresPerSm": 4, "warpSize": 32, "devices": 2}
    assert collector.capacity() == {"nvidia.com/gpu": "2"}


def test_sample_aggregates_devices_into_signals() -> None:
    collector = GpuCollector(FakeNvml(two_devices()), clock=clock)

    sample = collector.sample()

    assert sample.substrate is Substrate.GPU
    assert sample.time == clock()
    assert sample.signals["sm"] == pytest.approx(0.75)  # mean of 50 % and 100 %
    # memory: used/total over both devices (38/80) beats the mean controller load (30 %)
    assert sample.signals["memory"] == pytest.approx(38 / 80)
    assert sample.signals["power"] == pytest.approx(590 / 800)
    assert sample.signals["temperature"] == pytest.approx(85 / 90)  # the hottest device
    assert sample.signals["throttled"] == pytest.approx(0.5)  # gpu1 is power capped
    assert sample.load == pytest.approx(0.75)  # max(sm, memory)
    assert sample.raw["gpu1.temperature_c"] == 85
    assert sample.raw["gpu0.power_w"] == pytest.approx(200.0)
    assert sample.raw["gpu1.memory_used_bytes"] == 30 * GIB


def test_memory_signal_takes_the_controller_load_when_it_is_higher() -> None:
    nvml = FakeNvml([FakeDevice(sm_pct=10, mem_pct=90, used=1 * GIB)])

    sample = GpuCollector(nvml, clock=clock).sample()

    assert sample.signals["memory"] == pytest.approx(0.9)
    assert sample.load == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("reasons", "throttled"),
    [
        (IDLE, 0.0),
        (APP_CLOCKS, 0.0),  # a configuration, not a limit
        (pynvml.nvmlClocksEventReasonNone, 0.0),
        (POWER_CAP, 1.0),
        (pynvml.nvmlClocksEventReasonHwThermalSlowdown | IDLE, 1.0),
        (pynvml.nvmlClocksEventReasonSwThermalSlowdown, 1.0),
        (pynvml.nvmlClocksEventReasonHwSlowdown, 1.0),
    ],
)
def test_throttled_counts_only_limiting_reasons(reasons: int, throttled: float) -> None:
    sample = GpuCollector(FakeNvml([FakeDevice(reasons=reasons)]), clock=clock).sample()

    assert sample.signals["throttled"] == throttled


def test_values_beyond_limits_are_clamped_into_the_unit_interval() -> None:
    device = FakeDevice(temp=97, slowdown=90, power_mw=420_000, limit_mw=400_000, sm_pct=100)

    sample = GpuCollector(FakeNvml([device]), clock=clock).sample()

    assert sample.signals["temperature"] == 1.0
    assert sample.signals["power"] == 1.0
    assert sample.raw["gpu0.temperature_c"] == 97


@pytest.mark.parametrize(
    "code",
    [pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED],
    ids=["library-not-found", "driver-not-loaded"],
)
def test_no_driver_means_absent_logged_once_at_info(
    code: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="capacity_agent")
    nvml = FakeNvml(two_devices(), init_error=code)
    collector = GpuCollector(nvml, clock=clock)

    assert [collector.present() for _ in range(3)] == [False, False, False]
    assert collector.geometry() is None
    assert collector.capacity() == {}
    with pytest.raises(CollectorError, match="absent"):
        collector.sample()
    collector.close()

    records = [r for r in caplog.records if r.name.startswith("capacity_agent")]
    assert [r.levelno for r in records] == [logging.INFO]
    assert type(pynvml.NVMLError(code)).__name__ in records[0].getMessage()
    assert nvml.calls.count("nvmlInit") == 1
    assert "nvmlShutdown" not in nvml.calls  # never initialised, nothing to shut down


def test_zero_devices_means_absent_and_nvml_is_shut_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="capacity_agent")
    nvml = FakeNvml([])
    collector = GpuCollector(nvml, clock=clock)

    assert not collector.present()
    assert not collector.present()
    assert nvml.calls.count("nvmlShutdown") == 1
    records = [r for r in caplog.records if r.name.startswith("capacity_agent")]
    assert [r.levelno for r in records] == [logging.INFO]
    assert "no devices" in records[0].getMessage()


def test_a_device_failing_mid_sample_raises_collector_error_and_recovers() -> None:
    devices = two_devices()
    collector = GpuCollector(FakeNvml(devices), clock=clock)
    assert collector.present()
    collector.sample()

    devices[1].errors["nvmlDeviceGetUtilizationRates"] = pynvml.NVML_ERROR_GPU_IS_LOST
    with pytest.raises(CollectorError, match=r"gpu1: nvmlDeviceGetUtilizationRates.*GpuIsLost"):
        collector.sample()

    devices[1].errors.clear()
    assert collector.sample().signals["sm"] == pytest.approx(0.75)


@pytest.mark.parametrize(
    "call",
    [
        "nvmlDeviceGetMemoryInfo",
        "nvmlDeviceGetTemperature",
        "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetEnforcedPowerLimit",
        "nvmlDeviceGetCurrentClocksEventReasons",
    ],
)
def test_every_per_sample_call_failing_is_a_collector_error(call: str) -> None:
    devices = two_devices()
    collector = GpuCollector(FakeNvml(devices), clock=clock)
    assert collector.present()

    devices[0].errors[call] = pynvml.NVML_ERROR_UNKNOWN
    with pytest.raises(CollectorError, match="gpu0"):
        collector.sample()


def test_old_pynvml_uses_the_throttle_reasons_name() -> None:
    nvml = OldNvml([FakeDevice(reasons=POWER_CAP)])

    sample = GpuCollector(nvml, clock=clock).sample()

    assert sample.signals["throttled"] == 1.0
    assert "nvmlDeviceGetCurrentClocksThrottleReasons" in nvml.calls


def test_new_pynvml_uses_the_event_reasons_name() -> None:
    nvml = NewNvml([FakeDevice(reasons=POWER_CAP)])

    sample = GpuCollector(nvml, clock=clock).sample()

    assert sample.signals["throttled"] == 1.0
    assert "nvmlDeviceGetCurrentClocksEventReasons" in nvml.calls


def test_an_old_driver_without_the_event_function_falls_back_to_the_throttle_name() -> None:
    device = FakeDevice(reasons=POWER_CAP)
    device.errors["nvmlDeviceGetCurrentClocksEventReasons"] = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
    nvml = FakeNvml([device])

    sample = GpuCollector(nvml, clock=clock).sample()

    assert sample.signals["throttled"] == 1.0


def test_unsupported_metrics_are_left_out_not_zeroed() -> None:
    device = FakeDevice(sm_pct=30)
    device.errors |= {
        "nvmlDeviceGetPowerUsage": pynvml.NVML_ERROR_NOT_SUPPORTED,
        "nvmlDeviceGetTemperatureThreshold": pynvml.NVML_ERROR_NOT_SUPPORTED,
        "nvmlDeviceGetCurrentClocksEventReasons": pynvml.NVML_ERROR_NOT_SUPPORTED,
        "nvmlDeviceGetCurrentClocksThrottleReasons": pynvml.NVML_ERROR_NOT_SUPPORTED,
    }
    collector = GpuCollector(FakeNvml([device]), clock=clock)

    sample = collector.sample()

    assert "power" not in sample.signals
    assert "temperature" not in sample.signals
    assert sample.signals["throttled"] == 0.0  # no device can report a reason
    assert sample.signals["sm"] == pytest.approx(0.3)


def test_sm_count_falls_back_to_cuda_cores_when_attributes_are_not_supported() -> None:
    device = FakeDevice(cc=(8, 6), sms=999, cores=10_752)  # an RTX A6000: 84 SMs x 128 cores
    device.errors["nvmlDeviceGetAttributes"] = pynvml.NVML_ERROR_NOT_SUPPORTED

    geometry = GpuCollector(FakeNvml([device]), clock=clock).geometry()

    assert geometry is not None
    assert geometry.detail is not None
    assert geometry.detail["sms"] == 84
    assert geometry.units == 84 * 4 * 32


def test_pre_volta_gpus_have_no_tensor_cores_and_add_no_units() -> None:
    devices = [
        FakeDevice(name="Tesla V100", cc=(7, 0), sms=80),
        FakeDevice(name="Tesla P4", cc=(6, 1), sms=20),
    ]

    collector = GpuCollector(FakeNvml(devices), clock=clock)
    geometry = collector.geometry()

    assert geometry is not None
    assert geometry.units == 80 * 4 * 32  # the P4 contributes SMs, not tensor-core units
    assert geometry.detail == {"sms": 100, "tensorCoresPerSm": 0, "warpSize": 32, "devices": 2}
    assert collector.capacity() == {"nvidia.com/gpu": "2"}


def test_a_device_that_cannot_be_described_makes_the_substrate_absent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    device = FakeDevice()
    device.errors["nvmlDeviceGetCudaComputeCapability"] = pynvml.NVML_ERROR_GPU_IS_LOST
    nvml = FakeNvml([device])

    assert not GpuCollector(nvml, clock=clock).present()
    assert "nvmlShutdown" in nvml.calls
    assert any("GpuIsLost" in r.getMessage() for r in caplog.records)


def test_close_shuts_nvml_down_once() -> None:
    nvml = FakeNvml(two_devices())
    collector = GpuCollector(nvml, clock=clock)
    assert collector.present()

    collector.close()
    collector.close()

    assert nvml.calls.count("nvmlShutdown") == 1


@pytest.mark.parametrize(
    ("cc", "tensor", "cores"),
    [
        ((3, 7), 0, 192),
        ((6, 0), 0, 64),
        ((6, 1), 0, 128),
        ((7, 0), 4, 64),
        ((7, 5), 4, 64),
        ((8, 0), 4, 64),
        ((8, 9), 4, 128),
        ((9, 0), 4, 128),
        ((1, 0), 0, None),
    ],
)
def test_per_sm_tables(cc: tuple[int, int], tensor: int, cores: int | None) -> None:
    assert tensor_cores_per_sm(cc) == tensor
    assert cuda_cores_per_sm(cc) == cores


def test_the_real_pynvml_without_a_driver_is_absent_not_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The real module, lazily imported: on a machine without NVIDIA's library it is absent."""
    caplog.set_level(logging.DEBUG, logger="capacity_agent")
    collector = GpuCollector(clock=clock)
    try:
        present = collector.present()
        if present:  # pragma: no cover - only on a machine with a GPU
            assert collector.sample().substrate is Substrate.GPU
            return
        assert not collector.present()
        with pytest.raises(CollectorError):
            collector.sample()
    finally:
        collector.close()
    records = [r for r in caplog.records if r.name.startswith("capacity_agent")]
    assert len(records) == 1
    assert records[0].levelno == logging.INFO
