"""Pure decisions of quorum admission: shares, placement, tally and the ledger."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capacity_api.admission import (
    ATTEST_AHEAD,
    LEDGER_BYTES,
    NODE_BYTES,
    Action,
    ClaimError,
    NodeView,
    NoPlacement,
    Outcome,
    PlacementPlan,
    admit_order,
    allocated_share,
    attested_vote,
    ballot_votes,
    claim_substrate,
    claim_watch_fields,
    expected_holders,
    ledger_bytes,
    ledger_estimate,
    ledger_full,
    new_proposal,
    next_step,
    no_room,
    node_facts,
    node_share,
    node_staleness,
    plan_placement,
    proposal_open,
    quorum,
    room_grew,
    tally,
    wake_at,
    with_ballot_votes,
)
from capacity_api.models import (
    CapacityClaim,
    CapacityClaimSpec,
    CapacityNode,
    Holder,
    Proposal,
    Substrate,
    Vote,
    VoterRole,
    VoteValue,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def spec(**kw: Any) -> CapacityClaimSpec:
    return CapacityClaimSpec.model_validate(kw)


def node(
    name: str,
    *,
    cpu: str = "8",
    memory: str = "32Gi",
    p95: float = 0.2,
    holders: list[Holder] | None = None,
    substrates: tuple[str, ...] = ("host",),
    extra_capacity: dict[str, str] | None = None,
) -> CapacityNode:
    status: dict[str, Any] = {
        "readings": {
            "host": {
                "load": {"mean": p95, "p95": p95, "max": p95},
                "observedAt": NOW.isoformat(),
                "samples": 64,
            }
        }
    }
    if holders:
        share = sum(h.share for h in holders)
        status["allocated"] = {
            "host": {
                "share": share,
                "claims": len(holders),
                "holders": [h.model_dump(by_alias=True) for h in holders],
            }
        }
    return CapacityNode.model_validate(
        {
            "metadata": {"name": name},
            "spec": {
                "nodeName": name,
                "substrates": list(substrates),
                "capacity": {"cpu": cpu, "memory": memory, **(extra_capacity or {})},
            },
            "status": status,
        }
    )


def view(n: CapacityNode, *, fresh: bool = True, lease: bool = True) -> NodeView:
    return NodeView(name=n.metadata.name or "", node=n, lease_live=lease, fresh=fresh)


def holder(uid: str, share: float, epoch: int = 1, claim: str = "ns/c") -> Holder:
    return Holder(claim=claim, uid=uid, epoch=epoch, share=share)


# -- shares and substrates ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claim_spec", "expected"),
    [
        ({"resources": {"cpu": "2", "memory": "4Gi"}}, Substrate.HOST),
        ({"resources": {"nvidia.com/gpu": 1}}, Substrate.GPU),
        ({"resources": {"db-connections": 10}}, Substrate.DATABASE),
        ({"cGeo": 0.3}, Substrate.HOST),
        ({"cInt": 0.3, "substrate": "network"}, Substrate.NETWORK),
    ],
)
def test_claim_substrate(claim_spec: dict[str, Any], expected: Substrate) -> None:
    assert claim_substrate(spec(**claim_spec)) is expected


@pytest.mark.parametrize(
    ("claim_spec", "reason"),
    [
        ({"resources": {"nvidia.com/gpu": 1, "db-connections": 3}}, "AmbiguousSubstrate"),
        ({"resources": {"cpu": "1"}, "substrate": "gpu"}, "ResourceSubstrateMismatch"),
    ],
)
def test_claim_substrate_refuses(claim_spec: dict[str, Any], reason: str) -> None:
    with pytest.raises(ClaimError) as info:
        claim_substrate(spec(**claim_spec))
    assert info.value.reason == reason


def test_node_share_is_the_worst_dimension() -> None:
    n = node("a", cpu="8", memory="32Gi")
    assert node_share(spec(resources={"cpu": "2", "memory": "16Gi"}), Substrate.HOST, n) == 0.5
    assert node_share(spec(resources={"cpu": "500m"}), Substrate.HOST, n) == pytest.approx(1 / 16)
    assert node_share(spec(cGeo=0.2, cInt=0.3), Substrate.HOST, n) == 0.3
    assert node_share(spec(resources={"nvidia.com/gpu": 1}), Substrate.GPU, n) is None


# -- placement ---------------------------------------------------------------------------------


def test_placement_ranks_by_headroom_and_adds_witnesses() -> None:
    nodes = [view(node("a", p95=0.5)), view(node("b", p95=0.1)), view(node("c", p95=0.3))]
    plan = plan_placement(spec(cGeo=0.2), Substrate.HOST, nodes)
    assert isinstance(plan, PlacementPlan)
    assert plan.placement == ["b"]
    assert plan.witnesses == ["a", "c"]  # at least 3 voters by default; by name, not room
    assert plan.share == pytest.approx(0.2)


def test_placement_fills_the_nodes_of_open_proposals_first_while_they_have_room() -> None:
    nodes = [view(node("a", p95=0.5)), view(node("b", p95=0.1)), view(node("c", p95=0.3))]
    plan = plan_placement(spec(cGeo=0.2), Substrate.HOST, nodes, pack={"a": 1, "c": 1})
    assert isinstance(plan, PlacementPlan)
    assert plan.placement == ["c"]  # asked already, and the more headroom of the two
    # the node most open proposals ask goes first, even with less headroom: one node, not
    # several taking turns, answers a busy moment's proposals in one ballot write
    plan = plan_placement(spec(cGeo=0.2), Substrate.HOST, nodes, pack={"a": 2, "c": 1})
    assert isinstance(plan, PlacementPlan)
    assert plan.placement == ["a"]
    # where the next claims go once "a" is full, in the same order: named for the witnesses
    # to attest ahead
    assert plan.ahead == ["c", "b"]
    # a packed node without room for it is passed over: headroom decides among the others
    full = [view(node("a", holders=[holder("x", 0.7)])), view(node("b")), view(node("c"))]
    plan = plan_placement(spec(cGeo=0.2), Substrate.HOST, full, pack={"a": 1}, min_isolation=0.15)
    assert isinstance(plan, PlacementPlan)
    assert plan.placement == ["b"]


def test_placement_counts_holders_and_skips_stale_and_refusing_nodes() -> None:
    full = node("full", p95=0.0, holders=[holder("x", 0.9)])
    stale = node("stale", p95=0.0)
    ok = node("ok", p95=0.6)
    refused = node("refused", p95=0.0)
    nodes = [view(full), view(stale, fresh=False), view(ok), view(refused)]
    plan = plan_placement(spec(cGeo=0.2), Substrate.HOST, nodes, excluded=["refused"])
    assert isinstance(plan, PlacementPlan)
    assert plan.placement == ["ok"]


def test_claim_bigger_than_any_node_is_final() -> None:
    nodes = [view(node("a", cpu="8")), view(node("b", cpu="16"))]
    plan = plan_placement(spec(resources={"cpu": "64"}), Substrate.HOST, nodes)
    assert isinstance(plan, NoPlacement)
    assert plan.final
    assert plan.reason == "ExceedsNodeCapacity"
    assert "4.00 of the largest host node" in plan.message


def test_no_usable_node_waits_instead_of_rejecting() -> None:
    plan = plan_placement(spec(cGeo=0.1), Substrate.HOST, [view(node("a"), lease=False)])
    assert isinstance(plan, NoPlacement)
    assert plan.wait
    assert not plan.final
    empty = plan_placement(spec(cGeo=0.1), Substrate.HOST, [])
    assert isinstance(empty, NoPlacement)
    assert empty.wait


def test_full_cluster_is_insufficient_capacity_with_per_node_reasons() -> None:
    nodes = [view(node("a", holders=[holder("x", 0.95)]))]
    plan = plan_placement(spec(cGeo=0.1), Substrate.HOST, nodes)
    assert isinstance(plan, NoPlacement)
    assert plan.reason == "InsufficientCapacity"
    assert "a: allocated 0.95 + request 0.10 exceeds capacity" in plan.message
    assert not plan.final  # the holder may leave: the claim may wait for it


def test_a_claim_that_would_not_fit_even_on_empty_nodes_is_final() -> None:
    # theta_iso 0.5 leaves room for at most 0.5 of an empty node: 0.6 never fits, whatever
    # leaves; 0.4 fits once the holder of 0.3 leaves
    nodes = [view(node("a", holders=[holder("x", 0.3)]))]
    never = plan_placement(spec(cGeo=0.6), Substrate.HOST, nodes, min_isolation=0.5)
    assert isinstance(never, NoPlacement)
    assert (never.reason, never.final) == ("InsufficientCapacity", True)
    assert "isolation" in never.message
    later = plan_placement(spec(cGeo=0.4), Substrate.HOST, nodes, min_isolation=0.5)
    assert isinstance(later, NoPlacement)
    assert not later.final
    # two replicas and one usable node: not enough nodes, however empty
    pair = plan_placement(spec(cGeo=0.1, replicas=2), Substrate.HOST, nodes)
    assert isinstance(pair, NoPlacement)
    assert pair.final


def test_reserved_shares_of_open_proposals_count() -> None:
    n = node("a", p95=0.0)
    reserved = NodeView(name="a", node=n, lease_live=True, fresh=True, reserved={"host": 0.95})
    plan = plan_placement(spec(cGeo=0.1), Substrate.HOST, [reserved])
    assert isinstance(plan, NoPlacement)


# -- tally -------------------------------------------------------------------------------------


def proposal(placement: list[str], voters: list[str], epoch: int = 2) -> Proposal:
    return Proposal(
        epoch=epoch, placement=placement, voters=voters, deadline=NOW + timedelta(seconds=10)
    )


def vote(value: str, epoch: int = 2, role: str = "placement", reason: str = "") -> Vote:
    return Vote(
        vote=VoteValue(value), role=VoterRole(role), epoch=epoch, reason=reason or None, time=NOW
    )


def test_commit_needs_every_placement_yes_and_a_majority() -> None:
    p = proposal(["a"], ["a", "b", "c"])
    assert tally(p, {"a": vote("YES"), "b": vote("YES", role="witness")}, NOW).outcome is (
        Outcome.COMMIT
    )
    assert tally(p, {"a": vote("YES")}, NOW).outcome is Outcome.WAIT
    assert tally(p, {"b": vote("YES"), "c": vote("YES")}, NOW).outcome is Outcome.WAIT


def test_placement_no_aborts_with_its_reason() -> None:
    p = proposal(["a"], ["a", "b", "c"])
    result = tally(p, {"a": vote("NO", reason="fit_error 0.31 > theta_fit 0.165")}, NOW)
    assert result.outcome is Outcome.ABORT
    assert result.refused_by == ["a"]
    assert "a: fit_error 0.31 > theta_fit 0.165" in result.reason


def test_old_epoch_and_foreign_votes_never_count() -> None:
    p = proposal(["a"], ["a", "b", "c"], epoch=3)
    votes = {
        "a": vote("YES", epoch=2),
        "b": vote("YES", epoch=3, role="witness"),
        "x": vote("YES", epoch=3, role="witness"),
        "y": vote("YES", epoch=3),
    }
    result = tally(p, votes, NOW)
    assert result.outcome is Outcome.WAIT
    assert set(result.counted) == {"b"}
    assert result.vote_count == "1/2"


def test_deadline_aborts_and_lost_majority_aborts_early() -> None:
    p = proposal(["a"], ["a", "b", "c"])
    late = tally(p, {"a": vote("YES")}, NOW + timedelta(seconds=11))
    assert late.outcome is Outcome.ABORT
    assert "no vote from b, c" in late.reason
    lost = tally(
        p,
        {
            "b": vote("NO", role="witness", reason="a: lease expired"),
            "c": vote("NO", role="witness", reason="a: lease expired"),
        },
        NOW,
    )
    assert lost.outcome is Outcome.ABORT


@given(n=st.integers(min_value=1, max_value=40))
def test_quorum_is_a_strict_majority(n: int) -> None:
    q = quorum(n)
    assert q > n / 2
    assert q - 1 <= n / 2


def test_epochs_only_grow() -> None:
    plan = PlacementPlan(placement=["a"], witnesses=["b"], share=0.1)
    first = new_proposal(None, plan, Substrate.HOST, NOW, timedelta(seconds=5))
    second = new_proposal(first, plan, Substrate.HOST, NOW, timedelta(seconds=5))
    assert (first.epoch, second.epoch) == (1, 2)
    assert second.deadline == NOW + timedelta(seconds=5)


def test_a_proposal_names_its_voters_one_field_each_for_the_agents_field_selectors() -> None:
    plan = PlacementPlan(placement=["a"], witnesses=["b", "c"], share=0.1)
    wire = new_proposal(None, plan, Substrate.HOST, NOW, timedelta(seconds=5)).wire()
    assert wire["asked"] == {"first": "a", "second": "b", "third": "c"}
    # more voters than fields: only the flag, which every one-node agent watches
    wide = PlacementPlan(placement=["a", "b"], witnesses=["c", "d"], share=0.1)
    assert new_proposal(None, wide, Substrate.HOST, NOW, timedelta(seconds=5)).wire()["asked"] == {
        "more": True
    }
    # derived from the voters whatever was stored: a stale or forged copy does not survive
    forged = {**wire, "asked": {"first": "z"}}
    assert Proposal.model_validate(forged).wire()["asked"] == wire["asked"]
    # a recovery names the nodes the claim still holds after its voters: their agents keep
    # hearing it (and counting its share); a voter is not named twice
    small = PlacementPlan(placement=["a"], witnesses=["b"], share=0.1)
    recovery = new_proposal(
        None, small, Substrate.HOST, NOW, timedelta(seconds=5), holding=["s", "a"]
    )
    assert recovery.holding == ["s"]
    assert recovery.wire()["asked"] == {"first": "a", "second": "b", "third": "s"}


def test_an_agent_of_one_node_watches_the_claims_naming_it_one_of_several_every_claim() -> None:
    assert claim_watch_fields(["n1"]) == [
        {"status.proposal.asked.first": "n1"},
        {"status.proposal.asked.second": "n1"},
        {"status.proposal.asked.third": "n1"},
        {"status.proposal.asked.more": "true"},
    ]
    assert claim_watch_fields(["n1", "n2"]) == [None]


def test_a_claim_without_room_waits_unless_the_nodes_votes_refused_it() -> None:
    full = NoPlacement("InsufficientCapacity", "0 of 1 placement node(s) available", final=False)
    waits = no_room(full, {}, others_in_the_way=False)
    assert (waits.reason, waits.wait, waits.final) == ("WaitingForCapacity", True, False)
    assert "admitted claims hold it" in waits.message
    behind = no_room(full, {"a": "fit_error 0.3"}, others_in_the_way=True)
    assert behind.wait  # those may still abort
    assert "open proposals" in behind.message
    assert no_room(full, {"a": "fit_error 0.3"}, others_in_the_way=False) is full  # rejected
    never = NoPlacement("ExceedsNodeCapacity", "too big", final=True)
    assert no_room(never, {}, others_in_the_way=False) is never


def test_room_grows_with_a_new_node_a_smaller_ledger_or_a_changed_capacity() -> None:
    one = Holder(claim="ns/a", uid="u1", epoch=1, share=0.3)
    two = Holder(claim="ns/b", uid="u2", epoch=1, share=0.3)
    before = node("a", holders=[one, two])
    assert room_grew(None, before)
    assert room_grew(before, node("a", holders=[one]))
    assert room_grew(before, node("a"))
    assert room_grew(before, node("a", holders=[one, two], cpu="16"))
    assert not room_grew(before, node("a", holders=[one, two]))  # a publish: readings only
    assert not room_grew(node("a", holders=[one]), before)  # a commit takes room


# -- the ledger ---------------------------------------------------------------------------------


def claim(
    uid: str,
    phase: str,
    *,
    epoch: int = 1,
    nodes: tuple[str, ...] = ("a",),
    share: float = 0.2,
    name: str = "c",
) -> CapacityClaim:
    status: dict[str, Any] = {"phase": phase}
    if phase in ("Admitted", "Recovering"):
        status["placements"] = [
            {"node": n, "substrate": "host", "share": share, "epoch": epoch} for n in nodes
        ]
    if phase == "Voting":
        status["proposal"] = {
            "epoch": epoch,
            "placement": list(nodes),
            "voters": list(nodes),
            "deadline": NOW.isoformat(),
            "share": share,
            "substrate": "host",
        }
    return CapacityClaim.model_validate(
        {
            "metadata": {"name": name, "namespace": "ns", "uid": uid},
            "spec": {"cGeo": share},
            "status": status,
        }
    )


def test_expected_holders_is_a_function_of_admitted_claims() -> None:
    ledger = expected_holders(
        [
            claim("u1", "Admitted", nodes=("a", "b"), share=0.25),
            claim("u2", "Rejected"),
            claim("u3", "Recovering", nodes=("b",), share=0.5),
        ]
    )
    assert {k: sorted(h.uid for h in v) for k, v in ledger.items()} == {
        ("a", "host"): ["u1"],
        ("b", "host"): ["u1", "u3"],
    }


@settings(max_examples=50)
@given(shares=st.lists(st.floats(min_value=0.01, max_value=0.6), min_size=1, max_size=30))
def test_greedy_placement_never_promises_past_capacity(shares: list[float]) -> None:
    """Admitting in sequence with the placement's own view never over-allocates a node."""
    holders: dict[str, list[Holder]] = {"a": [], "b": []}
    for i, share in enumerate(shares):
        nodes = [view(node(name, p95=0.0, holders=hs or None)) for name, hs in holders.items()]
        plan = plan_placement(spec(cGeo=share), Substrate.HOST, nodes)
        if isinstance(plan, PlacementPlan):
            for name in plan.placement:
                holders[name].append(holder(f"u{i}", share))
    for hs in holders.values():
        assert sum(h.share for h in hs) <= 1.0 + 1e-9


