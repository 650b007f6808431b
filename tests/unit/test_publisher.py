"""The publisher: writes on change beyond the tolerance plus a heartbeat, never status.allocated,
recreates a deleted object, keeps nothing half-applied, backs off with bounded jitter, and keeps a
CapacityNode under 16 KiB."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from typing import Any

import pytest
from lightkube import ApiError

from capacity_agent.backoff import Backoff
from capacity_agent.collectors.base import Collector, CollectorError, Sample
from capacity_agent.lease import LeaseRenewer, micro_time
from capacity_agent.measurement import MAX_SIGNALS, NodeMeasurements
from capacity_agent.metrics import AgentMetrics, make_app
from capacity_agent.publisher import (
    MAX_OBJECT_BYTES,
    KubeNodeApi,
    Publisher,
    allocated_shares,
    changes,
    flatten,
    node_object,
    object_size,
    status_body,
)
from capacity_api.admission import LEDGER_BYTES, NODE_BYTES
from capacity_api.gates import BINS
from capacity_api.models import (
    CapacityNodeSpec,
    CapacityNodeStatus,
    CgroupLimits,
    Geometry,
    PressureReading,
    Substrate,
)
from tests.unit.kube_fakes import FakeApiServer, api_error

pytestmark = pytest.mark.unit

JSON = dict[str, Any]
T0 = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Scripted(Collector):
    """Host samples whose load the test sets."""

    substrate = Substrate.HOST

    def __init__(self, clock: Clock, load: float = 0.4) -> None:
        self.clock = clock
        self.load = load

    def present(self) -> bool:
        return True

    def geometry(self) -> Geometry | None:
        return Geometry(units=8)

    def capacity(self) -> dict[str, str]:
        return {"cpu": "8", "memory": "32Gi"}

    def sample(self) -> Sample:
        return Sample(
            substrate=Substrate.HOST,
            time=self.clock(),
            load=self.load,
            signals={"cpu": self.load, "memory": 0.2},
        )


class FakeApi:
    """An in-memory CapacityNode store speaking server-side apply (as far as the agent needs)."""

    def __init__(self) -> None:
        self.objects: dict[str, JSON] = {}
        self.calls: list[tuple[str, bool]] = []
        self.fail: list[BaseException] = []
        """Raised (in turn) by the next calls."""
        self.fail_status: list[BaseException] = []
        """Raised (in turn) by the next status applies only."""
        self.allocated: JSON | None = None
        self.version = 0

    def apply(self, body: JSON, *, status: bool) -> JSON:
        name = body["metadata"]["name"]
        self.calls.append((name, status))
        if self.fail:
            raise self.fail.pop(0)
        if status and self.fail_status:
            raise self.fail_status.pop(0)
        assert ("status" in body) == status, "spec and status go to their own endpoints"
        assert "spec" not in body or not status
        if status:
            if name not in self.objects:
                raise api_error(404)
            assert "allocated" not in body["status"], "status.allocated belongs to the operator"
            stored = self.objects[name]
            stored["status"] = {**body["status"]}
            if self.allocated is not None:
                stored["status"]["allocated"] = self.allocated
        else:
            stored = self.objects.setdefault(
                name, {"metadata": {"name": name, "generation": 0}, "status": {}}
            )
            if stored.get("spec") != body["spec"]:
                stored["metadata"]["generation"] += 1
            stored["spec"] = body["spec"]
        self.version += 1
        stored["metadata"]["resourceVersion"] = str(self.version)
        copied: JSON = json.loads(json.dumps(stored))
        return copied


def make_publisher(
    clock: Clock,
    collector: Scripted,
    api: FakeApi,
    *,
    heartbeat: int = 3,
    tolerance: float = 0.02,
    metrics: AgentMetrics | None = None,
    sleep: Callable[[float], Any] = asyncio.sleep,
    backoff: Backoff | None = None,
) -> tuple[Publisher, NodeMeasurements]:
    m = NodeMeasurements([collector], stale_after=5.0, node="n1")
    return (
        Publisher(
            "n1",
            m,
            api,
            publish_interval=10.0,
            tolerance=tolerance,
            heartbeat_intervals=heartbeat,
            clock=clock,
            sleep=sleep,
            metrics=metrics,
            backoff=backoff,
        ),
        m,
    )


def cycle(p: Publisher, m: NodeMeasurements, clock: Clock, seconds: int = 10) -> bool:
    """Sample every second for one publish interval, then publish once."""
    for _ in range(seconds):
        clock.now += 1.0
        m.tick(clock.now)
    return asyncio.run(p.publish_once(clock.now))


# ---------------------------------------------------------------------------------------------
# Change detection


def flat_status(**readings: Any) -> dict[str, Any]:
    return flatten({"spec": {"nodeName": "n1"}, "status": readings})


@pytest.mark.parametrize(
    ("before", "after", "ranges", "changed"),
    [
        # summaries: absolute tolerance 0.02
        ({"gates": {"host": {"headroom": 0.50}}}, {"gates": {"host": {"headroom": 0.515}}}, {}, []),
        (
            {"gates": {"host": {"headroom": 0.50}}},
            {"gates": {"host": {"headroom": 0.53}}},
            {},
            ["status.gates.host.headroom"],
        ),
        (
            {"readings": {"host": {"load": {"p95": 0.3}}}},
            {"readings": {"host": {"load": {"p95": 0.1}}}},
            {},
            ["status.readings.host.load.p95"],
        ),
        # spectral readings are scaled by the load's range: noise on a flat node is no change
        (
            {"gates": {"host": {"lambda1": 0.2}}},
            {"gates": {"host": {"lambda1": 0.6}}},
            {"host": 0.01},
            [],
        ),
        (
            {"gates": {"host": {"lambda1": 0.2}}},
            {"gates": {"host": {"lambda1": 0.6}}},
            {"host": 0.5},
            ["status.gates.host.lambda1"],
        ),
        (
            {"readings": {"gpu": {"fingerprint": [0.5, 0.5]}}},
            {"readings": {"gpu": {"fingerprint": [0.1, 0.9]}}},
            {"gpu": 0.04},
            [],
        ),
        (
            {"readings": {"gpu": {"fingerprint": [0.5, 0.5]}}},
            {"readings": {"gpu": {"fingerprint": [0.1, 0.9]}}},
            {"gpu": 0.3},
            ["status.readings.gpu.fingerprint.0", "status.readings.gpu.fingerprint.1"],
        ),
        # PSI is in percent: compared as a fraction
        (
            {"readings": {"host": {"pressure": {"cpu": {"someAvg10": 3.0}}}}},
            {"readings": {"host": {"pressure": {"cpu": {"someAvg10": 4.5}}}}},
            {},
            [],
        ),
        (
            {"readings": {"host": {"pressure": {"cpu": {"someAvg10": 3.0}}}}},
            {"readings": {"host": {"pressure": {"cpu": {"someAvg10": 9.0}}}}},
            {},
            ["status.readings.host.pressure.cpu.someAvg10"],
        ),
        # integers are exact; times and messages never trigger a write
        (
            {"readings": {"host": {"samples": 63, "observedAt": "a"}}},
            {"readings": {"host": {"samples": 64, "observedAt": "b"}}},
            {},
            ["status.readings.host.samples"],
        ),
        (
            {"conditions": [{"type": "Ready", "status": "True", "message": "a"}]},
            {"conditions": [{"type": "Ready", "status": "True", "message": "b"}]},
            {},
            [],
        ),
        (
            {"conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "x"}]},
            {"conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": "y"}]},
            {},
            ["status.conditions.Ready.status"],
        ),
        # a substrate appearing or disappearing is a change
        (
            {"gates": {"host": {"headroom": 0.5}}},
            {"gates": {"host": {"headroom": 0.5}, "gpu": {"headroom": 0.9}}},
            {},
            ["status.gates.gpu.headroom"],
        ),
    ],
)
def test_changes_respect_the_tolerance(
    before: JSON, after: JSON, ranges: dict[str, float], changed: list[str]
) -> None:
    assert (
        changes(flat_status(**before), flat_status(**after), tolerance=0.02, load_ranges=ranges)
        == changed
    )


def test_conditions_are_compared_by_type_not_position() -> None:
    a = {"conditions": [{"type": "Ready", "status": "True"}, {"type": "Stale", "status": "False"}]}
    b = {"conditions": [{"type": "Stale", "status": "False"}, {"type": "Ready", "status": "True"}]}
    assert changes(flat_status(**a), flat_status(**b), tolerance=0.02) == []


def test_spec_changes_are_exact() -> None:
    before = flatten({"spec": {"capacity": {"cpu": "8"}}})
    after = flatten({"spec": {"capacity": {"cpu": "7"}}})
    assert changes(before, after, tolerance=0.5) == ["spec.capacity.cpu"]
    assert changes(None, after, tolerance=0.5) == ["(never published)"]


# ---------------------------------------------------------------------------------------------
# Publishing


def test_steady_node_writes_only_on_heartbeat_and_on_real_change() -> None:
    clock = Clock()
    collector = Scripted(clock, 0.4)
    api = FakeApi()
    metrics = AgentMetrics()
    p, m = make_publisher(clock, collector, api, heartbeat=3, metrics=metrics)
    wrote = [cycle(p, m, clock) for _ in range(7)]
    # first write; the window fills (samples change) for 64 s, so writes continue until full
    assert wrote == [True] * 7
    # window full at 64 samples: from now on only the heartbeat (every 3rd cycle) writes
    wrote = [cycle(p, m, clock) for _ in range(9)]
    assert wrote == [False, False, True] * 3
    assert p.skipped == 6
    assert metrics.value("capacity_agent_publishes_skipped_total", node="n1") == 6
    assert metrics.value("capacity_agent_publishes_total", node="n1") == p.writes == 7 + 3
    # a small wobble is not published (the heartbeat cycle was the last one)
    collector.load = 0.41
    assert cycle(p, m, clock, seconds=1) is False
    # a jump in load beyond the tolerance is published at the next cycle
    collector.load = 0.9
    assert cycle(p, m, clock, seconds=1) is True


def test_status_never_carries_allocated_and_headroom_uses_the_operators_ledger() -> None:
    clock = Clock()
    api = FakeApi()
    api.allocated = {"host": {"share": 0.7, "claims": 1, "holders": []}}
    p, m = make_publisher(clock, Scripted(clock, 0.1), api)
    cycle(p, m, clock)
    assert p.allocated == {"host": 0.7}
    stored = api.objects["n1"]
    assert stored["status"]["allocated"] == api.allocated  # the fake keeps the operator's field
    # the next write's headroom counts the allocation: min(1 - 0.7, 1 - 0.1)
    clock.now += 1
    m.tick(clock.now)
    spec, status = asyncio.run(p.snapshot(clock.now))
    assert "allocated" not in status["status"]
    assert "status" not in spec
    assert status["status"]["gates"]["host"]["headroom"] == pytest.approx(0.3)


def test_status_body_drops_allocated_even_when_given() -> None:
    status = CapacityNodeStatus.model_validate(
        {"allocated": {"host": {"share": 0.5, "claims": 1}}, "conditions": []}
    )
    body = status_body("n1", status)
    assert "allocated" not in body["status"]
    assert body["metadata"] == {"name": "n1"}
    assert set(body) == {"apiVersion", "kind", "metadata", "status"}


def test_deleted_object_is_recreated_by_the_next_write() -> None:
    clock = Clock()
    api = FakeApi()
    p, m = make_publisher(clock, Scripted(clock), api, heartbeat=1)
    cycle(p, m, clock)
    assert api.calls == [("n1", False), ("n1", True)]
    api.calls.clear()
    cycle(p, m, clock)
    assert api.calls == [("n1", True)]  # the spec did not change: status only
    del api.objects["n1"]
    api.calls.clear()
    assert cycle(p, m, clock) is True
    # status 404 -> spec (creates) -> status
    assert api.calls == [("n1", True), ("n1", False), ("n1", True)]
    assert p.recreated == 1
    assert api.objects["n1"]["spec"]["nodeName"] == "n1"
    assert api.objects["n1"]["status"]["readings"]["host"]["samples"] == 30


def test_a_failed_write_leaves_nothing_recorded_and_is_sent_again() -> None:
    clock = Clock()
    collector = Scripted(clock, 0.4)
    api = FakeApi()
    p, m = make_publisher(clock, collector, api, heartbeat=100)
    for _ in range(7):  # fill the window: from now on a steady node is skipped
        cycle(p, m, clock)
    writes = p.writes
    assert cycle(p, m, clock) is False
    collector.load = 0.9
    api.fail_status = [api_error(500)]
    with pytest.raises(ApiError):
        cycle(p, m, clock, seconds=1)
    assert p.writes == writes
    assert api.objects["n1"]["status"]["readings"]["host"]["load"]["max"] == 0.4
    # nothing was recorded as published, so the next cycle is still due and writes
    assert cycle(p, m, clock, seconds=1) is True
    assert api.objects["n1"]["status"]["readings"]["host"]["load"]["max"] == 0.9


def test_published_is_set_by_the_first_write_that_succeeded() -> None:
    # the witness waits on it: its report goes into the object the first write creates
    clock = Clock()
    p, m = make_publisher(clock, Scripted(clock, 0.4), api := FakeApi())
    api.fail = [api_error(503)]
    with pytest.raises(ApiError):
        cycle(p, m, clock)
    assert not p.published.is_set()
    assert cycle(p, m, clock) is True
    assert p.published.is_set()


def test_spec_written_but_status_failed_is_completed_by_the_retry() -> None:
    clock = Clock()
    api = FakeApi()
    p, m = make_publisher(clock, Scripted(clock), api, heartbeat=100)
    api.fail_status = [api_error(500)]
    with pytest.raises(ApiError):
        cycle(p, m, clock)
    assert p.writes == 0
    assert api.objects["n1"]["status"] == {}  # the spec went through, the status did not
    api.calls.clear()
    assert cycle(p, m, clock, seconds=1) is True
    assert api.calls == [("n1", True)]
    assert api.objects["n1"]["status"]["readings"]["host"]["samples"] == 11


def test_status_failure_then_retry_rewrites_the_status() -> None:
    clock = Clock()
    api = FakeApi()
    p, m = make_publisher(clock, Scripted(clock), api, heartbeat=100)
    api.fail = [api_error(503)]
    with pytest.raises(ApiError):
        cycle(p, m, clock)
    assert p.writes == 0
    assert "n1" not in api.objects
    assert cycle(p, m, clock, seconds=1) is True  # the retry is due: nothing was published yet
    assert api.objects["n1"]["status"]["readings"]["host"]["samples"] == 11


def test_generation_is_stamped_on_the_status() -> None:
    clock = Clock()
    api = FakeApi()
    p, m = make_publisher(clock, Scripted(clock), api)
    cycle(p, m, clock)
    status = api.objects["n1"]["status"]
    assert status["observedGeneration"] == 1
    assert {c["observedGeneration"] for c in status["conditions"]} == {1}


# ---------------------------------------------------------------------------------------------
# Through the Kubernetes client (lightkube, against a scripted API server)

NODE_PATH = "/apis/capacity.platform.dev/v1alpha1/capacitynodes/n1"
APPLY = "application/apply-patch+yaml"


def node_answer(generation: int = 1, status: JSON | None = None) -> JSON:
    return {
        "apiVersion": "capacity.platform.dev/v1alpha1",
        "kind": "CapacityNode",
        "metadata": {"name": "n1", "generation": generation, "resourceVersion": "7"},
        "status": status or {},
    }


def test_spec_and_status_are_server_side_applied_under_the_agents_field_manager() -> None:
    server = FakeApiServer(node_answer(), node_answer(status={"allocated": {}}))
    api = KubeNodeApi(server.client())
    spec = {"apiVersion": "capacity.platform.dev/v1alpha1", "kind": "CapacityNode"}
    spec |= {"metadata": {"name": "n1"}, "spec": {"nodeName": "n1"}}
    assert api.apply(spec, status=False)["metadata"]["generation"] == 1
    status = {"apiVersion": "capacity.platform.dev/v1alpha1", "kind": "CapacityNode"}
    status |= {"metadata": {"name": "n1"}, "status": {"observedGeneration": 1}}
    assert api.apply(status, status=True)["status"] == {"allocated": {}}
    query = {"fieldManager": "capacity-agent", "force": "true"}
    assert server.sent(0) == ("PATCH", NODE_PATH, query, APPLY, spec)
    assert server.sent(1) == ("PATCH", f"{NODE_PATH}/status", query, APPLY, status)


def test_a_deleted_object_is_recreated_through_the_client() -> None:
    """The 404 of the status apply, as the client raises it, makes the publisher apply the spec
    again and then the status."""
    clock = Clock()
    server = FakeApiServer(node_answer(), 404, node_answer(), node_answer())
    p, m = make_publisher(clock, Scripted(clock), KubeNodeApi(server.client()))
    assert cycle(p, m, clock) is True
    assert (p.writes, p.recreated, p.generation) == (1, 1, 1)
    paths = [request.url.path for request in server.requests]
    assert paths == [NODE_PATH, f"{NODE_PATH}/status", NODE_PATH, f"{NODE_PATH}/status"]


def test_a_refused_apply_is_raised_with_its_status() -> None:
    clock = Clock()
    server = FakeApiServer(node_answer(), 409)
    p, m = make_publisher(clock, Scripted(clock), KubeNodeApi(server.client()))
    with pytest.raises(ApiError) as info:
        cycle(p, m, clock)
    assert info.value.status.code == 409
    assert p.writes == 0


# ---------------------------------------------------------------------------------------------
# The loop and its backoff


class StopLoopError(Exception):
    pass


class Sleeps:
    """A loop's sleeps, recorded: each moves the clock on (and ticks ``tick`` with the new
    time, when set); the ``stop_after``-th stops the loop with :class:`StopLoopError`."""

    def __init__(self, clock: Clock, stop_after: int) -> None:
        self.clock = clock
        self.stop_after = stop_after
        self.tick: Callable[[float], object] | None = None
        self.seconds: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)
        self.clock.now += seconds
        if self.tick is not None:
            self.tick(self.clock.now)
        if len(self.seconds) == self.stop_after:
            raise StopLoopError


def test_run_retries_with_backoff_then_returns_to_the_interval() -> None:
    clock = Clock()
    api = FakeApi()
    sleep = Sleeps(clock, stop_after=6)
    collector = Scripted(clock)
    p, m = make_publisher(
        clock,
        collector,
        api,
        sleep=sleep,
        backoff=Backoff(initial=1.0, cap=30.0, rng=lambda: 0.0),  # lowest jitter: d / 2
    )
    m.tick(clock.now)
    api.fail = [api_error(500) for _ in range(4)]
    with pytest.raises(StopLoopError):
        asyncio.run(p.run())
    assert sleep.seconds[:4] == [0.5, 1.0, 2.0, 4.0]
    assert sleep.seconds[4:] == [10.0, 10.0]  # publish_interval once it works again
    assert p.failures == 4
    assert (p.writes, p.skipped) == (1, 1)


def test_run_waits_the_stagger_once_after_the_first_write_then_whole_intervals() -> None:
    # nodes started together take different phases of the period (the stagger), so that a
    # process hosting many nodes does not publish all of them in the same instant
    clock = Clock()
    api = FakeApi()
    sleep = Sleeps(clock, stop_after=5)
    p, m = make_publisher(clock, Scripted(clock), api, sleep=sleep)
    sleep.tick = m.tick  # samples keep coming while the loop sleeps
    m.tick(clock.now)
    api.fail = [api_error(500)]  # the first attempt fails: the stagger waits for a success
    with pytest.raises(StopLoopError):
        asyncio.run(p.run(first_delay=2.5, stagger=3.25))
    assert sleep.seconds[0] == 2.5
    assert sleep.seconds[1] < 10.0  # the backoff after the failure
    assert sleep.seconds[2:] == [3.25, 10.0, 10.0]


@pytest.mark.parametrize("draw", [0.0, 0.25, 0.5, 0.999999])
def test_backoff_doubles_to_the_cap_with_jitter_in_half_to_full(draw: float) -> None:
    backoff = Backoff(initial=1.0, cap=30.0, rng=lambda: draw)
    ceilings = [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    delays = [backoff.next() for _ in ceilings]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
        assert delay == pytest.approx(ceiling * (0.5 + 0.5 * draw))
    assert max(delays) <= 30.0
    backoff.reset()
    assert backoff.next() <= 1.0


def test_backoff_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="initial"):
        Backoff(initial=0.0)
    with pytest.raises(ValueError, match="initial"):
        Backoff(initial=5.0, cap=1.0)


# ---------------------------------------------------------------------------------------------
# Size


class Loud(Collector):
    """Every field at its largest: 40 long-named signals, PSI and cgroup limits on every sample,
    and, once ``fail`` is set, long errors (so every substrate is Stale with a long message)."""

    def __init__(self, substrate: Substrate, clock: Clock, name_length: int = 26) -> None:
        self.substrate = substrate
        self.clock = clock
        self.fail = False
        self.rng = random.Random(substrate.value)
        self.names = [f"sensor{i:02d}".ljust(name_length, "x") for i in range(40)]

    def present(self) -> bool:
        return True

    def geometry(self) -> Geometry | None:
        detail = {"sms": 132, "tensorCoresPerSm": 4, "warpSize": 32, "devices": 8}
        return Geometry(units=123_456_789, detail=detail)

    def capacity(self) -> dict[str, str]:
        return {
            "cpu": "191500m",
            "memory": "2199023255552",
            "nvidia.com/gpu": "8",
            "storage-iops": "1000000",
            "network-bandwidth": "12500000000",
            "db-connections": "10000",
        }

    def sample(self) -> Sample:
        if self.fail:
            raise CollectorError("e" * 2000)
        psi = PressureReading(
            some_avg10=99.99, some_avg60=99.99, full_avg10=99.99, full_avg60=99.99
        )
        return Sample(
            substrate=self.substrate,
            time=self.clock(),
            load=self.rng.random(),
            signals={name: self.rng.random() for name in self.names},
            pressure=dict.fromkeys(("cpu", "memory", "io"), psi),
            cgroup=CgroupLimits(
                version=2,
                memory_limit_bytes=2**50,
                cpu_limit_cores=191.5,
                cpu_throttled_fraction=self.rng.random(),
            ),
        )


def full_node(name_length: int = 26) -> tuple[JSON, JSON]:
    """The bodies of a node measuring every substrate with everything at its largest."""
    clock = Clock()
    collectors = [Loud(s, clock, name_length) for s in Substrate]
    m = NodeMeasurements(collectors, stale_after=3.0)
    for _ in range(64):
        clock.now += 1
        m.tick(clock.now)
    for c in collectors:
        c.fail = True
    for _ in range(10):
        clock.now += 1
        m.tick(clock.now)
    p = Publisher("ip-10-0-123-45.eu-west-1.compute.internal", m, FakeApi())
    p.allocated = {s.value: 0.5 for s in Substrate}
    p.generation = 123_456
    return asyncio.run(p.snapshot(clock.now))


def test_a_full_capacity_node_fits_the_agents_share_by_trimming_signals_only() -> None:
    # every substrate, every signal at its longest, every condition at its longest message:
    # about 14 KB untrimmed, more than the agent's 10 KiB (the operator's ledger has the other
    # 6 KiB of the 16 KiB a CapacityNode may take); only per-signal summaries go
    assert MAX_OBJECT_BYTES == NODE_BYTES - LEDGER_BYTES
    spec, status = full_node()
    size = object_size(spec, status)
    assert size < MAX_OBJECT_BYTES, size
    readings = status["status"]["readings"]
    assert set(readings) == {s.value for s in Substrate}
    assert all(0 < len(r["signals"]) < MAX_SIGNALS for r in readings.values())  # the busiest
    assert all(len(r["fingerprint"]) == BINS for r in readings.values())
    assert {c["type"] for c in status["status"]["conditions"]} == {
        "Ready",
        "Stale",
        "MemoryPressure",
        "CPUPressure",
        "IOPressure",
    }
    # the same object as the model sees it
    model = node_object(
        spec["metadata"]["name"],
        CapacityNodeSpec.model_validate(spec["spec"]),
        CapacityNodeStatus.model_validate(status["status"]),
    )
    assert len(json.dumps(model.wire(), separators=(",", ":")).encode()) < MAX_OBJECT_BYTES


def test_signals_with_absurd_names_are_trimmed_to_fit() -> None:
    spec, status = full_node(name_length=200)
    assert object_size(spec, status) < MAX_OBJECT_BYTES
    readings = status["status"]["readings"]
    assert all(r["load"] for r in readings.values())  # load summaries and gates always stay
    assert set(status["status"]["gates"]) == {s.value for s in Substrate}
    assert all(len(r.get("signals", {})) < MAX_SIGNALS for r in readings.values())


def test_published_readings_are_rounded_and_capped() -> None:
    clock = Clock()
    api = FakeApi()
    p, m = make_publisher(clock, Scripted(clock, 0.123456789), api)
    cycle(p, m, clock)
    reading = api.objects["n1"]["status"]["readings"]["host"]
    assert reading["load"]["mean"] == 0.1235
    assert len(reading["fingerprint"]) == BINS


def test_allocated_shares_reads_the_operators_ledger_defensively() -> None:
    body = {
        "status": {
            "allocated": {
                "host": {"share": 0.25},
                "gpu": {"share": "nan"},
                "storage": {"share": 1.5},
                "bad": "x",
            }
        }
    }
    assert allocated_shares(body) == {"host": 0.25, "storage": 1.0}
    assert allocated_shares(None) == {}


# ---------------------------------------------------------------------------------------------
# The Lease (renewed by the same kind of loop, with a backoff bounded by the renew interval)


class FakeLeases:
    def __init__(self) -> None:
        self.renewals: list[tuple[str, str, str, int, float]] = []
        self.fail: list[BaseException] = []

    def renew(
        self, name: str, namespace: str, *, holder: str, duration_seconds: int, now: float
    ) -> None:
        if self.fail:
            raise self.fail.pop(0)
        self.renewals.append((name, namespace, holder, duration_seconds, now))


def test_lease_renews_on_schedule_and_backs_off_within_the_renew_interval() -> None:
    clock = Clock()
    sleep = Sleeps(clock, stop_after=8)
    api = FakeLeases()
    metrics = AgentMetrics()
    renewer = LeaseRenewer(
        "n1",
        "capacity-system",
        api,
        duration_seconds=40,
        renew_interval=10.0,
        clock=clock,
        sleep=sleep,
        metrics=metrics,
    )
    renewer.backoff.rng = lambda: 0.999999  # the longest jitter
    api.fail = [api_error(503) for _ in range(6)]
    assert renewer.last_renewed() is None
    with pytest.raises(StopLoopError):
        asyncio.run(renewer.run())
    # 1, 2, 4, 8, then capped at the renew interval so the 40 s lease survives the outage
    assert sleep.seconds[:6] == pytest.approx([1.0, 2.0, 4.0, 8.0, 10.0, 10.0], rel=1e-5)
    assert sleep.seconds[6:] == [10.0, 10.0]
    assert renewer.failures == 6
    assert metrics.value("capacity_agent_lease_renew_failures_total", node="n1") == 6
    assert [r[:4] for r in api.renewals] == [("n1", "capacity-system", "n1", 40)] * 2
    assert renewer.last_renewed() == api.renewals[-1][4]
    assert metrics.value("capacity_agent_lease_renewals_total", node="n1") == 2


def test_lease_renewals_take_their_stagger_once_after_the_first() -> None:
    clock = Clock()
    sleep = Sleeps(clock, stop_after=3)
    renewer = LeaseRenewer(
        "n1", "capacity-system", FakeLeases(), duration_seconds=40, renew_interval=10.0,
        clock=clock, sleep=sleep,
    )  # fmt: skip
    with pytest.raises(StopLoopError):
        asyncio.run(renewer.run(stagger=7.5))
    assert sleep.seconds == [7.5, 10.0, 10.0]


def test_micro_time_has_six_fractional_digits_in_utc() -> None:
    assert micro_time(0.5) == "1970-01-01T00:00:00.500000Z"
    assert micro_time(T0) == "2027-01-15T08:00:00.000000Z"


# ---------------------------------------------------------------------------------------------
# /metrics and /healthz


def test_health_and_metrics_endpoints() -> None:
    metrics = AgentMetrics()
    metrics.publishes.labels(node="n1").inc()
    healthy = [True]
    app = make_app(metrics.registry, lambda: (healthy[0], "ok" if healthy[0] else "stuck"))

    def get(path: str) -> tuple[str, bytes]:
        seen: list[str] = []
        body = b"".join(
            app({"PATH_INFO": path, "REQUEST_METHOD": "GET"}, lambda s, h: seen.append(s))
        )
        return seen[0], body

    status, body = get("/healthz")
    assert (status, body) == ("200 OK", b"ok\n")
    healthy[0] = False
    status, body = get("/healthz")
    assert status.startswith("503")
    status, body = get("/metrics")
    assert status == "200 OK"
    assert b'capacity_agent_publishes_total{node="n1"} 1.0' in body
    assert get("/nothing")[0].startswith("404")
