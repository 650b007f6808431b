"""Pure decisions of failure detection and recovery: liveness, partition, what a claim does,
where its lost share goes, the rate limit, trust after return, and who acts under peering."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from capacity_api.admission import NoPlacement, PlacementPlan
from capacity_api.lease import LeaseInfo
from capacity_api.models import CapacityClaim, Substrate
from capacity_api.recovery import (
    Decision,
    Liveness,
    TokenBucket,
    assess,
    decide,
    expired_seconds,
    partition,
    peering_active,
    plan_recovery,
    recovery_moves,
    stranded_on,
    trusted_again,
)
from tests.unit.test_admission import node, view

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def lease(name: str, renewed_ago: float | None, duration: int = 10) -> LeaseInfo:
    renew = None if renewed_ago is None else NOW - timedelta(seconds=renewed_ago)
    return LeaseInfo(name=name, renew_time=renew, duration_seconds=duration)


@pytest.mark.parametrize(
    ("renewed_ago", "expected"),
    [
        (5, Liveness.ALIVE),
        (10, Liveness.ALIVE),
        (12, Liveness.SUSPECT),
        (14.9, Liveness.SUSPECT),
        (15, Liveness.FAILED),
        (None, Liveness.FAILED),
    ],
)
def test_liveness_from_the_lease_and_the_grace_period(
    renewed_ago: float | None, expected: Liveness
) -> None:
    assert assess(lease("n", renewed_ago), NOW, failure_grace_seconds=5) is expected


def test_no_lease_is_expired_since_forever() -> None:
    assert expired_seconds(None, NOW) == float("inf")
    assert expired_seconds(lease("n", 3), NOW) is None


@pytest.mark.parametrize(
    ("dead", "total", "partitioned"), [(0, 10, False), (1, 10, False), (5, 10, False),
                                       (6, 10, True), (1, 1, True), (1, 3, False), (2, 3, True)],
)  # fmt: skip
def test_more_than_half_expired_is_a_partition(dead: int, total: int, partitioned: bool) -> None:
    leases = {f"n{i}": lease(f"n{i}", 60 if i < dead else 1) for i in range(total)}
    check = partition(leases, NOW, 0.5)
    assert check.partitioned is partitioned
    assert check.expired == dead
    assert f"{dead} of {total} node leases expired" in check.message


def admitted(
    nodes: tuple[str, ...] = ("a", "b"), recovery: dict[str, Any] | None = None,
    recoveries: int = 0, phase: str = "Admitted",
) -> CapacityClaim:  # fmt: skip
    spec: dict[str, Any] = {"cGeo": 0.2, "replicas": len(nodes)}
    if recovery is not None:
        spec["recovery"] = recovery
    return CapacityClaim.model_validate(
        {
            "metadata": {"name": "c", "namespace": "ns", "uid": "u1"},
            "spec": spec,
            "status": {
                "phase": phase,
                "placements": [
                    {"node": n, "substrate": "host", "share": 0.2, "epoch": 1} for n in nodes
                ],
                "recoveries": [
                    {"from": "x", "to": "y", "at": NOW.isoformat(), "reason": "r", "epoch": 1}
                ]
                * recoveries,
            },
        }
    )


def test_a_claim_off_the_failed_nodes_is_unaffected() -> None:
    assert decide(admitted(), {"z"}).decision is Decision.UNAFFECTED
    assert decide(admitted(phase="Recovering"), {"a"}).decision is Decision.UNAFFECTED


def test_a_claim_on_a_failed_node_recovers_the_lost_part_only() -> None:
    decision = decide(admitted(), {"b", "z"})
    assert decision.decision is Decision.RECOVER
    assert decision.lost == ("b",)
    assert "placement node b failed" in decision.message


def test_policy_none_fails_the_claim_with_the_reason() -> None:
    decision = decide(admitted(recovery={"policy": "None"}), {"a"})
    assert decision.decision is Decision.FAIL
    assert decision.reason == "NodeFailed"
    assert "spec.recovery.policy is None" in decision.message


def test_max_recoveries_bounds_the_moves() -> None:
    claim = admitted(recovery={"policy": "Replace", "maxRecoveries": 2}, recoveries=2)
    decision = decide(claim, {"a"})
    assert decision.decision is Decision.FAIL
    assert decision.reason == "MaxRecoveriesReached"


def test_recovery_places_the_lost_share_away_from_failed_and_surviving_nodes() -> None:
    views = [view(node(n)) for n in ("a", "b", "c", "d")]
    plan = plan_recovery(admitted(("a", "b")), Substrate.HOST, views, ["b"])
    assert isinstance(plan, PlacementPlan)
    assert len(plan.placement) == 1
    assert plan.placement[0] in {"c", "d"}
    assert "b" not in plan.voters


def test_recovery_with_no_other_node_has_no_placement() -> None:
    views = [view(node(n)) for n in ("a", "b")]
    plan = plan_recovery(admitted(("a", "b")), Substrate.HOST, views, ["b"])
    assert isinstance(plan, NoPlacement)


def test_a_lost_node_trusted_again_may_take_its_share_back() -> None:
    views = [view(node(n)) for n in ("a", "b")]
    claim = admitted(("a", "b"))
    # b is still failed (or back, not trusted yet): nowhere to go
    assert isinstance(
        plan_recovery(claim, Substrate.HOST, views, ["b"], distrusted=["b"]), NoPlacement
    )
    # trusted again: b takes its own share back; a, which holds the other share, never does
    plan = plan_recovery(claim, Substrate.HOST, views, ["b"], distrusted=[])
    assert isinstance(plan, PlacementPlan)
    assert plan.placement == ["b"]


def test_recovery_moves_pair_lost_nodes_with_new_ones_and_a_returned_node_with_itself() -> None:
    assert recovery_moves(["x"], ["y"]) == {"x": "y"}
    assert recovery_moves(["x", "y"], ["z", "x"]) == {"x": "x", "y": "z"}
    assert recovery_moves(["y", "x"], ["z", "w"]) == {"x": "z", "y": "w"}


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(per_minute=60, burst=2)
    assert bucket.take(NOW)
    assert bucket.take(NOW)
    assert not bucket.take(NOW)
    assert not bucket.take(NOW + timedelta(seconds=0.5))
    assert bucket.take(NOW + timedelta(seconds=1.1))


def _node_observed(at: datetime, samples: int) -> Any:
    n = node("a")
    assert n.status is not None
    readings = n.status.readings or {}
    for reading in readings.values():
        reading.observed_at = at
        reading.samples = samples
    return n


def test_a_returning_node_is_trusted_only_after_a_full_window_since_it_came_back() -> None:
    back = NOW - timedelta(seconds=5)
    live = lease("a", 1)
    assert not trusted_again(_node_observed(back - timedelta(seconds=1), 64), live, back, NOW, 16)
    assert not trusted_again(_node_observed(NOW, 3), live, back, NOW, 16)
    assert not trusted_again(_node_observed(NOW, 64), lease("a", 60), back, NOW, 16)
    assert trusted_again(_node_observed(NOW, 16), live, back, NOW, 16)


def peer(priority: int, seen_ago: float, lifetime: int = 60) -> dict[str, Any]:
    seen = (NOW - timedelta(seconds=seen_ago)).isoformat()
    return {"priority": priority, "lastseen": seen, "lifetime": lifetime}


def test_only_the_highest_live_priority_acts() -> None:
    assert peering_active({"me": peer(5, 1)}, 5, NOW)
    assert not peering_active({"me": peer(5, 1), "other": peer(9, 1)}, 5, NOW)
    assert peering_active({"me": peer(5, 1), "gone": peer(9, 120)}, 5, NOW)
    assert not peering_active({"me": peer(5, 1), "twin": peer(5, 1)}, 5, NOW)
    assert peering_active(None, 5, NOW)


def test_pods_stranded_by_a_failed_node() -> None:
    def pod(node: str | None = None, bound: list[str] | None = None) -> dict[str, Any]:
        spec: dict[str, Any] = {"nodeName": node} if node else {}
        if bound is not None:
            expr = {"key": "kubernetes.io/hostname", "operator": "In", "values": bound}
            spec["affinity"] = {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchExpressions": [expr]}]
                    }
                }
            }
        return {"spec": spec}

    assert stranded_on(pod("b"), ["b"]) == "on failed node b"
    assert stranded_on(pod("a"), ["b"]) is None
    assert stranded_on(pod(None, ["b"]), ["b"]) == "unscheduled, bound to the failed node"
    assert stranded_on(pod(None, ["c"]), ["b"]) is None
    assert stranded_on(pod(), ["b"]) is None


def test_the_grace_runs_from_when_this_operator_first_saw_the_expiry() -> None:
    stale = lease("n", 600)  # expired ten minutes ago, e.g. while no operator ran
    assert assess(stale, NOW, 5, seen_expired_since=NOW) is Liveness.SUSPECT
    assert assess(stale, NOW, 5, seen_expired_since=NOW - timedelta(seconds=5)) is Liveness.FAILED
    assert assess(lease("n", 12), NOW, 5, seen_expired_since=NOW - timedelta(days=1)) is (
        Liveness.SUSPECT
    )