def test_placement_skips_nodes_the_isolation_gate_would_refuse() -> None:
    half = node("half", p95=0.0, holders=[holder("x", 0.5)])
    plan = plan_placement(spec(cGeo=0.4), Substrate.HOST, [view(half)], min_isolation=0.15)
    assert isinstance(plan, NoPlacement)
    assert "half: isolation 0.10 < theta_iso 0.15" in plan.message
    ok = plan_placement(spec(cGeo=0.3), Substrate.HOST, [view(half)], min_isolation=0.15)
    assert isinstance(ok, PlacementPlan)


def _ready(n: CapacityNode, status: str = "True") -> CapacityNode:
    body = n.model_dump(by_alias=True, mode="json", exclude_none=True)
    body["status"]["conditions"] = [
        {"type": "Ready", "status": status, "reason": "Measured", "message": "",
         "lastTransitionTime": NOW.isoformat()}
    ]  # fmt: skip
    return CapacityNode.model_validate(body)


@pytest.mark.parametrize(
    ("case", "age", "min_samples", "why"),
    [
        ("fresh", 10.0, 0, None),
        ("at the limit", 30.0, 64, None),
        ("too old", 30.5, 0, "readings stale"),
        ("clock skew (a reading from the future) is fresh", -5.0, 0, None),
        ("window not full", 0.0, 65, "window not full (64 of 65 samples)"),
        ("not ready", 0.0, 0, "not Ready"),
        ("no status", 0.0, 0, "no CapacityNode status"),
    ],
)
def test_one_freshness_rule_for_placement_and_witnesses(
    case: str, age: float, min_samples: int, why: str | None
) -> None:
    n: CapacityNode | None = _ready(node("n1"), "False" if case == "not ready" else "True")
    if case == "no status":
        n = None
    now = NOW + timedelta(seconds=age)
    assert node_staleness(n, now, max_age=30.0, min_samples=min_samples) == why, case


