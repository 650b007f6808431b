"""Truth decisions (capacity_api.truth): evidence from pods and nodes, verdicts over the period."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from capacity_api import truth
from capacity_api.models import CapacityNode, Evidence, Phase, Verdict

T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
PERIOD = timedelta(seconds=60)


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def pod(name: str = "web-1", node: str = "n1", **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"nodeName": node}, "status": status}


def terminated(reason: str, exit_code: int, at: datetime) -> dict[str, Any]:
    return {"terminated": {"reason": reason, "exitCode": exit_code, "finishedAt": iso(at)}}


def test_an_oom_kill_after_admission_is_evidence_with_pod_container_node_and_time() -> None:
    at = T0 + timedelta(seconds=5)
    p = pod(
        containerStatuses=[
            {"name": "hog", "restartCount": 0, "state": terminated("OOMKilled", 137, at)}
        ]
    )
    (e,) = truth.pod_evidence(p, T0, restart_limit=3)
    assert (e.kind, e.pod, e.container, e.node, e.reason, e.time) == (
        "OOMKilled", "web-1", "hog", "n1", "OOMKilled", at
    )  # fmt: skip
    # the same container restarted: the OOM kill is in lastState
    p = pod(
        containerStatuses=[
            {"name": "hog", "restartCount": 1, "state": {"running": {}},
             "lastState": terminated("OOMKilled", 137, at)}
        ]
    )  # fmt: skip
    assert [e.kind for e in truth.pod_evidence(p, T0, restart_limit=3)] == ["OOMKilled"]


def test_container_times_count_at_whole_seconds() -> None:
    """An OOM kill in the same second as the admission reads as that whole second."""
    since = T0 + timedelta(milliseconds=900)
    same_second = pod(containerStatuses=[{"name": "c", "state": terminated("OOMKilled", 137, T0)}])
    assert [e.kind for e in truth.pod_evidence(same_second, since, 3)] == ["OOMKilled"]
    before = T0 - timedelta(seconds=1)
    earlier = pod(containerStatuses=[{"name": "c", "state": terminated("OOMKilled", 137, before)}])
    assert truth.pod_evidence(earlier, since, 3) == []


def test_an_oom_kill_before_the_admission_is_not_evidence() -> None:
    before = T0 - timedelta(seconds=1)
    p = pod(
        containerStatuses=[
            {"name": "c", "restartCount": 1, "lastState": terminated("OOMKilled", 137, before)}
        ]
    )
    assert truth.pod_evidence(p, T0, restart_limit=3) == []


def test_eviction_and_repeated_sigkill_restarts_are_evidence_plain_errors_are_not() -> None:
    evicted = pod(reason="Evicted", message="The node was low on resource: memory.")
    (e,) = truth.pod_evidence(evicted, T0, restart_limit=3)
    assert (e.kind, e.reason, e.message) == (
        "Evicted",
        "Evicted",
        "The node was low on resource: memory.",
    )
    at = T0 + timedelta(seconds=9)
    killed = {"name": "c", "restartCount": 3, "lastState": terminated("Error", 137, at)}
    (e,) = truth.pod_evidence(pod(containerStatuses=[killed]), T0, restart_limit=3)
    assert (e.kind, e.container) == ("RepeatedRestarts", "c")
    assert truth.pod_evidence(pod(containerStatuses=[{**killed, "restartCount": 2}]), T0, 3) == []
    crashed = {"name": "c", "restartCount": 9, "lastState": terminated("Error", 1, at)}
    assert truth.pod_evidence(pod(containerStatuses=[crashed]), T0, 3) == []


def test_malformed_pods_give_no_evidence_and_never_raise() -> None:
    unreadable = {"terminated": {"reason": "OOMKilled", "finishedAt": "garbage"}}
    for bad in (
        {},
        {"status": None},
        {"metadata": "x", "status": {"containerStatuses": [{"name": "c"}]}},
        pod(containerStatuses=[{"name": "c", "restartCount": "x", "lastState": {"terminated": 1}}]),
    ):
        assert truth.pod_evidence(bad, T0, restart_limit=3) == []
    # an OOM kill whose time cannot be read still counts: nothing proves it came before
    (e,) = truth.pod_evidence(pod(containerStatuses=[{"name": "c", "state": unreadable}]), T0, 3)
    assert (e.kind, e.time) == ("OOMKilled", None)


def cnode(name: str, **pressure: str) -> CapacityNode:
    conditions = [
        {"type": kind, "status": status, "reason": "PSIAboveThreshold", "message": f"{kind} high",
         "lastTransitionTime": iso(T0 + timedelta(seconds=3))}
        for kind, status in pressure.items()
    ]  # fmt: skip
    return CapacityNode.model_validate(
        {
            "metadata": {"name": name},
            "spec": {"nodeName": name},
            "status": {"conditions": conditions},
        }
    )


def test_pressure_on_a_placement_node_is_evidence() -> None:
    (e,) = truth.node_evidence(cnode("n1", MemoryPressure="True", CPUPressure="False"), T0)
    assert (e.kind, e.node, e.reason) == ("NodePressure", "n1", "MemoryPressure")
    assert truth.node_evidence(cnode("n1", MemoryPressure="False"), T0) == []


def test_the_kubelets_pressure_on_a_placement_node_is_evidence() -> None:
    conditions = [
        {"type": "Ready", "status": "True"},
        {"type": "MemoryPressure", "status": "True", "message": "kubelet has insufficient memory",
         "lastTransitionTime": iso(T0 + timedelta(seconds=5))},
        {"type": "DiskPressure", "status": "False"},
        {"type": "PIDPressure", "status": "Unknown"},
    ]  # fmt: skip
    kept = truth.kubelet_pressure(conditions)
    assert [c["type"] for c in kept] == ["MemoryPressure"]
    (e,) = truth.kubelet_evidence("n1", kept, T0)
    assert (e.kind, e.node, e.reason) == ("NodePressure", "n1", "MemoryPressure")
    assert e.message == "kubelet: kubelet has insufficient memory"
    assert e.time == T0 + timedelta(seconds=5)
    # a condition older than the admission counts from the admission (it was there while placed)
    (old,) = truth.kubelet_evidence("n1", kept, T0 + timedelta(minutes=1))
    assert old.time == T0 + timedelta(minutes=1)
    assert truth.kubelet_pressure([{"type": "MemoryPressure", "status": "False"}]) == []


def test_an_admission_is_falsified_at_once_or_confirmed_at_the_end_and_then_stays() -> None:
    t = truth.start(Phase.ADMITTED, T0, PERIOD)
    assert truth.judge_admitted(t, [], T0 + timedelta(seconds=30)).verdict is Verdict.OBSERVING
    done = truth.judge_admitted(t, [], T0 + PERIOD)
    assert (done.verdict, done.decided_at) == (Verdict.CONFIRMED, T0 + PERIOD)
    oom = Evidence(kind="OOMKilled", pod="p", container="c", node="n1", reason="OOMKilled", time=T0)
    falsified = truth.judge_admitted(t, [oom, oom], T0 + timedelta(seconds=1))
    assert falsified.verdict is Verdict.FALSIFIED
    assert falsified.evidence == [oom]  # repeats folded
    assert "OOMKilled pod p/c on n1" in truth.summary(falsified)
    # final verdicts do not change
    assert truth.judge_admitted(done, [oom], T0 + PERIOD * 2) == done
    assert truth.judge_admitted(falsified, [], T0 + PERIOD * 2) == falsified


def test_evidence_is_bounded() -> None:
    many = [Evidence(kind="OOMKilled", pod=f"p{i}", reason="OOMKilled") for i in range(20)]
    t = truth.judge_admitted(truth.start(Phase.ADMITTED, T0, PERIOD), many, T0)
    assert len(t.evidence or []) == truth.MAX_EVIDENCE


def test_a_rejection_is_a_missed_opportunity_only_if_enough_nodes_kept_room_all_period() -> None:
    ask = truth.Rejection(shares={"a": 0.3, "b": 0.3, "c": 0.3}, replicas=2)
    t = truth.start(Phase.REJECTED, T0, PERIOD)
    t = truth.judge_rejected(t, ask, {"a": 0.8, "b": 0.6, "c": 0.1}, T0 + timedelta(seconds=10))
    assert t.verdict is Verdict.OBSERVING
    t = truth.judge_rejected(t, ask, {"a": 0.7, "b": 0.5, "c": 0.9}, T0 + timedelta(seconds=20))
    assert t.headroom == {"a": 0.7, "b": 0.5, "c": 0.1}  # the lowest seen
    missed = truth.judge_rejected(t, ask, {"a": 0.7, "b": 0.5, "c": 0.9}, T0 + PERIOD)
    assert missed.verdict is Verdict.MISSED_OPPORTUNITY
    # one dip of b below the share: only one node would have held it all along
    dipped = truth.judge_rejected(t, ask, {"a": 0.7, "b": 0.2, "c": 0.9}, T0 + PERIOD)
    assert dipped.verdict is Verdict.RIGHTLY_REJECTED
    # a node without readings counts as no room
    gone = truth.judge_rejected(t, ask, {"a": 0.7, "b": None}, T0 + PERIOD)
    assert gone.verdict is Verdict.RIGHTLY_REJECTED
    assert gone.headroom == {"a": 0.7, "b": 0.0, "c": 0.0}
    # no node could ever hold it: never a missed opportunity
    never = truth.judge_rejected(
        truth.start(Phase.REJECTED, T0, PERIOD), truth.Rejection({}, 1), {}, T0 + PERIOD
    )
    assert never.verdict is Verdict.RIGHTLY_REJECTED
