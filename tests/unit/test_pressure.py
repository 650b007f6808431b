"""Pressure conditions: PSI thresholds with hysteresis, CPU PSI with cgroup throttling discounted,
Unknown without PSI; and NodeMeasurements feeding them from host samples only."""

from __future__ import annotations

import pytest

from capacity_agent.collectors.base import Sample
from capacity_agent.measurement import NodeMeasurements
from capacity_agent.node_status import ConditionState
from capacity_agent.pressure import PressureConditions, PressureThresholds
from capacity_api.models import CgroupLimits, ConditionStatus, PressureReading, Substrate
from capacity_api.reasons import (
    CPU_PRESSURE,
    CPU_THROTTLED,
    IO_PRESSURE,
    MEMORY_PRESSURE,
    PSI_ABOVE_THRESHOLD,
    PSI_BELOW_THRESHOLD,
    PSI_UNAVAILABLE,
)
from tests.unit.measurement_fakes import Clock, FakeCollector, Step, condition, run, steady

pytestmark = pytest.mark.unit

TRUE, FALSE, UNKNOWN = ConditionStatus.TRUE, ConditionStatus.FALSE, ConditionStatus.UNKNOWN


def psi(
    memory: float | None = None, cpu: float | None = None, io: float | None = None
) -> dict[str, PressureReading]:
    return {
        name: PressureReading(some_avg10=value, some_avg60=value)
        for name, value in (("memory", memory), ("cpu", cpu), ("io", io))
        if value is not None
    }


def state(p: PressureConditions, kind: str) -> ConditionState:
    return next(s for s in p.states() if s.type == kind)


def host_with_psi(
    memory: float | None = None,
    cpu: float | None = None,
    io: float | None = None,
    throttled: float | None = None,
) -> Step:
    def step(now: float) -> Sample:
        cgroup = (
            None if throttled is None else CgroupLimits(version=2, cpu_throttled_fraction=throttled)
        )
        return Sample(
            substrate=Substrate.HOST,
            time=now,
            load=0.3,
            signals={"cpu": 0.3, "memory": 0.2},
            pressure=psi(memory, cpu, io) or None,
            cgroup=cgroup,
        )

    return step


# ---------------------------------------------------------------------------------------------
# PressureConditions


@pytest.mark.parametrize(
    ("memory_psi", "expected"),
    [
        # rises above 10 -> True; stays True down to 8 (80 %); clears below it
        ([5.0], [FALSE]),
        ([5.0, 12.0], [FALSE, TRUE]),
        ([12.0, 9.0, 8.5], [TRUE] * 3),
        ([12.0, 7.9], [TRUE, FALSE]),
        ([9.9, 10.0, 10.1], [FALSE, FALSE, TRUE]),
    ],
)
def test_memory_pressure_from_psi_with_hysteresis(
    memory_psi: list[float], expected: list[ConditionStatus]
) -> None:
    p = PressureConditions(PressureThresholds(), host_measured=True)
    seen = []
    for at, value in enumerate(memory_psi):
        p.update(psi(memory=value, cpu=0.0, io=0.0), float(at), None)
        seen.append(state(p, MEMORY_PRESSURE).status)
    assert seen == expected
    assert (MEMORY_PRESSURE in p.active()) == (expected[-1] is TRUE)


def test_messages_say_whether_the_condition_is_rising_holding_or_clear() -> None:
    p = PressureConditions(PressureThresholds(), host_measured=True)
    p.update(psi(memory=12.0), 0.0, None)
    assert state(p, MEMORY_PRESSURE).message == "PSI memory some avg10 12.0% above 10%"
    p.update(psi(memory=9.0), 1.0, None)
    assert state(p, MEMORY_PRESSURE).message == "PSI memory some avg10 9.0% not yet below 8%"
    p.update(psi(memory=2.0), 2.0, None)
    assert state(p, MEMORY_PRESSURE).reason == PSI_BELOW_THRESHOLD
    assert state(p, MEMORY_PRESSURE).message == "PSI memory some avg10 2.0% <= 8%"  # cleared


@pytest.mark.parametrize(
    ("cpu_psi", "throttled", "status", "reason"),
    [
        (80.0, None, TRUE, PSI_ABOVE_THRESHOLD),  # no throttling data: raw PSI
        (80.0, 0.0, TRUE, PSI_ABOVE_THRESHOLD),
        (80.0, 0.5, FALSE, CPU_THROTTLED),  # 40 % after discounting
        (80.0, 0.9, FALSE, CPU_THROTTLED),
        (60.0, 0.1, TRUE, PSI_ABOVE_THRESHOLD),  # 54 % still above 50
        (30.0, 0.0, FALSE, PSI_BELOW_THRESHOLD),
    ],
)
def test_cpu_pressure_discounts_cgroup_throttling(
    cpu_psi: float, throttled: float | None, status: ConditionStatus, reason: str
) -> None:
    p = PressureConditions(PressureThresholds(), host_measured=True)
    for at in range(12):
        p.update(psi(cpu=cpu_psi), float(at), throttled)
    cpu = state(p, CPU_PRESSURE)
    assert (cpu.status, cpu.reason) == (status, reason)
    assert (CPU_PRESSURE in p.active()) == (status is TRUE)