# -- what to do next, when to look again, who may propose ----------------------------------------


def claim_with(status: dict[str, Any] | None, generation: int = 1) -> CapacityClaim:
    body: dict[str, Any] = {
        "metadata": {"name": "c", "namespace": "ns", "uid": "u", "generation": generation},
        "spec": {"cGeo": 0.2},
    }
    if status is not None:
        body["status"] = status
    return CapacityClaim.model_validate(body)


def voting(votes: dict[str, Any] | None = None, observed: int = 1) -> dict[str, Any]:
    proposal = {
        "epoch": 2, "placement": ["a"], "voters": ["a", "b", "c"],
        "deadline": (NOW + timedelta(seconds=10)).isoformat(), "share": 0.2, "substrate": "host",
    }  # fmt: skip
    return {"phase": "Voting", "proposal": proposal, "votes": votes or {},
            "observedGeneration": observed}  # fmt: skip


def yes(role: str = "witness", epoch: int = 2) -> dict[str, Any]:
    return {"vote": "YES", "role": role, "epoch": epoch}


@pytest.mark.parametrize(
    ("status", "generation", "now", "action"),
    [
        (None, 1, NOW, Action.PROPOSE),
        ({"phase": "Pending", "reason": "WaitingForCapacity"}, 1, NOW, Action.PROPOSE),
        (voting(), 1, NOW, Action.WAIT),
        (voting(), 1, NOW + timedelta(seconds=10), Action.ABORT),
        (voting({"a": yes("placement"), "b": yes()}), 1, NOW, Action.COMMIT),
        # a YES for an old epoch does not count
        (voting({"a": yes("placement"), "b": yes(epoch=1)}), 1, NOW, Action.WAIT),
        (voting(), 2, NOW, Action.RESTART),
        ({"phase": "Admitted", "observedGeneration": 1}, 1, NOW, Action.NOTHING),
        ({"phase": "Admitted", "observedGeneration": 1}, 2, NOW, Action.NOTE_SPEC_CHANGE),
        ({"phase": "Recovering"}, 1, NOW, Action.RECOVER),
        ({"phase": "Rejected"}, 1, NOW, Action.NOTHING),
    ],
)
def test_next_step(
    status: dict[str, Any] | None, generation: int, now: datetime, action: Action
) -> None:
    assert next_step(claim_with(status, generation), now).action is action


