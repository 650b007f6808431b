"""The thermal substrate: temperatures against their critical points, from sysfs.

Sensors: ``<sys>/class/thermal/thermal_zone*/temp`` with the lowest trip point of type
``critical`` (``trip_point_N_type`` / ``trip_point_N_temp``), and
``<sys>/class/hwmon/hwmon*/temp*_input`` with the matching ``temp*_crit``. Values are millidegrees
Celsius. A sensor without a positive critical temperature is not measured (there is nothing to
compare it with), and the substrate is absent when no sensor has one.

Signals: one per sensor, named ``thermal_zone0`` or ``hwmon1_temp2``, temp / crit clamped to
[0, 1]. The load is their maximum. Readings are instantaneous, so there is no priming.

A sensor whose temperature cannot be read this time (EIO, ENODATA, garbage: common with ACPI zones)
is left out of the sample and counted in :attr:`ThermalCollector.warnings` and
``raw["unreadable"]``; when no sensor can be read the sample fails with CollectorError, never
reading as zero.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from capacity_agent.collectors.base import Collector, CollectorError, Sample
from capacity_agent.collectors.paths import HostPaths
from capacity_agent.collectors.procfs import (
    is_dir,
    parse_int,
    path_exists,
    read_optional,
    read_text,
)
from capacity_api.models import Substrate

__all__ = ["Sensor", "ThermalCollector"]

log = logging.getLogger(__name__)

_TRIP_TYPE = re.compile(r"^trip_point_(\d+)_type$")
_HWMON_INPUT = re.compile(r"^temp(\d+)_input$")


@dataclass(frozen=True, slots=True)
class Sensor:
    """A temperature file and its critical temperature."""

    name: str
    temp_path: Path
    crit_millicelsius: int


def _read_millicelsius(path: Path) -> int | None:
    """A millidegree value, or None when absent or unusable (sensor discovery never raises)."""
    try:
        text = read_optional(path)
        return None if text is None else parse_int(text, str(path), minimum=None)
    except CollectorError:
        return None


class ThermalCollector(Collector):
    """Temperatures over critical temperatures (see the module docstring)."""

    substrate = Substrate.THERMAL

    def __init__(
        self,
        paths: HostPaths | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.paths = paths or HostPaths()
        self.clock = clock
        self.warnings: Counter[str] = Counter()
        """Sensors that could not be read, by sensor name."""

    def present(self) -> bool:
        try:
            return bool(self.sensors())
        except (CollectorError, OSError):  # discovery swallows per-file errors; belt and braces
            return False

    def sensors(self) -> list[Sensor]:
        """Every sensor with a positive critical temperature, discovered afresh."""
        return self._thermal_zones() + self._hwmon_sensors()

    def sample(self) -> Sample:
        now = self.clock()
        sensors = self.sensors()
        if not sensors:
            raise CollectorError("thermal: no sensor with a critical temperature")
        signals: dict[str, float] = {}
        raw: dict[str, float] = {}
        unreadable = 0
        for sensor in sensors:
            try:
                temp = parse_int(read_text(sensor.temp_path), str(sensor.temp_path), minimum=None)
            except CollectorError as exc:
                unreadable += 1
                self.warnings[sensor.name] += 1
                if self.warnings[sensor.name] == 1:
                    log.warning("thermal collector: %s (logged once, counted in warnings)", exc)
                continue
            signals[sensor.name] = min(1.0, max(0.0, temp / sensor.crit_millicelsius))
            raw[f"{sensor.name}.temp_c"] = temp / 1000.0
            raw[f"{sensor.name}.crit_c"] = sensor.crit_millicelsius / 1000.0
        if not signals:
            raise CollectorError(f"thermal: none of {len(sensors)} sensors could be read")
        raw["unreadable"] = float(unreadable)
        return Sample(
            substrate=self.substrate, time=now, load=max(signals.values()), signals=signals, raw=raw
        )

    # -- discovery -----------------------------------------------------------------------------

    def _thermal_zones(self) -> list[Sensor]:
        base = self.paths.sys_path("class", "thermal")
        sensors: list[Sensor] = []
        for zone in _sorted_dirs(base, "thermal_zone"):
            crits: list[int] = []
            for entry in _listdir(zone):
                match = _TRIP_TYPE.match(entry.name)
                if not match:
                    continue
                try:
                    kind = read_optional(entry)
                except CollectorError:
                    continue
                if kind is None or kind.strip() != "critical":
                    continue
                crit = _read_millicelsius(zone / f"trip_point_{match.group(1)}_temp")
                if crit is not None and crit > 0:
                    crits.append(crit)
            if crits and path_exists(zone / "temp"):
                sensors.append(Sensor(zone.name, zone / "temp", min(crits)))
        return sensors

    def _hwmon_sensors(self) -> list[Sensor]:
        base = self.paths.sys_path("class", "hwmon")
        sensors: list[Sensor] = []
        for hwmon in _sorted_dirs(base, "hwmon"):
            inputs = sorted(
                (int(m.group(1)), entry)
                for entry in _listdir(hwmon)
                if (m := _HWMON_INPUT.match(entry.name))
            )
            for index, temp_path in inputs:
                crit = _read_millicelsius(hwmon / f"temp{index}_crit")
                if crit is not None and crit > 0:
                    sensors.append(Sensor(f"{hwmon.name}_temp{index}", temp_path, crit))
        return sensors


def _listdir(directory: Path) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except OSError:
        return []


def _sorted_dirs(base: Path, prefix: str) -> list[Path]:
    """``base/<prefix>N`` entries in numeric order (class entries are symlinks to devices)."""
    found = []
    for entry in _listdir(base):
        suffix = entry.name[len(prefix) :]
        if entry.name.startswith(prefix) and suffix.isdigit() and is_dir(entry):
            found.append((int(suffix), entry))
    return [entry for _, entry in sorted(found)]
