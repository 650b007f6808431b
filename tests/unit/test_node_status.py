"""The CapacityNode as published: Ready and Stale from the freshness of every substrate,
lastTransitionTime kept while a status stays, the spec's geometry and capacity, the status."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest

from capacity_agent.collectors.base import CollectorError
from capacity_agent.measurement import NodeMeasurements
from capacity_agent.node_status import (
    CONDITION_TYPES,
    MESSAGE_LIMIT,
    ConditionLog,
    ConditionState,
    StaleSubstrate,
    freshness,
    moment,
    node_spec,
)
from capacity_api.models import ConditionStatus, Geometry, Substrate
from capacity_api.reasons import FRESH, MEASURING, NO_SUBSTRATES, READY, SUBSTRATES_STALE
from tests.unit.measurement_fakes import T0, Clock, FakeCollector, condition, run, steady

pytestmark = pytest.mark.unit

TRUE, FALSE = ConditionStatus.TRUE, ConditionStatus.FALSE


# ---------------------------------------------------------------------------------------------
# Ready and Stale


def test_freshness_of_no_fresh_and_stale_substrates() -> None:
    ready, stale = freshness([], [], 3.0)
    assert (ready.status, ready.reason) == (FALSE, NO_SUBSTRATES)
    assert (stale.status, stale.reason) == (FALSE, FRESH)

    ready, stale = freshness([Substrate.HOST, Substrate.GPU], [], 3.0)
    assert (ready.status, ready.reason, ready.message) == (TRUE, MEASURING, "measuring host, gpu")
    assert stale.message == "every substrate sampled within 3 s"

    gpu = StaleSubstrate(Substrate.GPU, T0, failures=2, last_error="nvml: lost device")
    ready, stale = freshness([Substrate.HOST, Substrate.GPU], [gpu], 3.0)
    assert (ready.status, ready.reason, ready.message) == (
        FALSE,
        SUBSTRATES_STALE,
        "no fresh sample of gpu",
    )
    assert (stale.status, stale.reason) == (TRUE, SUBSTRATES_STALE)
    assert stale.message == (
        "no sample within 3 s: gpu: last sample 2027-01-15T08:00:00+00:00, 2 failed since "
        "(last error: nvml: lost device)"
    )


@pytest.mark.parametrize(
    ("stale", "described"),
    [
        (StaleSubstrate(Substrate.HOST, None), "host: no sample yet"),
        (StaleSubstrate(Substrate.HOST, None, 3, "EIO"), "host: no sample yet, 3 failed since"),
        # an old error is not quoted once a good sample came after it
        (
            StaleSubstrate(Substrate.HOST, T0 + 0.7, 0, "EIO"),
            "host: last sample 2027-01-15T08:00:00",
        ),
        (StaleSubstrate(Substrate.HOST, T0, 1, "x" * 400), "x" * 160 + ")"),
    ],
)
def test_stale_substrate_descriptions(stale: StaleSubstrate, described: str) -> None:
    text = stale.describe()
    assert described in text
    assert "x" * (160 + 1) not in text
    if not stale.failures:
        assert "error" not in text


def test_ready_needs_a_fresh_sample_of_every_substrate() -> None:
    clock = Clock()
    m = NodeMeasurements(
        [FakeCollector(Substrate.HOST, steady(Substrate.HOST), clock)], stale_after=3.0
    )
    assert condition(m, clock.now, "Ready").status is FALSE  # no sample yet
    run(m, clock, 1)
    assert condition(m, clock.now, "Ready").status is TRUE
    assert condition(m, clock.now, "Stale").status is FALSE
    empty = NodeMeasurements([], stale_after=3.0)
    ready = condition(empty, clock.now, "Ready")
    assert (ready.status, ready.reason) == (FALSE, NO_SUBSTRATES)
    assert [c.type for c in m.conditions(clock.now)] == list(CONDITION_TYPES)


# ---------------------------------------------------------------------------------------------
# lastTransitionTime


def test_condition_log_keeps_the_transition_time_while_the_status_stays() -> None:
    log = ConditionLog()
    up = ConditionState(READY, TRUE, MEASURING, "measuring host")
    (first,) = log.stamp([up], T0 + 0.9, generation=3)
    assert first.last_transition_time == datetime.fromtimestamp(T0, UTC)  # whole seconds
    assert first.observed_generation == 3
    (same,) = log.stamp([ConditionState(READY, TRUE, MEASURING, "other text")], T0 + 50)
    assert same.last_transition_time == first.last_transition_time
    assert same.message == "other text"
    (down,) = log.stamp([ConditionState(READY, FALSE, SUBSTRATES_STALE, "x")], T0 + 60)
    assert down.last_transition_time == datetime.fromtimestamp(T0 + 60, UTC)


def test_condition_messages_are_cut() -> None:
    (c,) = ConditionLog().stamp([ConditionState(READY, TRUE, MEASURING, "m" * 2000)], T0)
    assert c.message is not None
    assert len(c.message) == MESSAGE_LIMIT
    assert c.message.endswith("m...")


def test_last_transition_time_is_kept_while_the_status_stays() -> None:
    clock = Clock()
    host = FakeCollector(Substrate.HOST, steady(Substrate.HOST), clock)
    m = NodeMeasurements([host], stale_after=3.0)
    run(m, clock, 1)
    first = condition(m, clock.now, "Ready")
    assert first.status is TRUE
    run(m, clock, 100)
    later = condition(m, clock.now, "Ready")
    assert later.last_transition_time == first.last_transition_time
    host.failure = CollectorError("gone")
    run(m, clock, 5)
    broken = condition(m, clock.now, "Ready")
    assert broken.status is FALSE
    assert broken.last_transition_time == datetime.fromtimestamp(int(clock.now), UTC)
    run(m, clock, 5)  # still broken: the message changes, the transition time does not
    assert condition(m, clock.now, "Ready").last_transition_time == broken.last_transition_time


def test_moment_is_utc_to_the_millisecond_or_the_second() -> None:
    assert moment(T0 + 0.123456) == datetime.fromtimestamp(T0 + 0.123, UTC)
    assert moment(T0 + 0.999, whole_seconds=True) == datetime.fromtimestamp(T0, UTC)


# ---------------------------------------------------------------------------------------------
# Spec


def test_node_spec_merges_and_sorts_capacity_and_drops_bad_quantities(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        spec = node_spec(
            "node-a",
            [Substrate.HOST, Substrate.STORAGE, Substrate.GPU],
            geometry={Substrate.HOST: Geometry(units=4), Substrate.STORAGE: None},
            capacity={
                Substrate.HOST: {"memory": "8Gi", "cpu": "4"},
                Substrate.STORAGE: {"storage-iops": "-5", "other": "12"},
            },
        )
    assert spec.node_name == "node-a"
    assert spec.substrates == [Substrate.HOST, Substrate.STORAGE, Substrate.GPU]
    assert spec.capacity is not None
    assert list(spec.capacity) == ["cpu", "memory", "other"]
    assert spec.geometry == {"host": Geometry(units=4)}
    assert "storage: capacity storage-iops dropped" in caplog.text
    empty = node_spec("node-b", [], geometry={}, capacity={})
    assert (empty.geometry, empty.capacity) == (None, None)


def test_spec_reads_every_collector_and_keeps_the_last_values_when_one_fails() -> None:
    clock = Clock()
    host = FakeCollector(
        Substrate.HOST, steady(Substrate.HOST), clock, capacity={"cpu": "4", "memory": "8Gi"}
    )
    storage = FakeCollector(
        Substrate.STORAGE, steady(Substrate.STORAGE), clock, capacity={"storage-iops": "900"}
    )
    m = NodeMeasurements([storage, host], stale_after=3.0)
    spec = m.spec("node-a")
    assert spec.substrates == [Substrate.HOST, Substrate.STORAGE]
    assert spec.capacity == {"cpu": "4", "memory": "8Gi", "storage-iops": "900"}
    assert spec.geometry is not None
    assert spec.geometry["host"].units == 4

    host.capacities = {"cpu": "2", "memory": "8Gi"}
    storage.failure = CollectorError("unreadable")
    spec = m.spec("node-a")
    assert spec.capacity == {"cpu": "2", "memory": "8Gi", "storage-iops": "900"}
    assert spec.geometry is not None
    assert set(spec.geometry) == {"host", "storage"}