def test_wake_at() -> None:
    recheck = timedelta(seconds=1)
    assert wake_at(claim_with(voting()), NOW, recheck) == NOW + timedelta(seconds=10)
    waiting = {"phase": "Pending", "reason": "WaitingForNodes"}
    assert wake_at(claim_with(waiting), NOW, recheck) == NOW + recheck
    assert wake_at(claim_with({"phase": "Recovering"}), NOW, recheck) == NOW + recheck
    assert wake_at(claim_with(None), NOW, recheck) is None  # queued: the loop's flow control
    assert wake_at(claim_with({"phase": "Admitted"}), NOW, recheck) is None


def test_admit_order_is_oldest_first_within_the_open_budget() -> None:
    queued = [
        ("late", NOW + timedelta(seconds=2), "ns/z"),
        ("early", NOW, "ns/y"),
        ("tie-b", NOW + timedelta(seconds=1), "ns/b"),
        ("tie-a", NOW + timedelta(seconds=1), "ns/a"),
    ]
    assert admit_order(queued, open_proposals=0, limit=3) == ["early", "tie-a", "tie-b"]
    assert admit_order(queued, open_proposals=2, limit=3) == ["early"]
    assert admit_order(queued, open_proposals=5, limit=3) == []


# -- the ledger's byte budget --------------------------------------------------------------------


