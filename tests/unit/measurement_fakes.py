"""Fake collectors and a settable clock for the NodeMeasurements tests (measurement, pressure and
node status)."""

from __future__ import annotations

from collections.abc import Callable

from capacity_agent.collectors.base import Collector, CollectorError, Sample
from capacity_agent.measurement import NodeMeasurements
from capacity_api.models import Condition, Geometry, Substrate

T0 = 1_800_000_000.0
Step = Callable[[float], Sample]


class FakeCollector(Collector):
    """Returns ``step(now)`` on every sample() (which may raise), at the clock's time."""

    def __init__(
        self,
        substrate: Substrate,
        step: Step,
        clock: Callable[[], float],
        *,
        present: bool = True,
        capacity: dict[str, str] | None = None,
    ) -> None:
        self.substrate = substrate
        self.step = step
        self.clock = clock
        self._present = present
        self.capacities = capacity or {}
        """What capacity() returns."""
        self.failure: CollectorError | None = None
        """When set, every reading (sample, geometry, capacity) raises it."""
        self.closed = False
        self.calls = 0

    def present(self) -> bool:
        return self._present

    def geometry(self) -> Geometry | None:
        if self.failure is not None:
            raise self.failure
        return Geometry(units=4)

    def capacity(self) -> dict[str, str]:
        if self.failure is not None:
            raise self.failure
        return dict(self.capacities)

    def sample(self) -> Sample:
        self.calls += 1
        if self.failure is not None:
            raise self.failure
        return self.step(self.clock())

    def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def steady(substrate: Substrate, load: float = 0.4) -> Step:
    def step(now: float) -> Sample:
        return Sample(
            substrate=substrate, time=now, load=load, signals={"cpu": load, "memory": load / 2}
        )

    return step


def failing(error: BaseException) -> Step:
    def step(now: float) -> Sample:
        raise error

    return step


def run(m: NodeMeasurements, clock: Clock, ticks: int, every: float = 1.0) -> None:
    for _ in range(ticks):
        clock.now += every
        m.tick(clock.now)


def condition(m: NodeMeasurements, now: float, kind: str) -> Condition:
    return next(c for c in m.conditions(now) if c.type == kind)
