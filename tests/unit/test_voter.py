"""The voter's decisions, pure: placement votes on fit with local reservations, witness votes on
liveness."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from capacity_agent.voter import Reservation, VoterNode, decide_placement, decide_witness
from capacity_api.gates import Thresholds
from capacity_api.models import CapacityNode, Substrate, VoteValue

NOW = 1_800_000_000.0


class Window:
    """Measurements of a node whose load sits at ``level``."""

    def __init__(self, level: float, samples: int = 64, age: float = 1.0) -> None:
        self.level, self.count, self.age = level, samples, age
        self.pressure: list[str] = []

    def series(self, substrate: Substrate) -> np.ndarray[Any, Any]:
        rng = np.random.default_rng(3)
        return np.clip(self.level + 0.005 * rng.standard_normal(self.count), 0, 1)

    def samples(self, substrate: Substrate) -> int:
        return self.count

    def newest_time(self, substrate: Substrate) -> float | None:
        return NOW - self.age

    def pressure_conditions(self) -> list[str]:
        return self.pressure


def voter_node(window: Window, renewed: float | None = NOW - 2) -> VoterNode:
    return VoterNode(name="n1", measurements=window, lease_renewed_at=lambda: renewed)


def place(node: VoterNode, share: float, committed: float = 0.0, uid: str = "c1") -> Any:
    return decide_placement(
        node=node,
        claim_uid=uid,
        epoch=3,
        substrate=Substrate.HOST,
        share=share,
        deadline=NOW + 10,
        committed=committed,
        thresholds=Thresholds(),
        now=NOW,
    )


def test_yes_reserves_and_the_reservation_counts_for_the_next_proposal() -> None:
    node = voter_node(Window(0.2))
    first = place(node, 0.4, uid="a")
    assert first.vote.vote is VoteValue.YES
    assert first.reserve == Reservation("host", 0.4, NOW + 10)
    node.reservations[("a", 3)] = first.reserve
    second = place(node, 0.4, uid="b")  # 0.4 reserved + 0.4 leaves isolation 0.2: still fine
    assert second.vote.vote is VoteValue.YES
    node.reservations[("b", 3)] = second.reserve
    third = place(node, 0.2, uid="c")
    assert third.vote.vote is VoteValue.NO
    assert "isolation" in (third.vote.reason or "") or "exceeds capacity" in (
        third.vote.reason or ""
    )
    assert third.vote.readings is not None
    assert third.vote.readings["reserved"] == pytest.approx(0.8)
    assert third.reserve is None


def test_expired_reservations_are_forgotten() -> None:
    node = voter_node(Window(0.2))
    node.reservations[("old", 1)] = Reservation("host", 0.8, NOW - 1)
    assert place(node, 0.5).vote.vote is VoteValue.YES
    assert ("old", 1) not in node.reservations


@pytest.mark.parametrize(
    ("window", "renewed", "reason"),
    [
        (Window(0.2, samples=5), NOW - 2, "minSamples"),
        (Window(0.2, age=120), NOW - 2, "old"),
        (Window(0.9), NOW - 2, "fit_error"),
        (Window(0.2), NOW - 100, "own lease expired"),
        (Window(0.2), None, "own lease expired"),
    ],
    ids=["short-window", "stale-readings", "measured-load", "lease-expired", "never-renewed"],
)
def test_placement_refuses_naming_the_gate(
    window: Window, renewed: float | None, reason: str
) -> None:
    ballot = place(voter_node(window, renewed), 0.3)
    assert ballot.vote.vote is VoteValue.NO
    assert reason in (ballot.vote.reason or "")
    assert ballot.reserve is None


def test_pressure_blocks_yes() -> None:
    window = Window(0.2)
    window.pressure = ["MemoryPressure"]
    ballot = place(voter_node(window), 0.1)
    assert ballot.vote.vote is VoteValue.NO
    assert "MemoryPressure" in (ballot.vote.reason or "")


def capacity_node(name: str, *, ready: bool = True, observed: float = NOW - 2) -> CapacityNode:
    stamp = datetime.fromtimestamp(observed, UTC).isoformat()
    return CapacityNode.model_validate(
        {
            "metadata": {"name": name},
            "spec": {"nodeName": name, "substrates": ["host"]},
            "status": {
                "conditions": [
                    {"type": "Ready", "status": "True" if ready else "False"},
                ],
                "readings": {
                    "host": {
                        "load": {"mean": 0.1, "p95": 0.1, "max": 0.1},
                        "observedAt": stamp,
                        "samples": 64,
                    }
                },
            },
        }
    )


def test_witness_says_yes_only_when_every_placement_node_is_alive() -> None:
    leases = {"a": (NOW - 5, 40.0), "b": (NOW - 100, 40.0)}
    nodes = {"a": capacity_node("a"), "b": capacity_node("b")}
    yes = decide_witness(epoch=2, placement=["a"], leases=leases, nodes=nodes, max_age=30, now=NOW)
    assert yes.vote is VoteValue.YES
    no = decide_witness(
        epoch=2, placement=["a", "b"], leases=leases, nodes=nodes, max_age=30, now=NOW
    )
    assert no.vote is VoteValue.NO
    assert "b: lease expired 60s ago" in (no.reason or "")
    stale = decide_witness(
        epoch=2,
        placement=["a"],
        leases=leases,
        nodes={"a": capacity_node("a", observed=NOW - 300)},
        max_age=30,
        now=NOW,
    )
    assert stale.vote is VoteValue.NO
    assert "readings stale" in (stale.reason or "")
    missing = decide_witness(epoch=2, placement=["z"], leases={}, nodes={}, max_age=30, now=NOW)
    assert "z: no lease" in (missing.reason or "")