def long_holder(i: int, share: float = 0.001) -> Holder:
    return holder(f"uid-{i:04d}-" + "u" * 26, share, claim=f"namespace-{i:03d}/" + "c" * 60)


def test_ledger_estimate_is_never_below_the_exact_size() -> None:
    for count in (0, 1, 5, 40):
        n = node("a", holders=[long_holder(i) for i in range(count)])
        exact = ledger_bytes((n.status.allocated or {}) if n.status else {})
        assert ledger_estimate(n) >= exact


def test_a_nodes_facts_are_its_ledger_and_readings() -> None:
    n = node("a", p95=0.35, holders=[long_holder(i, 0.1) for i in range(3)])
    facts = node_facts(n)
    assert facts.committed == {"host": pytest.approx(allocated_share(n, Substrate.HOST))}
    assert facts.p95 == {"host": 0.35}
    assert facts.ledger_size == ledger_estimate(n)
    v = view(n)
    assert v.facts == facts
    assert v.headroom(Substrate.HOST) == pytest.approx(0.65)
    assert v.headroom(Substrate.GPU) == 0.0  # no reading: no measured room
    reserved = NodeView(name="a", node=n, lease_live=True, fresh=True, reserved={"host": 0.4})
    assert reserved.allocated(Substrate.HOST) == pytest.approx(0.7)
    assert reserved.committed(Substrate.HOST) == pytest.approx(0.3)


