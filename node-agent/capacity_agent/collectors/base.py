"""The interface every substrate source implements.

A collector measures one substrate of this node. It says whether the substrate is present at all
(no GPU is not an error: the substrate is simply absent), describes its geometry and capacity once,
and takes one :class:`Sample` per call. A collector that cannot read raises :class:`CollectorError`;
the agent counts it, logs it and marks the substrate stale: a failed reading is never read as zero
load.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field

from capacity_api.models import CgroupLimits, Geometry, PressureReading, Substrate


class CollectorError(RuntimeError):
    """A reading could not be taken (or made no sense); the sample is skipped, never zeroed."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading of one substrate.

    ``signals`` are utilisations in [0, 1] (cpu, memory, sm, iops, rx, ...), the inputs of the
    window summaries; ``load`` is the substrate's load u in [0, 1], its worst dimension.
    ``raw`` keeps values in natural units (bytes/s, degrees C, ...) for logs and debugging.
    """

    substrate: Substrate
    time: float
    """Unix time of the reading (from the injected clock)."""
    load: float
    signals: dict[str, float]
    raw: dict[str, float] = field(default_factory=dict)
    pressure: dict[str, PressureReading] | None = None
    cgroup: CgroupLimits | None = None

    def __post_init__(self) -> None:
        values = [self.load, *self.signals.values()]
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
            raise CollectorError(
                f"{self.substrate.value}: signals must be finite and within [0, 1], got "
                f"load={self.load!r} signals={self.signals!r}"
            )


class Collector(abc.ABC):
    """A source of samples for one substrate."""

    substrate: Substrate

    @abc.abstractmethod
    def present(self) -> bool:
        """Whether the substrate exists on this node. Must not raise."""

    def geometry(self) -> Geometry | None:
        """The discrete units of the substrate, when it has them."""
        return None

    def capacity(self) -> dict[str, str]:
        """Capacity totals as Kubernetes quantities, e.g. {"cpu": "8", "memory": "16Gi"}."""
        return {}

    @abc.abstractmethod
    def sample(self) -> Sample:
        """Take one reading. Raises CollectorError when it cannot."""

    def close(self) -> None:  # noqa: B027 - optional hook, most collectors hold nothing
        """Release connections or handles."""
