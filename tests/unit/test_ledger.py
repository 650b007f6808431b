"""The in-memory ledger: a pure function of the claims' status, plus the commits being written."""

from __future__ import annotations

from typing import Any

import pytest

from capacity_api.ledger import Ledger
from capacity_api.models import CapacityClaim, Holder

pytestmark = pytest.mark.unit


def claim(
    uid: str,
    phase: str,
    version: int,
    *,
    nodes: tuple[str, ...] = ("a",),
    share: float = 0.2,
    epoch: int = 1,
) -> CapacityClaim:
    status: dict[str, Any] = {"phase": phase}
    if phase in ("Admitted", "Recovering"):
        status["placements"] = [
            {"node": n, "substrate": "host", "share": share, "epoch": epoch} for n in nodes
        ]
    return CapacityClaim.model_validate(
        {
            "metadata": {"name": uid, "namespace": "ns", "uid": uid,
                         "resourceVersion": str(version)},
            "spec": {"cGeo": share},
            "status": status,
        }
    )  # fmt: skip


def share(ledger: Ledger, node: str) -> float:
    alloc = ledger.allocations(node).get("host")
    return alloc.share if alloc else 0.0


def test_holders_follow_the_claims_status_and_only_newer_versions_count() -> None:
    ledger = Ledger()
    assert not ledger.observe(claim("u1", "Voting", 5))
    assert ledger.allocations("a") == {}
    assert not ledger.observe(claim("u1", "Admitted", 6, nodes=("a", "b")))
    assert share(ledger, "a") == share(ledger, "b") == pytest.approx(0.2)
    assert ledger.claims_on("a") == {"ns/u1"}
    # an older event (a watch behind our own write) changes nothing
    assert not ledger.observe(claim("u1", "Voting", 5))
    assert share(ledger, "a") == pytest.approx(0.2)
    # Failed holds nothing: room is freed on both nodes
    assert ledger.observe(claim("u1", "Failed", 7, nodes=("a", "b")))
    assert ledger.allocations("a") == ledger.allocations("b") == {}
    assert set(ledger.dirty) == {"a", "b"}


def test_a_recovery_moves_the_holder_and_a_deletion_frees_everything() -> None:
    ledger = Ledger()
    ledger.observe(claim("u1", "Admitted", 1, nodes=("a", "b")))
    ledger.observe(claim("u1", "Recovering", 2, nodes=("a", "b")))  # the lost node still held
    assert share(ledger, "b") == pytest.approx(0.2)
    moved = claim("u1", "Admitted", 3, nodes=("a", "c"), epoch=2)
    assert ledger.observe(moved)  # b is freed
    assert ledger.nodes_of("u1") == {"a", "c"}
    assert ledger.forget("u1")
    assert ledger.nodes_of("u1") == set()
    assert "u1" not in ledger.uids()


def test_a_commit_being_written_counts_until_its_claim_is_seen_at_a_newer_version() -> None:
    ledger = Ledger()
    ledger.observe(claim("u1", "Voting", 10))
    h = Holder(claim="ns/u1", uid="u1", epoch=1, share=0.3)
    ledger.hold("u1", {("a", "host"): h}, "10")
    assert share(ledger, "a") == pytest.approx(0.3)
    assert ledger.holds("a", "u1")
    # the same version again (a late event of what the commit was decided on): still held
    ledger.observe(claim("u1", "Voting", 10))
    assert share(ledger, "a") == pytest.approx(0.3)
    # the write's response: the status says it now, and the hold is gone
    ledger.observe(claim("u1", "Admitted", 11, share=0.3))
    assert share(ledger, "a") == pytest.approx(0.3)
    assert ledger.unhold("u1") is False  # nothing held beyond the status


def test_a_failed_commit_write_frees_its_hold_and_an_unknown_outcome_keeps_it() -> None:
    ledger = Ledger()
    ledger.observe(claim("u1", "Voting", 10))
    h = Holder(claim="ns/u1", uid="u1", epoch=1, share=0.3)
    ledger.hold("u1", {("a", "host"): h}, "10")
    assert ledger.unhold("u1")  # refused: room freed
    assert ledger.allocations("a") == {}
    # a write whose outcome is unknown keeps holding until the claim is seen again: here it
    # did not land (the claim moved on without an admission), and the hold goes
    ledger.hold("u1", {("a", "host"): h}, "10")
    ledger.observe(claim("u1", "Voting", 12))
    assert ledger.allocations("a") == {}


def test_a_recovery_commit_onto_a_node_the_claim_holds_replaces_its_older_holder() -> None:
    ledger = Ledger()
    ledger.observe(claim("u1", "Recovering", 4, nodes=("a",), share=0.2))
    newer = Holder(claim="ns/u1", uid="u1", epoch=3, share=0.2)
    ledger.hold("u1", {("a", "host"): newer}, "4")
    assert share(ledger, "a") == pytest.approx(0.2)  # counted once
    assert [x.epoch for x in ledger.allocations("a")["host"].holders] == [3]