def test_a_full_ledger_refuses_the_next_holder_and_placement_skips_the_node() -> None:
    fits = [long_holder(i) for i in range(20)]
    roomy = node("a", holders=fits)
    assert ledger_full(roomy, Substrate.HOST, long_holder(99)) is None
    crowded = node("b", holders=[long_holder(i) for i in range(60)])  # about 8 KiB
    why = ledger_full(crowded, Substrate.HOST, long_holder(99))
    assert why is not None
    assert "ledger is full (60 claims" in why
    # its allocated share is tiny, yet placement does not propose the full node
    plan = plan_placement(spec(cGeo=0.1), Substrate.HOST, [view(crowded), view(roomy)])
    assert isinstance(plan, PlacementPlan)
    assert plan.placement == ["a"]
    only_full = plan_placement(spec(cGeo=0.1), Substrate.HOST, [view(crowded)])
    assert isinstance(only_full, NoPlacement)
    assert "b: its ledger is full" in only_full.message


def test_a_full_ledger_stays_within_the_node_object_budget() -> None:
    # the largest ledger the operator writes, plus the agent's own part at its limit, is at
    # most 16 KiB: the agent keeps spec and status under NODE_BYTES - LEDGER_BYTES
    assert LEDGER_BYTES < NODE_BYTES
    holders: list[Holder] = []
    n = node("a")
    while (nxt := long_holder(len(holders))) and ledger_full(n, Substrate.HOST, nxt) is None:
        holders.append(nxt)
        n = node("a", holders=holders)
    assert ledger_bytes((n.status.allocated or {}) if n.status else {}) <= LEDGER_BYTES
    assert len(holders) > 30  # room for a working node's claims


