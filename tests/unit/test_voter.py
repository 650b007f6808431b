"""The voter's decisions, pure: placement votes on fit with local reservations, witness votes on
liveness; its votes and its claims watch through the Kubernetes client."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import httpx2
import numpy as np
import pytest

from capacity_agent.backoff import Backoff
from capacity_agent.voter import (
    FORGET_DELETED_SECONDS,
    EpochOrder,
    Reservation,
    Voter,
    VoterNode,
    decide_placement,
    decide_witness,
)
from capacity_api.gates import Thresholds
from capacity_api.models import (
    MAX_ATTESTED,
    MAX_BALLOT_VOTES,
    BallotVote,
    CapacityClaim,
    CapacityNode,
    Substrate,
    Vote,
    VoterRole,
    VoteValue,
)
from tests.unit.kube_fakes import FakeApiServer, status_body, watch_stream

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
        committed=committed,
        thresholds=Thresholds(),
        now=NOW,
    )


def test_yes_reserves_and_the_reservation_counts_for_the_next_proposal() -> None:
    node = voter_node(Window(0.2))
    first = place(node, 0.4, uid="a")
    assert first.vote.vote is VoteValue.YES
    assert first.reserve == Reservation("host", 0.4)
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


def admitted_body(uid: str, node: str, share: float, phase: str = "Admitted") -> dict[str, Any]:
    return {
        "metadata": {"name": uid, "namespace": "team", "uid": uid},
        "status": {"phase": phase, "placements": [
            {"node": node, "substrate": "host", "share": share, "epoch": 1}]},
    }  # fmt: skip


def test_a_reservation_outlives_its_deadline_and_becomes_an_admitted_share_at_the_commit() -> None:
    # an operator may commit a quorum reached in time after the deadline: the promise holds
    # until the node sees the outcome, and a commit turns it into an admitted share
    node = voter_node(Window(0.2))
    node.reservations[("a", 1)] = Reservation("host", 0.5)
    assert place(node, 0.5).vote.vote is VoteValue.NO  # long after any deadline: still held
    v = Voter(None, {"n1": node}, "capacity-system", lambda: NOW)  # type: ignore[arg-type]
    asyncio.run(v.handle(admitted_body("a", "n1", 0.5)))
    assert node.reservations == {}
    assert node.committed_seen("host", excluding="other") == pytest.approx(0.5)
    asyncio.run(v.handle({**admitted_body("a", "n1", 0.5), "_deleted": True}))
    assert node.committed_seen("host", excluding="other") == 0.0


def test_a_placement_node_counts_the_admitted_claims_it_has_seen_when_the_proposal_says_less() -> (
    None
):
    # another operator copy's proposal, whose ledger lacks a claim admitted here meanwhile
    body = claim_body(placement="n1")
    body["status"]["proposal"]["committed"] = {"n1": 0.0}
    server = FakeApiServer(404, ballot_body(), ballot_body())
    v = voter(server)

    async def run() -> None:
        await v.handle(admitted_body("seen", "n1", 0.8))
        await v.handle(admitted_body("elsewhere", "n2", 0.5))  # not this node's
        await v.handle(body)
        await asyncio.wait_for(v.ballot("n1").idle(), 5)

    asyncio.run(run())
    vote = server.sent()[4]["status"]["votes"]["uid-c1"]
    assert (vote["vote"], vote["gate"]) == ("NO", "isolation")
    assert vote["readings"]["allocated"] == pytest.approx(0.8)


def test_claims_a_watch_no_longer_lists_when_it_lists_again_are_forgotten() -> None:
    node = voter_node(Window(0.2))
    v = Voter(None, {"n1": node}, "capacity-system", lambda: NOW)  # type: ignore[arg-type]
    node.reservations[("gone", 2)] = Reservation("host", 0.3)
    node.admitted.update(left=Reservation("host", 0.2), kept=Reservation("host", 0.1))
    v.sources.update(gone=0, left=0, kept=0, other=1)
    node.admitted["other"] = Reservation("host", 0.1)
    writer = v.ballot("n1")
    writer.rely("gone", 2, ["p1"])  # answered by attestation
    writer.rely("kept", 2, ["p1"])
    v.relisted(0, ["kept"])  # "gone" and "left" were deleted while watch 0 was down
    assert set(writer.relied) == {"kept"}
    assert node.reservations == {}
    assert set(node.admitted) == {"kept", "other"}  # watch 1's claim is not watch 0's to judge
    assert v.sources == {"kept": 0, "other": 1}


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


# ---------------------------------------------------------------------------------------------
# Through the Kubernetes client (lightkube, against a scripted API server)

CLAIMS = "/apis/capacity.platform.dev/v1alpha1/capacityclaims"


def claim_body(name: str = "c1", *, placement: str = "p1", epoch: int = 4) -> dict[str, Any]:
    return {
        "apiVersion": "capacity.platform.dev/v1alpha1",
        "kind": "CapacityClaim",
        "metadata": {"name": name, "namespace": "team", "uid": f"uid-{name}"},
        "spec": {"cGeo": 0.1},
        "status": {
            "phase": "Voting",
            "proposal": {
                "epoch": epoch,
                "placement": [placement],
                "voters": [placement, "n1"],
                "deadline": "2027-01-15T08:00:30Z",
                "share": 0.1,
                "substrate": "host",
            },
        },
    }


def voter(server: FakeApiServer) -> Voter:
    return Voter(server.client(), {"n1": voter_node(Window(0.2))}, "capacity-system", lambda: NOW)


def a_vote(epoch: int = 4) -> Vote:
    return Vote(vote=VoteValue.YES, role=VoterRole.WITNESS, epoch=epoch, reason="alive")


BALLOT = "/apis/capacity.platform.dev/v1alpha1/capacityballots/n1"
BALLOT_STATUS = BALLOT + "/status"


def ballot_body(**votes: Any) -> dict[str, Any]:
    return {
        "apiVersion": "capacity.platform.dev/v1alpha1",
        "kind": "CapacityBallot",
        "metadata": {"name": "n1"},
        "spec": {"nodeName": "n1"},
        "status": {"votes": votes},
    }


def cast(v: Voter, *claims: dict[str, Any]) -> None:
    """Cast a witness vote on each claim, then let the ballot writes run to their end."""

    async def run() -> None:
        for body in claims:
            await v._cast(CapacityClaim.model_validate(body), "n1", a_vote())
        await asyncio.wait_for(v.ballot("n1").idle(), 5)  # a write that fails retries

    asyncio.run(run())


def test_votes_on_several_claims_go_out_in_one_merge_patch_of_the_nodes_ballot() -> None:
    # the first write creates the ballot (server-side apply answers with it: a vote left by
    # an earlier run is cleared), then one merge patch carries every vote queued meanwhile
    server = FakeApiServer(ballot_body(**{"uid-old": a_vote(1).wire()}), ballot_body())
    v = voter(server)
    cast(v, claim_body("c1"), claim_body("c2"), claim_body("c3"))
    method, path, query, content_type, body = server.sent(0)
    assert (method, path, content_type) == ("PATCH", BALLOT, "application/apply-patch+yaml")
    assert body["spec"] == {"nodeName": "n1"}
    method, path, query, content_type, body = server.sent(1)
    assert (method, path, query) == ("PATCH", BALLOT_STATUS, {"fieldManager": "capacity-agent"})
    assert content_type == "application/merge-patch+json"
    votes = body["status"]["votes"]
    assert votes["uid-old"] is None
    assert [votes[f"uid-c{i}"]["claim"] for i in (1, 2, 3)] == ["team/c1", "team/c2", "team/c3"]
    assert votes["uid-c1"] == {**a_vote().wire(), "claim": "team/c1"}
    assert len(server.requests) == 2
    assert v.votes_cast == 3


def test_a_ballot_write_that_fails_is_retried_with_every_vote_queued_meanwhile(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = FakeApiServer(ballot_body(), 500, ballot_body())
    v = voter(server)
    v.ballot("n1").backoff = Backoff(initial=0.001, cap=0.001)
    cast(v, claim_body("c1"))
    assert [r.url.path for r in server.requests] == [BALLOT, BALLOT_STATUS, BALLOT_STATUS]
    assert server.sent(1)[4] == server.sent(2)[4]  # the same votes, nothing half-written
    assert v.votes_cast == 1
    assert any("not written" in r.getMessage() for r in caplog.records)


def test_a_deleted_ballot_is_created_again_at_once_with_the_votes_queued() -> None:
    server = FakeApiServer(ballot_body(), ballot_body(), 404, ballot_body(), ballot_body())
    v = voter(server)
    v.ballot("n1").backoff = Backoff(initial=60, cap=60)  # a backoff would outlast the test
    cast(v, claim_body("c1"))
    cast(v, claim_body("c2"))  # the ballot was deleted meanwhile
    paths = [r.url.path for r in server.requests]
    assert paths == [BALLOT, BALLOT_STATUS, BALLOT_STATUS, BALLOT, BALLOT_STATUS]
    assert "uid-c2" in server.sent()[4]["status"]["votes"]
    assert v.ballot("n1").held == {"uid-c2": 4}


def test_a_vote_of_a_claim_that_left_its_epoch_is_removed_with_the_next_write() -> None:
    server = FakeApiServer(ballot_body(), ballot_body(), ballot_body())
    v = voter(server)
    cast(v, claim_body("c1"))
    decided = claim_body("c1")
    decided["status"]["phase"] = "Admitted"
    asyncio.run(v.handle(decided))  # the claim left epoch 4: its vote goes...
    assert len(server.requests) == 2  # ...but not in a write of its own
    cast(v, claim_body("c2"))
    votes = server.sent()[4]["status"]["votes"]
    assert votes == {"uid-c1": None, "uid-c2": {**a_vote().wire(), "claim": "team/c2"}}
    assert v.ballot("n1").held == {"uid-c2": 4}


def test_a_full_ballot_drops_its_oldest_votes_to_stay_within_its_schema() -> None:
    server = FakeApiServer(ballot_body(), ballot_body())
    v = voter(server)
    writer = v.ballot("n1")
    writer.held = {f"uid-old{i}": 1 for i in range(MAX_BALLOT_VOTES)}  # full, oldest first
    cast(v, claim_body("c1"))
    votes = server.sent()[4]["status"]["votes"]
    assert votes["uid-old0"] is None  # the oldest goes...
    assert "uid-old1" not in votes  # ...and only it
    assert votes["uid-c1"]["epoch"] == 4
    assert len(writer.held) == MAX_BALLOT_VOTES


def test_a_witness_reads_thresholds_leases_and_nodes_then_votes() -> None:
    server = FakeApiServer(
        404,  # no calibration ConfigMap: the default thresholds
        {"kind": "LeaseList", "metadata": {"resourceVersion": "1"}, "items": []},
        404,  # the placement node has no CapacityNode
        ballot_body(),
        ballot_body(),
    )
    v = voter(server)

    async def run() -> None:
        await v.handle(claim_body())
        await asyncio.wait_for(v.ballot("n1").idle(), 5)  # a write that fails retries

    asyncio.run(run())
    paths = [request.url.path for request in server.requests]
    assert paths == [
        "/api/v1/namespaces/capacity-system/configmaps/capacity-calibration",
        "/apis/coordination.k8s.io/v1/namespaces/capacity-system/leases",
        "/apis/capacity.platform.dev/v1alpha1/capacitynodes/p1",
        BALLOT,
        BALLOT_STATUS,
    ]
    vote = server.sent()[4]["status"]["votes"]["uid-c1"]
    assert (vote["vote"], vote["role"], vote["epoch"]) == ("NO", "witness", 4)
    assert "p1: no lease" in vote["reason"]
    assert v.votes_cast == 1


def test_a_placement_node_counts_the_committed_share_the_proposal_names_without_a_read() -> None:
    body = claim_body(placement="n1")
    body["status"]["proposal"]["committed"] = {"n1": 0.8}
    server = FakeApiServer(404, ballot_body(), ballot_body())  # thresholds, then the ballot
    v = voter(server)

    async def run() -> None:
        await v.handle(body)
        await asyncio.wait_for(v.ballot("n1").idle(), 5)  # a write that fails retries

    asyncio.run(run())
    assert [r.url.path for r in server.requests] == [
        "/api/v1/namespaces/capacity-system/configmaps/capacity-calibration",
        BALLOT,
        BALLOT_STATUS,
    ]  # no CapacityNode read
    vote = server.sent()[4]["status"]["votes"]["uid-c1"]
    assert (vote["vote"], vote["role"], vote["gate"]) == ("NO", "placement", "isolation")
    assert vote["readings"]["allocated"] == pytest.approx(0.8)


def lease_list(*names: str) -> dict[str, Any]:
    renewed = datetime.fromtimestamp(NOW - 1, UTC).isoformat().replace("+00:00", "Z")
    items = [
        {"metadata": {"name": n, "namespace": "capacity-system"},
         "spec": {"holderIdentity": n, "leaseDurationSeconds": 40, "renewTime": renewed}}
        for n in names
    ]  # fmt: skip
    return {"kind": "LeaseList", "metadata": {"resourceVersion": "1"}, "items": items}


@pytest.mark.parametrize(("observed", "reads"), [(NOW - 2, 1), (NOW - 300, 2)])
def test_a_witness_reads_a_placement_node_again_only_when_its_copy_would_not_pass(
    observed: float, reads: int
) -> None:
    node = capacity_node("p1", observed=observed).wire()
    answers: list[Any] = [404, lease_list("p1"), node, ballot_body(), ballot_body()]
    answers.append(lease_list("p1"))  # two seconds later: the Leases are read again...
    if reads == 2:
        answers.append(node)  # ...and a copy that failed the freshness rule
    answers.append(ballot_body())
    server = FakeApiServer(*answers)
    now = [NOW]
    v = Voter(server.client(), {"n1": voter_node(Window(0.2))}, "capacity-system", lambda: now[0])

    async def run() -> None:
        for name in ("c1", "c2"):
            await v.handle(claim_body(name))
            await asyncio.wait_for(v.ballot("n1").idle(), 5)  # a write that fails retries
            now[0] += 2

    asyncio.run(run())
    paths = [r.url.path for r in server.requests]
    assert paths.count("/apis/capacity.platform.dev/v1alpha1/capacitynodes/p1") == reads
    votes = [server.sent(i)[4]["status"]["votes"] for i in range(len(paths))
             if paths[i] == BALLOT_STATUS]  # fmt: skip
    expected = "YES" if reads == 1 else "NO"
    assert [next(iter(v.values()))["vote"] for v in votes] == [expected, expected]


class Loop:
    """The event loop as the watch thread uses it: calls run at once."""

    def call_soon_threadsafe(self, fn: Any, *args: Any) -> None:
        fn(*args)


class Queue:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def put_nowait(self, item: dict[str, Any]) -> None:
        self.items.append(item)


def claim_list(version: str, *items: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "CapacityClaimList", "metadata": {"resourceVersion": version}, "items": items}


def test_the_watch_lists_then_watches_and_lists_again_at_once_when_its_version_expired(
    caplog: pytest.LogCaptureFixture,
) -> None:
    expired = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}

    def list_then_stop(request: Any) -> Any:
        v._stop.set()  # the next event is the last one handled
        return httpx2.Response(200, json=claim_list("9"))

    server = FakeApiServer(
        claim_list("5", claim_body("c1")),
        watch_stream(("ADDED", claim_body("c2")), ("ERROR", expired)),
        list_then_stop,
        watch_stream(("DELETED", claim_body("c3"))),
    )
    v = voter(server)
    queue = Queue()
    v._watch(Loop(), queue, None)  # type: ignore[arg-type]
    names = [
        (item["metadata"]["name"], item.get("_deleted", False))
        if "metadata" in item
        else ("listed", item["uids"])
        for item in queue.items
    ]
    assert names == [
        ("c1", False), ("listed", ["uid-c1"]), ("c2", False), ("listed", []), ("c3", True),
    ]  # fmt: skip
    requests = [(r.url.path, dict(r.url.params)) for r in server.requests]
    watch = {"watch": "true", "timeoutSeconds": "120"}
    assert requests == [
        (CLAIMS, {}),
        (CLAIMS, {**watch, "resourceVersion": "5"}),
        (CLAIMS, {}),
        (CLAIMS, {**watch, "resourceVersion": "9"}),
    ]
    assert "claims watch failed" not in caplog.text  # a 410 is no failure: no backoff


def test_a_watch_with_fields_lists_and_watches_only_what_they_select() -> None:
    def list_then_stop(request: Any) -> Any:
        v._stop.set()
        return httpx2.Response(200, json=claim_list("7", claim_body("c1")))

    server = FakeApiServer(list_then_stop, watch_stream(("MODIFIED", claim_body("c1"))))
    v = voter(server)
    queue = Queue()
    v._watch(Loop(), queue, {"status.proposal.asked.second": "n1"}, 2)  # type: ignore[arg-type]
    assert [item.get("metadata", {}).get("name") for item in queue.items] == ["c1", None, "c1"]
    assert [item["_watch"] for item in queue.items if "metadata" in item] == [2, 2]
    assert queue.items[1] == {"_listed": 2, "uids": ["uid-c1"]}
    selector = "status.proposal.asked.second=n1"
    assert [dict(r.url.params).get("fieldSelector") for r in server.requests] == [selector] * 2


def event(uid: str, epoch: int | None, *, deleted: bool = False) -> dict[str, Any]:
    status = {} if epoch is None else {"proposal": {"epoch": epoch}}
    body: dict[str, Any] = {"metadata": {"uid": uid}, "status": status}
    if deleted:
        body["_deleted"] = True
    return body


def test_the_events_of_several_watches_of_one_claim_go_in_epoch_order() -> None:
    # epoch 2 names the node in another field: the new field's watch sends ADDED(2), the old
    # one's DELETED with epoch 1's content; whichever comes second must not undo the first
    order = EpochOrder()
    assert order.admit(event("u", 1), NOW)
    assert order.admit(event("u", 2), NOW)
    assert not order.admit(event("u", 1, deleted=True), NOW)  # late: epoch 2 is newer
    assert order.admit(event("u", 2), NOW)  # the same epoch again (an update) passes
    # the other way round: the deletion first, then the newer epoch; both pass
    assert order.admit(event("v", 1), NOW)
    assert order.admit(event("v", 1, deleted=True), NOW)
    assert order.admit(event("v", 2), NOW)
    # a claim deleted at its newest epoch is gone; a stale event of another watch stays out
    assert order.admit(event("v", 2, deleted=True), NOW)
    assert not order.admit(event("v", 1), NOW + 1)
    # ... until the claim has been gone for long enough that no watch can still be behind
    assert order.admit(event("w", 1), NOW + FORGET_DELETED_SECONDS + 2)
    assert "v" not in order.newest
    assert order.newest == {"u": 2, "w": 1}


def test_the_watch_backs_off_after_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    def refuse_and_stop(request: Any) -> Any:
        v._stop.set()
        return httpx2.Response(503, json=status_body(503))

    v = voter(FakeApiServer(refuse_and_stop))
    v._watch(Loop(), Queue(), None)  # type: ignore[arg-type]
    assert "claims watch failed (503 ServiceUnavailable); retrying in" in caplog.text


def test_votes_within_the_spacing_of_the_last_write_wait_and_go_together() -> None:
    # a witness's votes come one by one; after the first write, the next ones wait for the rest
    # of the spacing and share one write, instead of a write each
    server = FakeApiServer(ballot_body(), ballot_body(), ballot_body(), ballot_body())
    v = Voter(
        server.client(),
        {"n1": voter_node(Window(0.2))},
        "capacity-system",
        lambda: NOW,
        ballot_interval=1.0,
    )

    async def run() -> list[float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        writer = v.ballot("n1")
        await v._cast(CapacityClaim.model_validate(claim_body("c1")), "n1", a_vote())
        await writer.idle()  # the first vote went out at once
        first = loop.time() - started
        for name in ("c2", "c3", "c4"):
            await v._cast(CapacityClaim.model_validate(claim_body(name)), "n1", a_vote())
            await asyncio.sleep(0.02)
        await asyncio.wait_for(writer.idle(), 5)
        return [first, loop.time() - started]

    first, last = asyncio.run(run())
    assert first < 0.9  # after a quiet spell: at once (the fake API answers in milliseconds)
    assert last >= 1.0  # the second write waited for the rest of the spacing
    statuses = [r for r in server.requests if r.url.path == BALLOT_STATUS]
    assert len(statuses) == 2  # c1 alone, then c2, c3 and c4 together
    assert set(server.sent()[4]["status"]["votes"]) == {"uid-c2", "uid-c3", "uid-c4"}
    assert v.votes_cast == 4


def test_a_slow_api_server_stretches_the_spacing_between_ballot_writes() -> None:
    # each write takes 0.15 s: the next one starts four times that after the last began, bounded
    # by five times the spacing (0.25 s, not the configured 0.05 s), so the votes meanwhile
    # share one write; a fast answer brings the spacing back
    def slow(request: httpx2.Request) -> httpx2.Response:
        time.sleep(0.15)
        return httpx2.Response(200, json=ballot_body())

    server = FakeApiServer(ballot_body(), slow, slow, ballot_body(), ballot_body())
    v = voter(server)
    writer = v.ballot("n1")
    writer.spacing = 0.05
    starts: list[float] = []

    async def cast(name: str) -> None:
        await v._cast(CapacityClaim.model_validate(claim_body(name)), "n1", a_vote())

    async def run() -> None:
        loop = asyncio.get_running_loop()
        writer.open()
        await asyncio.wait_for(writer.idle(), 5)
        assert writer.gap == pytest.approx(0.05)  # answered at once: the configured spacing
        await asyncio.sleep(0.1)
        await cast("c1")  # after a quiet spell: at once
        starts.append(loop.time())
        await asyncio.sleep(0.01)
        for name in ("c2", "c3", "c4"):  # while c1's write is still in flight
            await cast(name)
            await asyncio.sleep(0.03)
        await asyncio.wait_for(writer.idle(), 5)
        starts.append(loop.time())
        assert writer.gap == pytest.approx(0.25)  # 4 x 0.15 = 0.6, bounded by 5 x 0.05
        await cast("c5")
        await asyncio.wait_for(writer.idle(), 5)
        assert writer.gap == pytest.approx(0.05)  # the fast answer: the spacing again

    asyncio.run(run())
    statuses = [r for r in server.requests if r.url.path == BALLOT_STATUS]
    assert len(statuses) == 3  # c1; then c2, c3 and c4 together; then c5
    assert set(server.sent(2)[4]["status"]["votes"]) == {"uid-c2", "uid-c3", "uid-c4"}
    # c2-c4's write began a stretched gap after c1's, which took 0.15 s: not at its end
    assert starts[1] - starts[0] >= 0.25 + 0.15


def test_a_ballot_opened_at_start_is_created_and_cleared_before_any_vote() -> None:
    # created by server-side apply; what an earlier run left is cleared in a patch of its own
    server = FakeApiServer(ballot_body(**{"uid-old": a_vote(1).wire()}), ballot_body())
    v = voter(server)

    async def run() -> None:
        writer = v.ballot("n1")
        writer.open()
        await asyncio.wait_for(writer.idle(), 5)
        assert writer.synced

    asyncio.run(run())
    assert [(r.method, r.url.path) for r in server.requests] == [
        ("PATCH", BALLOT),
        ("PATCH", BALLOT_STATUS),
    ]
    assert server.sent(1)[4]["status"]["votes"] == {"uid-old": None}
    # a ballot with nothing left in it costs the apply only, and the first vote is a plain patch
    server = FakeApiServer(ballot_body(), ballot_body())
    v = voter(server)

    async def again() -> None:
        writer = v.ballot("n1")
        writer.open()
        await asyncio.wait_for(writer.idle(), 5)
        assert len(server.requests) == 1
        writer.spacing = 0.0
        await v._cast(CapacityClaim.model_validate(claim_body("c1")), "n1", a_vote())
        await asyncio.wait_for(writer.idle(), 5)

    asyncio.run(again())
    assert [r.url.path for r in server.requests] == [BALLOT, BALLOT_STATUS]


# ---------------------------------------------------------------------------------------------
# Witness attestations (docs/admission.md, "Witness attestations")


def stamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def attesting(name: str, placement: str, since: float) -> dict[str, Any]:
    """A claim whose proposal takes attestations made at or after ``since``."""
    body = claim_body(name, placement=placement)
    body["status"]["proposal"]["voters"] = [placement, "n1"]
    body["status"]["proposal"]["attestedSince"] = stamp(since)
    return body


def run_claims(v: Voter, *claims: dict[str, Any]) -> None:
    async def run() -> None:
        for body in claims:
            await v.handle(body)
            await asyncio.wait_for(v.ballot("n1").idle(), 5)

    asyncio.run(run())


def test_a_witness_answers_by_attestation_and_one_write_answers_the_next_proposals() -> None:
    server = FakeApiServer(
        404,  # thresholds: the defaults
        lease_list("p1", "p2"),
        capacity_node("p1").wire(),
        ballot_body(),  # the ballot created
        ballot_body(),  # the attestation of p1
        capacity_node("p2").wire(),
        ballot_body(),  # p2
        ballot_body(),  # a proposal that takes only newer attestations: p1 again
        ballot_body(),  # and again, p2's dropped
    )
    now = [NOW]
    v = Voter(server.client(), {"n1": voter_node(Window(0.2))}, "capacity-system", lambda: now[0])
    run_claims(v, attesting("c1", "p1", NOW - 5))
    status = server.sent(4)[4]["status"]
    assert status == {"alive": {"p1": stamp(NOW)}}  # no vote: the attestation answers
    assert len(server.requests) == 5

    # the next proposals on p1 made within the time take the attestation: no write, no read
    now[0] += 0.5
    run_claims(v, attesting("c2", "p1", NOW - 4.5), attesting("c3", "p1", NOW - 4))
    assert len(server.requests) == 5
    assert v.votes_cast == 0

    # a proposal on another node: one write attests it; p1's attestation stays as it was
    run_claims(v, attesting("c4", "p2", NOW - 4.5))
    both = {"p1": stamp(NOW), "p2": stamp(NOW + 0.5)}
    assert server.sent(6)[4]["status"] == {"alive": both}

    # a proposal that counts only attestations newer than this agent's clock says (it runs
    # behind the operator's): timed at the proposal's bound, not before it, so that it counts.
    # p2's attestation is older than that bound, but c4's open proposal relies on it: it stays
    run_claims(v, attesting("c5", "p1", NOW + 3))
    assert server.sent(7)[4]["status"]["alive"] == {"p1": stamp(NOW + 3), "p2": stamp(NOW + 0.5)}
    assert v.ballot("n1").attested("p1") == datetime.fromtimestamp(NOW + 3, UTC)

    # c4 is admitted: nothing relies on p2's attestation any more, and the next write drops it
    # (no proposal made from then on can count it)
    admitted = attesting("c4", "p2", NOW - 4.5)
    admitted["status"]["phase"] = "Admitted"
    run_claims(v, admitted, attesting("c6", "p1", NOW + 4))
    assert server.sent(8)[4]["status"]["alive"] == {"p1": stamp(NOW + 4), "p2": None}
    assert v.ballot("n1").attested("p2") is None
    assert set(v.ballot("n1").relied) == {"uid-c1", "uid-c2", "uid-c3", "uid-c5", "uid-c6"}


def test_a_witness_attests_the_nodes_named_ahead_so_that_proposals_placed_there_cost_no_write() -> (
    None
):
    server = FakeApiServer(
        404,  # thresholds: the defaults
        lease_list("p1", "p2", "p3", "n1"),
        capacity_node("p1").wire(),
        capacity_node("p2").wire(),
        404,  # "gone": no CapacityNode (and no Lease)
        capacity_node("p3").wire(),
        ballot_body(),  # the ballot created
        ballot_body(),  # one write: p1, and p2 and p3 ahead
    )
    now = [NOW]
    v = Voter(server.client(), {"n1": voter_node(Window(0.2))}, "capacity-system", lambda: now[0])
    first = attesting("c1", "p1", NOW - 5)
    first["status"]["proposal"]["ahead"] = ["p2", "gone", "n1", "p3"]
    run_claims(v, first)
    # the witness does not attest itself, nor a node it does not see alive; a node ahead that
    # is not alive is no reason for a NO: nobody votes on it
    assert server.sent(7)[4]["status"] == {"alive": {n: stamp(NOW) for n in ("p1", "p2", "p3")}}
    assert len(server.requests) == 8
    assert v.votes_cast == 0

    # placement moves on to p2, then p3: both already attested, no write and no read
    now[0] += 1
    moved = attesting("c2", "p2", NOW - 4)
    moved["status"]["proposal"]["ahead"] = ["p3", "p4"]
    run_claims(v, moved, attesting("c3", "p3", NOW - 4))
    assert len(server.requests) == 8
    assert v.votes_cast == 0


def test_a_witness_that_does_not_see_a_placement_node_alive_votes_no_and_stops_attesting_it() -> (
    None
):
    server = FakeApiServer(
        404,
        lease_list("p1"),
        capacity_node("p1").wire(),
        ballot_body(),
        ballot_body(),  # p1 attested alive
        404,  # a while later: the thresholds again,
        lease_list(),  # and p1's Lease is gone (its CapacityNode is still cached)
        ballot_body(),  # a NO vote, and p1's attestation removed
    )
    now = [NOW]
    v = Voter(server.client(), {"n1": voter_node(Window(0.2))}, "capacity-system", lambda: now[0])
    run_claims(v, attesting("c1", "p1", NOW - 5))
    assert server.sent(4)[4]["status"] == {"alive": {"p1": stamp(NOW)}}
    now[0] += 6  # past the attestation's time for the next proposal
    run_claims(v, attesting("c2", "p1", NOW + 1))
    assert len(server.requests) == 8
    status = server.sent(7)[4]["status"]
    assert status["alive"] == {"p1": None}
    vote = status["votes"]["uid-c2"]
    assert (vote["vote"], vote["role"], vote["epoch"]) == ("NO", "witness", 4)
    assert "p1: no lease" in vote["reason"]
    assert v.ballot("n1").attested("p1") is None


def test_a_failed_attestation_write_is_retried_and_an_earlier_runs_attestations_are_cleared() -> (
    None
):
    earlier = ballot_body()
    earlier["status"]["alive"] = {"gone": stamp(NOW - 600)}
    server = FakeApiServer(404, lease_list("p1"), capacity_node("p1").wire(), earlier, 500,
                           ballot_body())  # fmt: skip
    v = voter(server)
    v.ballot("n1").backoff = Backoff(initial=0.001, cap=0.001)
    run_claims(v, attesting("c1", "p1", NOW - 5))
    assert server.sent(4)[4] == server.sent(5)[4]  # the same patch again, nothing half-written
    assert server.sent(5)[4]["status"] == {"alive": {"gone": None, "p1": stamp(NOW)}}
    assert v.ballot("n1").alive_held == {"p1": datetime.fromtimestamp(NOW, UTC)}


def test_attestations_keep_the_nodes_attested_most_recently_within_the_bound() -> None:
    old = {f"old{i}": datetime.fromtimestamp(NOW - 100 + i / 10, UTC) for i in range(MAX_ATTESTED)}
    full = ballot_body()  # the ballot as found: full of this process's attestations
    full["status"]["alive"] = {n: t.isoformat() for n, t in old.items()}
    server = FakeApiServer(full, ballot_body())
    v = voter(server)
    writer = v.ballot("n1")
    writer.alive = dict(old)

    async def run() -> None:
        writer.attest({"new": datetime.fromtimestamp(NOW, UTC)})
        # an attestation older than the one queued changes nothing
        writer.attest({"new": datetime.fromtimestamp(NOW - 1, UTC)})
        await asyncio.wait_for(writer.idle(), 5)

    asyncio.run(run())
    alive = server.sent(1)[4]["status"]["alive"]
    assert alive["old0"] is None  # the oldest went...
    assert alive["new"] == stamp(NOW)
    assert sum(1 for t in alive.values() if t is not None) == MAX_ATTESTED  # ...and only it
    assert len(writer.alive_held) == MAX_ATTESTED
    assert len(server.requests) == 2


def test_a_node_attested_while_a_write_is_in_flight_keeps_the_nodes_that_write_carries() -> None:
    # p1's attestation is being written when p2's is queued: the next write adds p2 and keeps
    # p1 (building it from what was written before would remove p1, and with it the answer to
    # every proposal on p1 that the first write gave)
    def slow(request: httpx2.Request) -> httpx2.Response:
        time.sleep(0.15)
        return httpx2.Response(200, json=ballot_body())

    server = FakeApiServer(ballot_body(), slow, ballot_body())
    writer = voter(server).ballot("n1")

    async def run() -> None:
        writer.attest({"p1": datetime.fromtimestamp(NOW, UTC)})
        await asyncio.sleep(0.05)  # p1's write is in flight
        writer.attest({"p2": datetime.fromtimestamp(NOW + 1, UTC)})
        assert writer.attested("p1") is not None
        await asyncio.wait_for(writer.idle(), 5)

    asyncio.run(run())
    assert server.sent(1)[4]["status"]["alive"] == {"p1": stamp(NOW)}
    assert server.sent(2)[4]["status"]["alive"] == {"p1": stamp(NOW), "p2": stamp(NOW + 1)}
    assert set(writer.alive_held) == {"p1", "p2"}


def test_attestations_are_written_again_into_a_ballot_created_again() -> None:
    # the operator deleted the ballot (with its CapacityNode) and the agent creates it again:
    # what it attests must be in the new ballot, not only in its memory
    server = FakeApiServer(ballot_body(), ballot_body(), 404, ballot_body(), ballot_body())
    writer = voter(server).ballot("n1")
    writer.backoff = Backoff(initial=60, cap=60)  # a backoff would outlast the test

    async def run() -> None:
        writer.attest({"p1": datetime.fromtimestamp(NOW, UTC)})
        await asyncio.wait_for(writer.idle(), 5)
        # the ballot is gone when the next write, a vote, goes out
        writer.put("uid-c1", BallotVote(**a_vote().model_dump(), claim="team/c1"))
        await asyncio.wait_for(writer.idle(), 5)

    asyncio.run(run())
    paths = [r.url.path for r in server.requests]
    assert paths == [BALLOT, BALLOT_STATUS, BALLOT_STATUS, BALLOT, BALLOT_STATUS]
    status = server.sent(4)[4]["status"]
    assert set(status["votes"]) == {"uid-c1"}
    assert status["alive"] == {"p1": stamp(NOW)}
    assert writer.alive_held == writer.alive