def test_throttling_discounts_cpu_only() -> None:
    p = PressureConditions(PressureThresholds(), host_measured=True)
    p.update(psi(memory=30.0, cpu=80.0, io=30.0), 0.0, 0.9)
    assert p.active() == [MEMORY_PRESSURE, IO_PRESSURE]
    assert "after discounting" in state(p, CPU_PRESSURE).message
    assert "throttled" not in state(p, MEMORY_PRESSURE).message


def test_throttling_is_averaged_over_the_psi_span_only() -> None:
    p = PressureConditions(PressureThresholds(), host_measured=True)
    for at in range(30):  # fully throttled: explained by the quota
        p.update(psi(cpu=80.0), float(at), 1.0)
    assert p.active() == []
    for at in range(30, 40):  # 10 s later the span still holds one throttled sample
        p.update(psi(cpu=80.0), float(at), 0.0)
    assert p.active() == [CPU_PRESSURE]  # 80 x (1 - 1/11) = 72.7 > 50
    for at in range(40, 60):
        p.update(psi(cpu=80.0), float(at), 0.0)
    assert "throttled in 0% of periods" in state(p, CPU_PRESSURE).message


def test_throttling_stamped_after_a_sample_is_forgotten_when_the_clock_steps_back() -> None:
    p = PressureConditions(PressureThresholds(), host_measured=True)
    for at in (100.0, 101.0, 102.0):
        p.update(psi(cpu=80.0), at, 1.0)
    assert p.active() == []
    p.update(psi(cpu=80.0), 50.0, 0.0)  # the clock stepped back 52 s
    assert p.active() == [CPU_PRESSURE]


def test_pressure_is_unknown_before_a_reading_and_without_psi() -> None:
    measured = PressureConditions(PressureThresholds(), host_measured=True)
    assert {(s.status, s.reason, s.message) for s in measured.states()} == {
        (UNKNOWN, PSI_UNAVAILABLE, "no host sample yet")
    }
    unmeasured = PressureConditions(PressureThresholds(), host_measured=False)
    assert {s.message for s in unmeasured.states()} == {"host substrate not measured"}

    measured.update(psi(memory=50.0, cpu=90.0, io=50.0), 0.0, None)
    assert len(measured.active()) == 3
    measured.update(psi(cpu=float("nan")), 1.0, None)  # PSI gone (or garbage): not "clear"
    assert [s.status for s in measured.states()] == [UNKNOWN] * 3
    assert state(measured, IO_PRESSURE).message == "no PSI io some avg10 in the newest host sample"
    assert measured.active() == []


def test_thresholds_are_configurable() -> None:
    p = PressureConditions(PressureThresholds(memory=50.0, io=1.0), host_measured=True)
    p.update(psi(memory=30.0, cpu=0.0, io=2.0), 0.0, None)
    assert p.active() == [IO_PRESSURE]


# ---------------------------------------------------------------------------------------------
# Through NodeMeasurements: host samples feed the conditions that are published and voted on


def test_host_samples_set_the_published_conditions_and_the_voted_ones() -> None:
    clock = Clock()
    m = NodeMeasurements(
        [FakeCollector(Substrate.HOST, host_with_psi(memory=30.0, cpu=90.0, io=25.0), clock)],
        stale_after=3.0,
    )
    run(m, clock, 2)
    assert m.pressure_conditions() == [MEMORY_PRESSURE, CPU_PRESSURE, IO_PRESSURE]
    for kind in (MEMORY_PRESSURE, CPU_PRESSURE, IO_PRESSURE):
        c = condition(m, clock.now, kind)
        assert (c.status, c.reason) == (TRUE, PSI_ABOVE_THRESHOLD)


def test_throttling_comes_from_the_host_samples_cgroup() -> None:
    clock = Clock()
    m = NodeMeasurements(
        [FakeCollector(Substrate.HOST, host_with_psi(cpu=80.0, throttled=0.5), clock)],
        stale_after=3.0,
    )
    run(m, clock, 12)
    cpu = condition(m, clock.now, CPU_PRESSURE)
    assert (cpu.status, cpu.reason) == (FALSE, CPU_THROTTLED)


def test_pressure_is_unknown_without_psi_and_never_reported_as_set() -> None:
    clock = Clock()
    m = NodeMeasurements([FakeCollector(Substrate.HOST, host_with_psi(), clock)], stale_after=3.0)
    run(m, clock, 3)
    for kind in (MEMORY_PRESSURE, CPU_PRESSURE, IO_PRESSURE):
        c = condition(m, clock.now, kind)
        assert (c.status, c.reason) == (UNKNOWN, PSI_UNAVAILABLE)
    assert m.pressure_conditions() == []
    assert condition(m, clock.now, "Ready").status is TRUE  # pressure never makes a node un-Ready


def test_only_the_host_substrate_reports_pressure() -> None:
    clock = Clock()

    def storage(now: float) -> Sample:
        return Sample(
            substrate=Substrate.STORAGE,
            time=now,
            load=0.1,
            signals={"busy": 0.1},
            pressure=psi(memory=90.0, cpu=90.0, io=90.0),
        )

    m = NodeMeasurements(
        [
            FakeCollector(Substrate.STORAGE, storage, clock),
            FakeCollector(Substrate.GPU, steady(Substrate.GPU), clock),
        ],
        stale_after=3.0,
    )
    run(m, clock, 2)
    assert m.pressure_conditions() == []
    assert condition(m, clock.now, MEMORY_PRESSURE).message == "host substrate not measured"