def test_a_proposal_tells_each_placement_node_its_committed_share() -> None:
    held = [Holder(claim="ns/x", uid="u-x", epoch=1, share=0.3)]
    nodes = [view(node("a", p95=0.1, holders=held)), view(node("b", p95=0.5))]
    plan = plan_placement(spec(cGeo=0.1, replicas=2), Substrate.HOST, nodes)
    assert isinstance(plan, PlacementPlan)
    assert plan.committed == {"a": pytest.approx(0.3), "b": 0.0}
    proposal = new_proposal(None, plan, Substrate.HOST, NOW, timedelta(seconds=10))
    assert proposal.committed == plan.committed


# ---------------------------------------------------------------------------------------------
# The votes of the open proposal: the operator and capctl read them by this one rule


def test_an_open_proposals_votes_are_the_voters_ballot_entries_for_its_epoch() -> None:
    c = claim_with(voting({"b": yes(), "x": yes()}))  # written into the claim: never counted
    ballots = {
        ("a", "u"): vote("YES"),
        ("b", "u"): vote("YES", epoch=1, role="witness"),  # an older epoch
        ("c", "other"): vote("YES", role="witness"),  # another claim's
        ("x", "u"): vote("YES", role="witness"),  # not a voter of this proposal
    }

    def entry(node: str, uid: str) -> Vote | None:
        return ballots.get((node, uid))

    assert proposal_open(c)
    assert ballot_votes(c, entry) == {"a": vote("YES")}
    assert set(ballot_votes(c, entry, other_epochs=True)) == {"a", "b"}  # b shown as stale
    decided = with_ballot_votes(c, ballot_votes(c, entry))
    assert decided.status is not None
    assert decided.status.votes == {"a": vote("YES")}
    assert with_ballot_votes(c, None) is c  # ballots not read: the claim as it is


def attesting_claim(since: datetime | None) -> CapacityClaim:
    status = voting()
    if since is not None:
        status["proposal"]["attestedSince"] = since.isoformat()
    return claim_with(status)


def test_a_witness_attestation_since_the_proposals_bound_counts_as_its_yes_for_the_epoch() -> None:
    since = NOW - timedelta(seconds=5)
    c = attesting_claim(since)
    alive = {
        "b": {"a": since + timedelta(seconds=1), "z": NOW},  # b saw a alive after the bound
        "c": {"a": since - timedelta(seconds=1)},  # c saw a alive, but before it: not counted
        "a": {"a": NOW},  # the placement node attesting itself: not a witness
        "x": {"a": NOW},  # not a voter of this proposal
    }
    votes = ballot_votes(c, lambda node, uid: None, alive=alive.get)
    assert set(votes) == {"b"}
    b = votes["b"]
    assert (b.vote, b.role, b.epoch) == (VoteValue.YES, VoterRole.WITNESS, 2)
    assert b.time == since + timedelta(seconds=1)
    assert "attested" in (b.reason or "")
    # with the placement node's YES that is a quorum (2 of 3): the commit needs no vote of c
    votes["a"] = vote("YES")
    decided = with_ballot_votes(c, votes)
    assert decided.status is not None
    assert decided.status.proposal is not None
    assert tally(decided.status.proposal, decided.status.votes, NOW).outcome is Outcome.COMMIT


