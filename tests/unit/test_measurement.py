"""NodeMeasurements: failed readings are counted and skipped (never zero load), gaps restart the
window, staleness follows the injected clock, and the windows summarise into readings and gates.

Pressure conditions are in test_pressure.py, Ready/Stale and the spec in test_node_status.py."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import numpy as np
import pytest

from capacity_agent.collectors.base import CollectorError, Sample
from capacity_agent.collectors.procfs import PrimingError
from capacity_agent.measurement import MAX_SIGNALS, NodeMeasurements, discover
from capacity_api import gates
from capacity_api.models import CgroupLimits, ConditionStatus, PressureReading, Substrate
from tests.unit.measurement_fakes import (
    Clock,
    FakeCollector,
    Step,
    condition,
    failing,
    run,
    steady,
)

pytestmark = pytest.mark.unit


def out_of_range(now: float) -> Sample:
    # Sample itself refuses values outside [0, 1] with a CollectorError
    return Sample(substrate=Substrate.STORAGE, time=now, load=1.5, signals={"busy": 1.5})


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
    assert m.series(Substrate.STORAGE) == []  # nothing, not zeros
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
    gpu = FakeCollector(Substrate.GPU, steady(Substrate.GPU, 0.7), clock)
    m = NodeMeasurements([gpu], stale_after=3.0)
    run(m, clock, 10)
    last_good = clock.now
    gpu.failure = CollectorError("nvml: lost device")
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
# Readings and gates


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
