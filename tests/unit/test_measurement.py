"""NodeMeasurements: failed readings are counted and skipped (never zero load), staleness and
conditions follow the injected clock, pressure conditions read PSI with throttling discounted."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
import pytest

from capacity_agent.collectors.base import Collector, CollectorError, Sample
from capacity_agent.collectors.procfs import PrimingError
from capacity_agent.measurement import MAX_SIGNALS, NodeMeasurements, discover
from capacity_api import gates
from capacity_api.models import (
    CgroupLimits,
    Condition,
    ConditionStatus,
    Geometry,
    PressureReading,
    Substrate,
)
from capacity_api.reasons import (
    CPU_THROTTLED,
    PSI_ABOVE_THRESHOLD,
    PSI_BELOW_THRESHOLD,
    PSI_UNAVAILABLE,
)

pytestmark = pytest.mark.unit

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
        self._capacity = capacity or {}
        self.closed = False
        self.calls = 0

    def present(self) -> bool:
        return self._present

    def geometry(self) -> Geometry | None:
        return Geometry(units=4)

    def capacity(self) -> dict[str, str]:
        return dict(self._capacity)

    def sample(self) -> Sample:
        self.calls += 1
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


def out_of_range(now: float) -> Sample:
    # Sample itself refuses values outside [0, 1] with a CollectorError
    return Sample(substrate=Substrate.STORAGE, time=now, load=1.5, signals={"busy": 1.5})


def host_with_psi(
    memory: float | None = None,
    cpu: float | None = None,
    io: float | None = None,
    throttled: float | None = None,
) -> Step:
    def step(now: float) -> Sample:
        pressure = {
            name: PressureReading(some_avg10=value, some_avg60=value)
            for name, value in (("memory", memory), ("cpu", cpu), ("io", io))
            if value is not None
        }
        cgroup = (
            None if throttled is None else CgroupLimits(version=2, cpu_throttled_fraction=throttled)
        )
        return Sample(
            substrate=Substrate.HOST,
            time=now,
            load=0.3,
            signals={"cpu": 0.3, "memory": 0.2},
            pressure=pressure or None,
            cgroup=cgroup,
        )

    return step


def run(m: NodeMeasurements, clock: Clock, ticks: int, every: float = 1.0) -> None:
    for _ in range(ticks):
        clock.now += every
        m.tick(clock.now)


def condition(m: NodeMeasurements, now: float, kind: str) -> Condition:
    return next(c for c in m.conditions(now) if c.type == kind)


# ---------------------------------------------------------------------------------------------
# Sampling and failures


def test_samples_fill_the_window_of_each_substrate() -> None:
    clock = Clock()
    host = FakeCollector(Substrate.HOST, steady(Substrate.HOST, 0.4), clock)
    m = NodeMeasurements([host], stale_after=3.0)
    run(m, clock, 10)
    assert m.substrates == [Substrate.HOST]
    assert m.samples(Substrate.HOST) == 10
    np.testing.assert_allclose(m.series(Substrate.HOST), [0.4] * 10)
    assert m.newest_time(Substrate.HOST) == clock.now
    assert not m.is_stale(Substrate.HOST, clock.now)
    assert m.errors(Substrate.HOST) == 0


@pytest.mark.parametrize(
    ("step", "error_text"),
    [
        (failing(CollectorError("disk gone")), "disk gone"),
        (out_of_range, "within [0, 1]"),
        (failing(ZeroDivisionError("boom")), "ZeroDivisionError: boom"),
    ],
    ids=["collector-error", "out-of-range", "unexpected-exception"],
)
def test_a_failing_collector_is_counted_skipped_and_stale_never_zero(
    step: Step, error_text: str
) -> None:
    clock = Clock()
    host = FakeCollector(Substrate.HOST, steady(Substrate.HOST, 0.5), clock)
    storage = FakeCollector(Substrate.STORAGE, step, clock)
    m = NodeMeasurements([host, storage], stale_after=3.0)
    run(m, clock, 5)

    assert m.errors(Substrate.STORAGE) == 5
    assert m.samples(Substrate.STORAGE) == 0
    assert m.series(Substrate.STORAGE).size == 0  # nothing, not zeros
    assert m.newest_time(Substrate.STORAGE) is None
    assert m.is_stale(Substrate.STORAGE, clock.now)
    # the healthy substrate is unaffected
    assert m.samples(Substrate.HOST) == 5
    assert not m.is_stale(Substrate.HOST, clock.now)

    status = m.build_status(clock.now)
    assert status.readings is not None
    assert set(status.readings) == {"host"}
    assert status.gates is not None
    assert set(status.gates) == {"host"}
    stale = condition(m, clock.now, "Stale")
    assert stale.status is ConditionStatus.TRUE
    assert stale.message is not None
    assert "storage: no sample yet, 5 failed since" in stale.message
    assert error_text in stale.message
    assert condition(m, clock.now, "Ready").status is ConditionStatus.FALSE


def test_a_collector_that_stops_working_goes_stale_and_keeps_its_last_readings() -> None:
    clock = Clock()
    working = [True]

    def step(now: float) -> Sample:
        if not working[0]:
            raise CollectorError("nvml: lost device")
        return Sample(substrate=Substrate.GPU, time=now, load=0.7, signals={"sm": 0.7})

    m = NodeMeasurements([FakeCollector(Substrate.GPU, step, clock)], stale_after=3.0)
    run(m, clock, 10)
    last_good = clock.now
    working[0] = False
    run(m, clock, 3)
    assert not m.is_stale(Substrate.GPU, clock.now)  # 3 s old: not yet
    run(m, clock, 1)
    assert m.is_stale(Substrate.GPU, clock.now)  # 4 s > stale_after
    assert m.is_stale(Substrate.GPU, clock.now, max_age=3.5)
    assert not m.is_stale(Substrate.GPU, clock.now, max_age=10.0)
    # the window still holds the real load (0.7), never zeros
    np.testing.assert_allclose(m.series(Substrate.GPU), [0.7] * 10)
    readings = m.build_status(clock.now).readings
    assert readings is not None
    reading = readings["gpu"]
    assert reading.observed_at == datetime.fromtimestamp(last_good, UTC)
    assert reading.load.mean == 0.7


def test_a_gap_longer_than_stale_after_restarts_the_window() -> None:
    """A frozen agent (SIGSTOP) or a long outage: what came before the gap is forgotten, so the
    node fills minSamples again before its readings count."""
    clock = Clock()
    loads = [0.9]

    def step(now: float) -> Sample:
        return Sample(substrate=Substrate.HOST, time=now, load=loads[0], signals={"cpu": loads[0]})

    m = NodeMeasurements([FakeCollector(Substrate.HOST, step, clock)], stale_after=3.0)
    run(m, clock, 20)
    run(m, clock, 1, every=3.0)  # exactly stale_after: still one series
    assert m.samples(Substrate.HOST) == 21
    assert m.gaps == 0
    loads[0] = 0.2
    run(m, clock, 1, every=30.0)  # frozen for 30 s
    assert m.samples(Substrate.HOST) == 1
    assert m.gaps == 1
    np.testing.assert_allclose(m.series(Substrate.HOST), [0.2])  # nothing of before the gap
    run(m, clock, 4)
    assert m.samples(Substrate.HOST) == 5
    readings = m.build_status(clock.now).readings
    assert readings is not None
    assert readings["host"].samples == 5
    assert readings["host"].load.p95 == pytest.approx(0.2)


def test_priming_is_skipped_without_counting_as_a_failure() -> None:
    clock = Clock()
    calls = [0]

    def step(now: float) -> Sample:
        calls[0] += 1
        if calls[0] == 1:
            raise PrimingError("first reading stored as the baseline")
        return Sample(substrate=Substrate.NETWORK, time=now, load=0.1, signals={"rx": 0.1})

    m = NodeMeasurements([FakeCollector(Substrate.NETWORK, step, clock)], stale_after=3.0)
    run(m, clock, 3)
    assert m.errors(Substrate.NETWORK) == 0
    assert m.samples(Substrate.NETWORK) == 2


def test_failures_are_logged_at_most_once_a_minute_per_substrate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    m = NodeMeasurements(
        [
            FakeCollector(Substrate.STORAGE, failing(CollectorError("io error")), clock),
            FakeCollector(Substrate.NETWORK, failing(CollectorError("no such device")), clock),
        ],
        stale_after=3.0,
    )
    with caplog.at_level(logging.WARNING, logger="capacity_agent.measurement"):
        run(m, clock, 150)  # t = 1 .. 150: logs at 1, 61 and 121 for each substrate
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "storage" in w]) == 3
    assert len([w for w in warnings if "network" in w]) == 3
    assert any("59 more since the last report" in w for w in warnings)
    assert m.errors(Substrate.STORAGE) == 150


def test_tick_reports_what_was_sampled_and_what_failed() -> None:
    clock = Clock()
    m = NodeMeasurements(
        [
            FakeCollector(Substrate.HOST, steady(Substrate.HOST), clock),
            FakeCollector(Substrate.THERMAL, failing(CollectorError("EIO")), clock),
        ],
        stale_after=3.0,
    )
    clock.now += 1
    result = m.tick(clock.now)
    assert result.sampled == (Substrate.HOST,)
    assert result.failed == (Substrate.THERMAL,)


# ---------------------------------------------------------------------------------------------
# Conditions


def test_ready_needs_a_fresh_sample_of_every_substrate() -> None:
    clock = Clock()
    m = NodeMeasurements(
        [FakeCollector(Substrate.HOST, steady(Substrate.HOST), clock)], stale_after=3.0
    )
    assert condition(m, clock.now, "Ready").status is ConditionStatus.FALSE  # no sample yet
    run(m, clock, 1)
    assert condition(m, clock.now, "Ready").status is ConditionStatus.TRUE
    assert condition(m, clock.now, "Stale").status is ConditionStatus.FALSE
    empty = NodeMeasurements([], stale_after=3.0)
    ready = condition(empty, clock.now, "Ready")
    assert (ready.status, ready.reason) == (ConditionStatus.FALSE, "NoSubstrates")


def test_last_transition_time_is_kept_while_the_status_stays() -> None:
    clock = Clock()
    working = [True]

    def step(now: float) -> Sample:
        if not working[0]:
            raise CollectorError("gone")
        return Sample(substrate=Substrate.HOST, time=now, load=0.2, signals={})

    m = NodeMeasurements([FakeCollector(Substrate.HOST, step, clock)], stale_after=3.0)
    run(m, clock, 1)
    first = condition(m, clock.now, "Ready")
    assert first.status is ConditionStatus.TRUE
    run(m, clock, 100)
    later = condition(m, clock.now, "Ready")
    assert later.last_transition_time == first.last_transition_time
    working[0] = False
    run(m, clock, 5)
    broken = condition(m, clock.now, "Ready")
    assert broken.status is ConditionStatus.FALSE
    assert broken.last_transition_time == datetime.fromtimestamp(int(clock.now), UTC)
    run(m, clock, 5)  # still broken: the message changes, the transition time does not
    assert condition(m, clock.now, "Ready").last_transition_time == broken.last_transition_time


@pytest.mark.parametrize(
    ("memory_psi", "expected"),
    [
        # rises above 10 -> True; stays True down to 8 (80 %); clears below it
        ([5.0], [ConditionStatus.FALSE]),
        ([5.0, 12.0], [ConditionStatus.FALSE, ConditionStatus.TRUE]),
        ([12.0, 9.0, 8.5], [ConditionStatus.TRUE] * 3),
        ([12.0, 7.9], [ConditionStatus.TRUE, ConditionStatus.FALSE]),
        ([9.9, 10.0, 10.1], [ConditionStatus.FALSE, ConditionStatus.FALSE, ConditionStatus.TRUE]),
    ],
)
def test_memory_pressure_from_psi_with_hysteresis(
    memory_psi: list[float], expected: list[ConditionStatus]
) -> None:
    clock = Clock()
    value = [0.0]

    def step(now: float) -> Sample:
        return host_with_psi(memory=value[0], cpu=0.0, io=0.0)(now)

    collector = FakeCollector(Substrate.HOST, step, clock)
    m = NodeMeasurements([collector], stale_after=3.0)
    seen = []
    for psi in memory_psi:
        value[0] = psi
        run(m, clock, 1)
        seen.append(condition(m, clock.now, "MemoryPressure").status)
    assert seen == expected
    assert ("MemoryPressure" in m.pressure_conditions()) == (expected[-1] is ConditionStatus.TRUE)


@pytest.mark.parametrize(
    ("cpu_psi", "throttled", "status", "reason"),
    [
        (80.0, None, ConditionStatus.TRUE, PSI_ABOVE_THRESHOLD),  # no throttling data: raw PSI
        (80.0, 0.0, ConditionStatus.TRUE, PSI_ABOVE_THRESHOLD),
        (80.0, 0.5, ConditionStatus.FALSE, CPU_THROTTLED),  # 40 % after discounting
        (80.0, 0.9, ConditionStatus.FALSE, CPU_THROTTLED),
        (60.0, 0.1, ConditionStatus.TRUE, PSI_ABOVE_THRESHOLD),  # 54 % still above 50
        (30.0, 0.0, ConditionStatus.FALSE, PSI_BELOW_THRESHOLD),
    ],
)
def test_cpu_pressure_discounts_cgroup_throttling(
    cpu_psi: float, throttled: float | None, status: ConditionStatus, reason: str
) -> None:
    clock = Clock()
    m = NodeMeasurements(
        [FakeCollector(Substrate.HOST, host_with_psi(cpu=cpu_psi, throttled=throttled), clock)],
        stale_after=3.0,
    )
    run(m, clock, 12)
    cpu = condition(m, clock.now, "CPUPressure")
    assert (cpu.status, cpu.reason) == (status, reason)
    assert ("CPUPressure" in m.pressure_conditions()) == (status is ConditionStatus.TRUE)


def test_throttling_is_averaged_over_the_psi_span_only() -> None:
    clock = Clock()
    throttled = [1.0]

    def step(now: float) -> Sample:
        return host_with_psi(cpu=80.0, throttled=throttled[0])(now)

    m = NodeMeasurements([FakeCollector(Substrate.HOST, step, clock)], stale_after=3.0)
    run(m, clock, 30)  # fully throttled: explained by the quota
    assert m.pressure_conditions() == []
    throttled[0] = 0.0
    run(m, clock, 11)  # the throttled samples left the 10 s span: real contention now
    assert m.pressure_conditions() == ["CPUPressure"]


def test_pressure_is_unknown_without_psi_and_never_reported_as_set() -> None:
    clock = Clock()
    m = NodeMeasurements([FakeCollector(Substrate.HOST, host_with_psi(), clock)], stale_after=3.0)
    run(m, clock, 3)
    for kind in ("MemoryPressure", "CPUPressure", "IOPressure"):
        c = condition(m, clock.now, kind)
        assert (c.status, c.reason) == (ConditionStatus.UNKNOWN, PSI_UNAVAILABLE)
    assert m.pressure_conditions() == []
    assert condition(m, clock.now, "Ready").status is ConditionStatus.TRUE


def test_io_pressure_and_several_conditions_at_once() -> None:
    clock = Clock()
    m = NodeMeasurements(
        [FakeCollector(Substrate.HOST, host_with_psi(memory=30.0, cpu=90.0, io=25.0), clock)],
        stale_after=3.0,
    )
    run(m, clock, 2)
    assert m.pressure_conditions() == ["MemoryPressure", "CPUPressure", "IOPressure"]


# ---------------------------------------------------------------------------------------------
# Readings, gates and spec


def test_readings_and_gates_summarise_the_window() -> None:
    clock = Clock()
    loads = iter(np.linspace(0.1, 0.9, 64))

    def step(now: float) -> Sample:
        u = float(next(loads))
        return Sample(
            substrate=Substrate.HOST,
            time=now,
            load=u,
            signals={"cpu": u, "memory": 0.25},
            pressure={"cpu": PressureReading(some_avg10=1.5)},
            cgroup=CgroupLimits(version=2, cpu_limit_cores=2.0, cpu_throttled_fraction=0.25),
        )

    m = NodeMeasurements([FakeCollector(Substrate.HOST, step, clock)], stale_after=3.0)
    run(m, clock, 64)
    status = m.build_status(clock.now, {"host": 0.3}, generation=7)
    assert status.readings is not None
    assert status.gates is not None
    reading = status.readings["host"]
    u = m.series(Substrate.HOST)
    assert reading.samples == 64
    assert reading.load.max == pytest.approx(0.9)
    assert reading.load.p95 == pytest.approx(float(np.percentile(u, 95)), abs=1e-4)
    assert reading.signals is not None
    assert set(reading.signals) == {
        "cpu",
        "memory",
        "cpu_throttled",
    }
    assert reading.signals["memory"].mean == 0.25
    assert reading.fingerprint is not None
    assert len(reading.fingerprint) == gates.BINS
    assert reading.pressure == {"cpu": PressureReading(some_avg10=1.5)}
    assert reading.cgroup is not None
    assert reading.cgroup.cpu_limit_cores == 2.0
    assert reading.cgroup.cpu_throttled_fraction == 0.25  # mean over the window
    g = status.gates["host"]
    assert g.headroom == pytest.approx(min(1 - 0.3, 1 - reading.load.p95), abs=1e-4)
    assert g.gluing_delta == pytest.approx(gates.gluing_delta(u), abs=1e-4)
    assert status.observed_generation == 7
    assert status.allocated is None  # the operator's field, never built here
    assert m.load_range(Substrate.HOST) == pytest.approx(0.8)


def test_signals_are_capped_keeping_the_busiest() -> None:
    clock = Clock()

    def step(now: float) -> Sample:
        signals = {f"zone{i:02d}": i / 100 for i in range(40)}
        return Sample(substrate=Substrate.THERMAL, time=now, load=0.39, signals=signals)

    m = NodeMeasurements([FakeCollector(Substrate.THERMAL, step, clock)], stale_after=3.0)
    run(m, clock, 2)
    reading = m.reading(Substrate.THERMAL)
    assert reading is not None
    assert reading.signals is not None
    assert len(reading.signals) == MAX_SIGNALS
    assert set(reading.signals) == {f"zone{i:02d}" for i in range(40 - MAX_SIGNALS, 40)}


def test_spec_merges_geometry_and_capacity_and_drops_bad_quantities(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    host = FakeCollector(
        Substrate.HOST, steady(Substrate.HOST), clock, capacity={"cpu": "4", "memory": "8Gi"}
    )
    storage = FakeCollector(
        Substrate.STORAGE,
        steady(Substrate.STORAGE),
        clock,
        capacity={"storage-iops": "-5", "other": "12"},
    )
    m = NodeMeasurements([storage, host], stale_after=3.0)
    with caplog.at_level(logging.WARNING):
        spec = m.spec("node-a")
    assert spec.node_name == "node-a"
    assert spec.substrates == [Substrate.HOST, Substrate.STORAGE]
    assert spec.capacity == {"cpu": "4", "memory": "8Gi", "other": "12"}
    assert spec.geometry is not None
    assert spec.geometry["host"].units == 4
    assert "storage-iops dropped" in caplog.text


def test_discover_keeps_present_and_required_substrates() -> None:
    clock = Clock()
    host = FakeCollector(Substrate.HOST, steady(Substrate.HOST), clock)
    gpu = FakeCollector(Substrate.GPU, steady(Substrate.GPU), clock, present=False)
    db = FakeCollector(Substrate.DATABASE, steady(Substrate.DATABASE), clock, present=False)
    kept = discover([gpu, db, host], required=[Substrate.DATABASE])
    assert [c.substrate for c in kept] == [Substrate.HOST, Substrate.DATABASE]
    assert gpu.closed
    assert not db.closed


def test_close_closes_every_collector() -> None:
    clock = Clock()
    collectors = [
        FakeCollector(Substrate.HOST, steady(Substrate.HOST), clock),
        FakeCollector(Substrate.STORAGE, steady(Substrate.STORAGE), clock),
    ]
    m = NodeMeasurements(collectors, stale_after=3.0)
    m.close()
    assert all(c.closed for c in collectors)


def test_two_collectors_for_one_substrate_are_refused() -> None:
    clock = Clock()
    host = FakeCollector(Substrate.HOST, steady(Substrate.HOST), clock)
    with pytest.raises(ValueError, match="two collectors"):
        NodeMeasurements([host, host], stale_after=3.0)