def test_a_witness_vote_for_the_epoch_wins_over_its_attestation_and_old_epochs_never_count() -> (
    None
):
    since = NOW - timedelta(seconds=5)
    c = attesting_claim(since)
    alive = {"b": {"a": NOW}, "c": {"a": NOW}}
    ballots = {
        "b": vote("NO", role="witness", reason="a: lease expired"),  # this epoch: its answer
        "c": vote("YES", epoch=1, role="witness"),  # an older epoch: the attestation answers
    }
    votes = ballot_votes(c, lambda node, uid: ballots.get(node), alive=alive.get)
    assert votes["b"].vote is VoteValue.NO
    assert votes["c"].epoch == 2
    assert "attested" in (votes["c"].reason or "")


def test_attestations_answer_only_proposals_that_take_them_and_cover_every_placement_node() -> None:
    untaken = attesting_claim(None)  # an operator that does not set attestedSince
    assert ballot_votes(untaken, lambda node, uid: None, alive={"b": {"a": NOW}}.get) == {}
    two = claim_with(voting())
    assert two.status is not None
    assert two.status.proposal is not None
    p = two.status.proposal.model_copy(
        update={"placement": ["a", "d"], "voters": ["a", "d", "b"], "attested_since": NOW}
    )
    assert attested_vote(p, "b", {"a": NOW}) is None  # d not attested
    assert attested_vote(p, "b", {"a": NOW, "d": NOW - timedelta(seconds=1)}) is None  # too old
    both = attested_vote(p, "b", {"a": NOW, "d": NOW + timedelta(seconds=1)})
    assert both is not None
    assert both.time == NOW


def test_a_proposal_takes_attestations_made_within_the_window_before_it() -> None:
    nodes = [view(node("a", p95=0.1)), view(node("b", p95=0.5)), view(node("c", p95=0.5))]
    plan = plan_placement(spec(cGeo=0.1), Substrate.HOST, nodes)
    assert isinstance(plan, PlacementPlan)
    taking = new_proposal(
        None, plan, Substrate.HOST, NOW, timedelta(seconds=10), attestation=timedelta(seconds=5)
    )
    assert taking.attested_since == NOW - timedelta(seconds=5)
    assert taking.ahead == ["b", "c"]  # the next candidates, for the witnesses to attest
    voting_only = new_proposal(None, plan, Substrate.HOST, NOW, timedelta(seconds=10))
    assert voting_only.attested_since is None
    assert voting_only.ahead is None  # witnesses that vote have nothing to attest
    # at most ATTEST_AHEAD, and never a node without room
    many = [view(node(f"n{i}", p95=0.1 * i)) for i in range(8)]
    many.append(view(node("full", p95=0.0, holders=[holder("x", 0.95)])))
    wide = plan_placement(spec(cGeo=0.1), Substrate.HOST, many)
    assert isinstance(wide, PlacementPlan)
    assert (wide.placement, wide.ahead) == (["n0"], ["n1", "n2", "n3"])
    assert len(wide.ahead) == ATTEST_AHEAD


def test_a_decided_proposals_votes_are_the_claims_own() -> None:
    counted = {"a": yes("placement"), "b": yes()}
    admitted = claim_with({**voting(counted), "phase": "Admitted"})
    recovering_closed = claim_with(
        {**voting(counted), "phase": "Recovering",
         "placements": [{"node": "a", "substrate": "host", "share": 0.2, "epoch": 2}]}
    )  # fmt: skip
    recovering_open = claim_with(
        {**voting(counted), "phase": "Recovering",
         "placements": [{"node": "d", "substrate": "host", "share": 0.2, "epoch": 1}]}
    )  # fmt: skip

    def entry(node: str, uid: str) -> Vote | None:
        return vote("NO")

    for c in (admitted, recovering_closed):
        assert not proposal_open(c)
        assert ballot_votes(c, entry) == {}
        assert with_ballot_votes(c, {}) is c
    assert proposal_open(recovering_open)  # a failed node's share proposed again
    assert set(ballot_votes(recovering_open, entry)) == {"a", "b", "c"}
