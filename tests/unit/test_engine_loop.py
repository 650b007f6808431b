"""The admission engine in loop time: its cycle, flow control, conflicts, deadlines and the
ledger, against an in-memory API (compare-and-swap on resourceVersion, conflicts on demand) and
a clock the test moves. The agents' votes are written by the test into the nodes' ballots, as an
agent's ballot write would.

A fake is fine here: these are unit tests of the engine's logic; the same protocol runs against
the real API server in tests/integration/test_admission*.py.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonpatch
import pytest

from capacity_api.lease import LeaseInfo
from capacity_api.models import MAX_BALLOT_VOTES, Substrate
from capacity_operator import protocol
from capacity_operator.kube import ConflictError, NotFoundError
from capacity_operator.protocol import Engine
from capacity_operator.settings import OperatorSettings

pytestmark = pytest.mark.unit

JSON = dict[str, Any]
START = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def merge(target: JSON, patch: JSON) -> JSON:
    """RFC 7386 JSON merge patch, as the API server applies it."""
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class FakeApi:
    """Claims and CapacityNodes with resourceVersions; a status patch carrying a resourceVersion
    that is not the object's current one is refused with a conflict, as the API server does."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self.clock = clock
        self.claims: dict[tuple[str, str], JSON] = {}
        self.nodes: dict[str, JSON] = {}
        self.ballots: dict[str, JSON] = {}
        self.leases: list[LeaseInfo] = []
        self.versions = itertools.count(1)
        self.conflicts: dict[str, int] = {}
        """Object name -> status writes still to refuse with a conflict (someone else wrote)."""
        self.writes: list[tuple[str, str]] = []
        self.reads = 0
        self.configmap: dict[str, str] = {}
        self.lose_response: set[str] = set()
        """Claims whose next status write lands but whose response is lost (a timeout)."""

    def _stamp(self, body: JSON) -> JSON:
        body["metadata"]["resourceVersion"] = str(next(self.versions))
        return copy.deepcopy(body)

    def add_claim(self, name: str, cgeo: float, namespace: str = "ns") -> JSON:
        created = self.clock() + timedelta(microseconds=len(self.claims))
        body: JSON = {
            "apiVersion": "capacity.platform.dev/v1alpha1",
            "kind": "CapacityClaim",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": f"uid-{name}",
                "generation": 1,
                "creationTimestamp": created.isoformat().replace("+00:00", "Z"),
            },
            "spec": {"cGeo": cgeo},
        }
        self.claims[(namespace, name)] = body
        return self._stamp(body)

    def add_node(self, name: str) -> JSON:
        now = self.clock().isoformat().replace("+00:00", "Z")
        body: JSON = {
            "apiVersion": "capacity.platform.dev/v1alpha1",
            "kind": "CapacityNode",
            "metadata": {"name": name},
            "spec": {"nodeName": name, "substrates": ["host"],
                     "capacity": {"cpu": "8", "memory": "32Gi"}},
            "status": {
                "conditions": [{"type": "Ready", "status": "True", "reason": "Measuring",
                                "message": "", "lastTransitionTime": now}],
                "readings": {"host": {"load": {"mean": 0.1, "p95": 0.1, "max": 0.1},
                                      "observedAt": now, "samples": 64}},
            },
        }  # fmt: skip
        self.nodes[name] = body
        self.leases.append(LeaseInfo(name=name, renew_time=self.clock(), duration_seconds=3600))
        return self._stamp(body)

    def claim(self, name: str, namespace: str = "ns") -> JSON:
        return copy.deepcopy(self.claims[(namespace, name)])

    def admit_elsewhere(self, node: str, share: float) -> None:
        """Another operator copy's commit: claim "other" Admitted on ``node``, its holder in
        the node's ledger (the engine under test has not seen either yet)."""
        body = self.nodes[node]
        body["status"]["allocated"] = {"host": {"share": share, "claims": 1, "holders": [
            {"claim": "ns/other", "uid": "uid-other", "epoch": 1, "share": share}]}}  # fmt: skip
        self._stamp(body)
        self.add_claim("other", share)
        self.claims[("ns", "other")]["status"] = {
            "phase": "Admitted", "placements": [
                {"node": node, "substrate": "host", "share": share, "epoch": 1}]}  # fmt: skip

    # -- what the engine calls ---------------------------------------------------------------

    async def get_claim(self, namespace: str, name: str) -> JSON:
        self.reads += 1
        if (namespace, name) not in self.claims:
            raise NotFoundError(name)
        return self.claim(name, namespace)

    async def list_claims(self) -> list[JSON]:
        return [copy.deepcopy(b) for b in self.claims.values()]

    async def patch_claim_status_cas(
        self, namespace: str, name: str, resource_version: str, status: JSON
    ) -> JSON:
        body = self.claims.get((namespace, name))
        if body is None:
            raise NotFoundError(name)
        return self._cas(name, body, resource_version, status)

    async def patch_claim_status_guarded(self, namespace: str, name: str, ops: list[JSON]) -> JSON:
        """A JSON patch: a failed ``test`` (or a ``remove`` of what is missing) is refused with
        422, which the real client turns into a conflict."""
        await asyncio.sleep(0)  # a request takes time: other steps run meanwhile
        body = self.claims.get((namespace, name))
        if body is None:
            raise NotFoundError(name)
        if self.conflicts.get(name, 0) > 0:
            self.conflicts[name] -= 1
            self._stamp(body)
            raise ConflictError(name)
        try:
            patched = jsonpatch.apply_patch(body, ops)
        except (jsonpatch.JsonPatchTestFailed, jsonpatch.JsonPatchConflict) as exc:
            raise ConflictError(name) from exc
        body.clear()
        body.update(patched)
        self.writes.append((body["kind"], name))
        stamped = self._stamp(body)
        if name in self.lose_response:
            self.lose_response.discard(name)
            raise TimeoutError(f"{name}: no response")
        return stamped

    async def get_node(self, name: str) -> JSON:
        self.reads += 1
        if name not in self.nodes:
            raise NotFoundError(name)
        return copy.deepcopy(self.nodes[name])

    async def list_nodes(self) -> list[JSON]:
        return [copy.deepcopy(b) for b in self.nodes.values()]

    async def delete_ballot(self, name: str) -> None:
        self.ballots.pop(name, None)
        self.writes.append(("CapacityBallot", name))

    async def patch_node_status_cas(self, name: str, resource_version: str, status: JSON) -> JSON:
        if name not in self.nodes:
            raise NotFoundError(name)
        await asyncio.sleep(0)  # a request takes time: other steps run meanwhile
        return self._cas(name, self.nodes[name], resource_version, status)

    async def patch_node_status(self, name: str, status: JSON) -> JSON:
        """The ledger's report: a merge patch without a resourceVersion check."""
        if name not in self.nodes:
            raise NotFoundError(name)
        await asyncio.sleep(0)
        body = self.nodes[name]
        body["status"] = merge(body.get("status") or {}, status)
        self.writes.append((body["kind"], name))
        return self._stamp(body)

    async def list_leases(self, namespace: str) -> list[LeaseInfo]:
        return list(self.leases)

    async def get_configmap_data(self, namespace: str, name: str) -> dict[str, str]:
        return dict(self.configmap)

    def _cas(self, name: str, body: JSON, resource_version: str, status: JSON) -> JSON:
        if self.conflicts.get(name, 0) > 0:
            self.conflicts[name] -= 1
            self._stamp(body)  # someone else's write moved it on
            raise ConflictError(name)
        if resource_version != body["metadata"]["resourceVersion"]:
            raise ConflictError(name)
        body["status"] = merge(body.get("status") or {}, status)
        self.writes.append((body["kind"], name))
        return self._stamp(body)

    # -- what an agent does -------------------------------------------------------------------

    def vote_all(self, value: str = "YES", only: set[str] | None = None) -> int:
        """Every voter (or those in ``only``) of every open proposal votes: one ballot write
        per node carries its votes on every claim. Returns the votes written."""
        written = 0
        for body in self.claims.values():
            status = body.get("status") or {}
            proposal = status.get("proposal")
            if status.get("phase") not in ("Voting", "Recovering") or proposal is None:
                continue
            uid = body["metadata"]["uid"]
            for voter in proposal["voters"]:
                if only is not None and voter not in only:
                    continue
                ballot = self.ballots.setdefault(
                    voter, {"kind": "CapacityBallot", "metadata": {"name": voter},
                            "spec": {"nodeName": voter}, "status": {"votes": {}}},
                )  # fmt: skip
                votes = ballot["status"]["votes"]
                if (votes.get(uid) or {}).get("epoch") == proposal["epoch"]:
                    continue
                role = "placement" if voter in proposal["placement"] else "witness"
                votes[uid] = {"vote": value, "role": role, "epoch": proposal["epoch"],
                              "reason": "test", "claim": body["metadata"]["name"]}  # fmt: skip
                written += 1
        return written


class Harness:
    def __init__(self, nodes: int = 4, **settings: Any) -> None:
        self.now = START
        self.api = FakeApi(lambda: self.now)
        for i in range(nodes):
            self.api.add_node(f"n{i}")
        self.events: list[tuple[str, str, str]] = []
        # reports at once unless a test says otherwise: most look at what a report says, not
        # at when it goes (test_a_nodes_report_gathers_the_commits_of_a_busy_moment does)
        defaults = {"vote_timeout_seconds": 10.0, "ledger_report_gather_seconds": 0.0}
        self.settings = OperatorSettings(**{**defaults, **settings})

    def emit(self, body: JSON, type_: str, reason: str, message: str) -> None:
        self.events.append((body["metadata"]["name"], reason, message))

    async def engine(self) -> Engine:
        engine = Engine(self.api, self.settings, self.emit, clock=lambda: self.now)  # type: ignore[arg-type]
        await engine.start()
        return engine

    async def deliver(self, engine: Engine) -> None:
        """The watches: every claim and ballot as it is now reaches the engine (no lag)."""
        for body in list(self.api.claims.values()):
            engine.observe_claim(copy.deepcopy(body))
        for ballot in list(self.api.ballots.values()):
            engine.observe_ballot(copy.deepcopy(ballot))

    async def settle(self, engine: Engine) -> None:
        """Watch events, one cycle, and every step it started run to its end."""
        await self.deliver(engine)
        engine.cycle()
        await engine.drain()

    async def admit(self, engine: Engine) -> None:
        """One cycle proposes, every voter says YES, the next cycle commits."""
        await self.settle(engine)
        self.api.vote_all()
        await self.settle(engine)

    def phases(self) -> dict[str, str | None]:
        return {n: (b.get("status") or {}).get("phase") for (_, n), b in self.api.claims.items()}


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def test_flow_control_opens_at_most_max_open_proposals_oldest_first() -> None:
    h = Harness(nodes=4, max_open_proposals=3)
    for i in range(8):
        h.api.add_claim(f"c{i}", 0.1)

    async def scenario() -> None:
        engine = await h.engine()
        await h.settle(engine)
        # three epochs open, for the three oldest claims; the five others are untouched
        assert h.phases() == {f"c{i}": ("Voting" if i < 3 else None) for i in range(8)}
        assert len(h.api.writes) == 3
        h.api.vote_all()
        await h.settle(engine)  # the three commit; their slots go to the next three
        await h.settle(engine)
        phases = h.phases()
        assert [phases[f"c{i}"] for i in range(8)] == ["Admitted"] * 3 + ["Voting"] * 3 + [None] * 2
        for _ in range(3):
            h.api.vote_all()
            await h.settle(engine)
            await h.settle(engine)
        assert set(h.phases().values()) == {"Admitted"}

    run(scenario)


def test_one_admission_costs_two_claim_writes_and_the_ledger_report_follows() -> None:
    h = Harness(nodes=3)
    h.api.add_claim("only", 0.2)

    async def scenario() -> None:
        engine = await h.engine()
        await h.admit(engine)
        assert h.phases() == {"only": "Admitted"}
        # the proposal and the commit; no ledger write on the way, no re-reads, no retries
        assert [k for k, _ in h.api.writes] == ["CapacityClaim", "CapacityClaim"]
        placed = h.api.claim("only")["status"]["placements"][0]["node"]
        assert engine.ledger.allocations(placed)["host"].share == pytest.approx(0.2)
        # the next cycle reports the ledger in the node's status.allocated (a quiet node: at
        # once); a watch event of our own write is not news, and the report is not repeated
        await h.settle(engine)
        await h.settle(engine)
        assert h.api.writes[2:] == [("CapacityNode", placed)]
        holders = h.api.nodes[placed]["status"]["allocated"]["host"]["holders"]
        assert [(x["claim"], x["share"]) for x in holders] == [("ns/only", 0.2)]

    run(scenario)


def test_a_conflicting_claim_write_is_read_again_and_decided_once() -> None:
    h = Harness(nodes=3)
    h.api.add_claim("c", 0.2)
    h.api.conflicts["c"] = 2  # two writes of someone else land first

    async def scenario() -> None:
        engine = await h.engine()
        await h.settle(engine)
        status = h.api.claim("c")["status"]
        assert status["phase"] == "Voting"
        assert status["proposal"]["epoch"] == 1  # one proposal, not one per attempt
        assert status["attempts"] == 1
        assert h.api.writes == [("CapacityClaim", "c")]  # one proposal written

    run(scenario)


def test_capacity_taken_between_the_votes_and_the_commit_aborts_and_proposes_elsewhere() -> None:
    h = Harness(nodes=2)
    h.api.add_claim("c", 0.5)

    async def scenario() -> None:
        engine = await h.engine()
        await h.settle(engine)
        first = h.api.claim("c")["status"]["proposal"]["placement"][0]
        h.api.vote_all()
        # another operator's commit fills the node; its claim event reaches this engine
        # between the votes and the commit
        h.api.admit_elsewhere(first, 0.9)
        await h.settle(engine)
        status = h.api.claim("c")["status"]
        assert status["phase"] == "Voting"
        assert status["proposal"]["epoch"] == 2
        assert status["proposal"]["placement"] != [first]
        assert first in status["refusals"]
        assert "CapacityTaken" in [r for _, r, _ in h.events]
        assert engine.ledger.allocations(first)["host"].share == pytest.approx(0.9)  # not ours

    run(scenario)


def test_a_missed_deadline_aborts_at_its_time_and_proposes_again() -> None:
    h = Harness(nodes=3)
    h.api.add_claim("c", 0.2)

    async def scenario() -> None:
        engine = await h.engine()
        await h.settle(engine)
        assert h.api.claim("c")["status"]["proposal"]["epoch"] == 1
        h.now += timedelta(seconds=9)
        engine.cycle()
        await engine.drain()
        assert h.api.claim("c")["status"]["proposal"]["epoch"] == 1  # not yet
        h.now += timedelta(seconds=2)
        engine.cycle()  # no event: the deadline alone wakes it
        await engine.drain()
        status = h.api.claim("c")["status"]
        assert status["proposal"]["epoch"] == 2
        assert status["attempts"] == 2
        assert "DeadlinePassed" in [r for _, r, _ in h.events]

    run(scenario)


def test_deleted_claims_holders_are_freed_by_the_event_or_by_the_garbage_collection() -> None:
    h = Harness(nodes=2, ledger_gc_seconds=30)
    h.api.add_claim("seen", 0.3)
    h.api.add_claim("missed", 0.3)

    def held(engine: Engine) -> float:
        return sum(a.share for n in h.api.nodes for a in engine.ledger.allocations(n).values())

    def reported() -> float:
        return sum(
            x["share"]
            for n in h.api.nodes.values()
            for a in ((n.get("status") or {}).get("allocated") or {}).values()
            for x in a["holders"]
        )

    async def scenario() -> None:
        engine = await h.engine()
        await h.admit(engine)
        await h.settle(engine)
        assert held(engine) == pytest.approx(0.6)
        assert reported() == pytest.approx(0.6)
        seen = h.api.claims.pop(("ns", "seen"))
        engine.observe_claim(seen, deleted=True)  # the watch saw this deletion
        h.api.claims.pop(("ns", "missed"))  # and missed this one
        assert held(engine) == pytest.approx(0.3)  # freed with the event
        h.now += timedelta(seconds=31)
        engine.cycle()  # garbage collection is due
        await engine.drain()
        assert held(engine) == pytest.approx(0.0)
        engine.cycle()  # the report follows (each node written at most every 10 s)
        await engine.drain()
        assert reported() == pytest.approx(0.0)

    run(scenario)


def test_a_claim_without_room_waits_unwritten_and_is_admitted_when_the_room_is_freed() -> None:
    # DESIGN section 5: a claim that cannot be placed now waits; it is never retried into a
    # storm, nor rejected because other claims hold the room for the moment
    h = Harness(nodes=1)
    h.api.add_claim("first", 0.6)
    h.api.add_claim("second", 0.6)

    async def scenario() -> None:
        engine = await h.engine()
        await h.settle(engine)
        assert h.phases() == {"first": "Voting", "second": "Pending"}
        second = h.api.claim("second")["status"]
        assert second["reason"] == "WaitingForCapacity"
        assert "open proposals of other claims" in second["message"]
        h.api.vote_all()
        await h.settle(engine)  # the first commits: its share is taken for good
        h.now += timedelta(seconds=11)
        engine.cycle()  # looked at again (every 10 s): still no room, and still waiting
        await engine.drain()
        assert h.phases() == {"first": "Admitted", "second": "Pending"}
        second = h.api.claim("second")["status"]
        assert second["reason"] == "WaitingForCapacity"
        assert "admitted claims hold it" in second["message"]  # what it waits for changed
        writes = len(h.api.writes)
        for _ in range(5):  # waiting costs no write, however often it is looked at
            h.now += timedelta(seconds=2)  # (the nodes' readings stay fresh for 30 s here)
            await h.settle(engine)
        assert len(h.api.writes) == writes
        waits = [e for e in h.events if e[:2] == ("second", "WaitingForCapacity")]
        assert len(waits) == 1  # one Event when it started waiting
        # the first is deleted: its holder goes, and that wakes the waiting claim at once
        first = h.api.claims.pop(("ns", "first"))
        engine.observe_claim(first, deleted=True)  # frees the holder
        # the freed room wakes the waiting claim within a second (a pass over the waiting
        # claims runs at most once a second), without waiting for its 10 s
        h.now += timedelta(seconds=1)
        engine.cycle()
        await engine.drain()
        assert h.phases() == {"second": "Voting"}
        h.api.vote_all()
        await h.settle(engine)
        assert h.phases() == {"second": "Admitted"}

    run(scenario)


def test_room_freed_goes_to_the_oldest_waiting_claim_it_fits_the_others_are_not_touched() -> None:
    h = Harness(nodes=1)
    h.api.add_claim("holder", 0.6)

    async def scenario() -> None:
        engine = await h.engine()
        await h.admit(engine)
        for name in ("older", "younger"):
            h.api.add_claim(name, 0.6)
            await h.settle(engine)
        assert h.phases() == {"holder": "Admitted", "older": "Pending", "younger": "Pending"}
        writes = len(h.api.writes)
        holder = h.api.claims.pop(("ns", "holder"))
        engine.observe_claim(holder, deleted=True)
        engine.cycle()  # frees the holder
        await engine.drain()
        engine.cycle()  # one pass over the waiting claims, oldest first
        await engine.drain()
        # "older" takes the room; "younger", which the same room would have fitted, is left
        # waiting, and not written
        assert h.phases() == {"older": "Voting", "younger": "Pending"}
        assert h.api.writes[writes:] == [("CapacityClaim", "older")]

    run(scenario)


def test_a_pass_over_the_waiting_claims_places_only_the_oldest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(protocol, "ROOM_PASS_CLAIMS", 1)
    h = Harness(nodes=2)
    h.api.add_claim("a", 0.6)
    h.api.add_claim("b", 0.6)

    async def scenario() -> None:
        engine = await h.engine()
        await h.admit(engine)
        for name in ("older", "younger"):
            h.api.add_claim(name, 0.6)
            await h.settle(engine)
        for name in ("a", "b"):  # room for both waiting claims
            engine.observe_claim(h.api.claims.pop(("ns", name)), deleted=True)
        engine.cycle()
        await engine.drain()
        engine.cycle()  # the pass takes the oldest waiting claim only
        await engine.drain()
        assert h.phases() == {"older": "Voting", "younger": "Pending"}

    run(scenario)


def test_a_claim_refused_by_the_votes_of_every_node_is_rejected_not_kept_waiting() -> None:
    h = Harness(nodes=1)
    h.api.add_claim("c", 0.3)

    async def scenario() -> None:
        engine = await h.engine()
        await h.settle(engine)
        h.api.vote_all(value="NO")
        await h.settle(engine)
        await h.settle(engine)
        assert h.phases() == {"c": "Rejected"}
        status = h.api.claim("c")["status"]
        assert status["reason"] == "InsufficientCapacity"
        assert "refused by n0: test" in status["message"]

    run(scenario)


def test_a_vote_landing_after_the_quorum_does_not_make_the_commit_conflict() -> None:
    h = Harness(nodes=3)
    h.api.add_claim("c", 0.2)

    async def scenario() -> None:
        engine = await h.engine()
        await h.settle(engine)
        proposal = h.api.claim("c")["status"]["proposal"]
        late = [v for v in proposal["voters"] if v not in proposal["placement"]][-1]
        h.api.vote_all(only=set(proposal["voters"]) - {late})  # placement + one witness
        await h.deliver(engine)  # the engine sees the quorum...
        h.api.vote_all(only={late})  # ...and the last witness votes before the commit lands
        reads = h.api.reads
        engine.cycle()
        await engine.drain()
        assert h.phases() == {"c": "Admitted"}
        assert h.api.reads == reads  # no conflict, no re-read
        assert [k for k, _ in h.api.writes] == ["CapacityClaim", "CapacityClaim"]

    run(scenario)


def test_a_spec_change_fails_the_guard_and_the_admission_starts_over() -> None:
    h = Harness(nodes=3)
    h.api.add_claim("c", 0.2)

    async def scenario() -> None:
        engine = await h.engine()
        await h.settle(engine)
        h.api.vote_all()
        await h.deliver(engine)  # the engine would commit epoch 1...
        body = h.api.claims[("ns", "c")]
        body["metadata"]["generation"] = 2  # ...but the user changed the spec meanwhile
        body["spec"]["cGeo"] = 0.3
        h.api._stamp(body)
        engine.cycle()
        await engine.drain()
        status = h.api.claim("c")["status"]
        assert status["phase"] == "Voting"
        assert status["proposal"]["epoch"] == 2
        assert status["proposal"]["share"] == pytest.approx(0.3)
        assert status["observedGeneration"] == 2
        # the holder written for epoch 1 before the refused commit is gone again
        assert not any(
            a["holders"]
            for n in h.api.nodes.values()
            for a in ((n.get("status") or {}).get("allocated") or {}).values()
        )

    run(scenario)


def test_a_ballot_answers_every_claim_of_its_node_and_the_commit_keeps_the_counted_votes() -> None:
    h = Harness(nodes=8)
    for name in ("a", "b", "c", "d"):
        h.api.add_claim(name, 0.1)

    async def scenario() -> None:
        engine = await h.engine()
        await h.settle(engine)
        # witnesses are the first live nodes by name that do not hold the claim: the same
        # few nodes witness every proposal
        placements = set()
        for name in "abcd":
            proposal = h.api.claim(name)["status"]["proposal"]
            placements.update(proposal["placement"])
            others = [f"n{i}" for i in range(8) if f"n{i}" not in proposal["placement"]]
            assert proposal["voters"] == [*proposal["placement"], *others[:2]]
        assert h.api.vote_all() == 12
        assert set(h.api.ballots) == placements | {"n0", "n1", "n2"}  # one per node, not per claim
        await h.settle(engine)
        assert set(h.phases().values()) == {"Admitted"}
        status = h.api.claim("a")["status"]
        assert sorted(status["votes"]) == sorted(status["proposal"]["voters"])
        assert all(v["vote"] == "YES" and v["epoch"] == 1 for v in status["votes"].values())
        assert all("claim" not in v for v in status["votes"].values())  # a claim's own Vote
        assert status["voteCount"] == "3/2"

    run(scenario)


def test_a_witness_attestation_answers_every_proposal_on_its_nodes_and_the_commit_shows_it() -> (
    None
):
    h = Harness(nodes=6, witness_attestation_seconds=5.0)
    for name in ("a", "b", "c"):
        h.api.add_claim(name, 0.1)

    async def scenario() -> None:
        engine = await h.engine()
        await h.settle(engine)
        proposals = {n: h.api.claim(n)["status"]["proposal"] for n in "abc"}
        since = {p["attestedSince"] for p in proposals.values()}
        assert since == {(START - timedelta(seconds=5)).isoformat().replace("+00:00", "Z")}
        placement = {node for p in proposals.values() for node in p["placement"]}
        witness = proposals["a"]["voters"][-1]
        assert all(witness in p["voters"] and witness not in p["placement"]
                   for p in proposals.values())  # fmt: skip
        # each names where the next claims go, for the witnesses to attest ahead: candidates
        # that are not its placement nodes
        for p in proposals.values():
            assert p["ahead"]
            assert not set(p["ahead"]) & set(p["placement"])
        h.api.vote_all(only=placement)  # the placement nodes vote; no witness votes

        def attest(at: datetime) -> None:
            h.api.ballots.setdefault(
                witness, {"kind": "CapacityBallot", "metadata": {"name": witness},
                          "spec": {"nodeName": witness}, "status": {"votes": {}}},
            )["status"]["alive"] = {n: at.isoformat() for n in placement}  # fmt: skip

        # seen alive before the proposals' bound: not an answer
        attest(START - timedelta(seconds=6))
        await h.settle(engine)
        assert set(h.phases().values()) == {"Voting"}
        # seen alive since: one write of the witness answers all three
        attest(START - timedelta(seconds=1))
        await h.settle(engine)
        assert set(h.phases().values()) == {"Admitted"}
        votes = h.api.claim("a")["status"]["votes"]
        assert votes[witness]["vote"] == "YES"
        assert votes[witness]["epoch"] == proposals["a"]["epoch"]
        assert "attested" in votes[witness]["reason"]

    run(scenario)


def test_votes_and_attestations_that_answer_a_proposal_before_its_write_returns_are_counted() -> (
    None
):
    # the agents may see a proposal, and answer it, before the operator's write of it has
    # returned: those answers must not wait for the deadline
    h = Harness(nodes=4, witness_attestation_seconds=5.0)
    h.api.add_claim("c", 0.1)

    async def scenario() -> None:
        engine = await h.engine()
        write = h.api.patch_claim_status_cas

        async def answered_early(namespace: str, name: str, version: str, status: JSON) -> JSON:
            body = await write(namespace, name, version, status)
            proposal = body["status"].get("proposal")
            if proposal and not h.api.ballots:
                (placement,) = proposal["placement"]
                h.api.vote_all(only={placement})
                witness = next(n for n in proposal["voters"] if n != placement)
                h.api.ballots[witness] = {
                    "kind": "CapacityBallot", "metadata": {"name": witness},
                    "spec": {"nodeName": witness},
                    "status": {"votes": {}, "alive": {placement: h.now.isoformat()}},
                }  # fmt: skip
                for ballot in h.api.ballots.values():
                    engine.observe_ballot(copy.deepcopy(ballot))
            return body

        h.api.patch_claim_status_cas = answered_early  # type: ignore[method-assign]
        await h.settle(engine)
        await h.settle(engine)
        assert h.phases() == {"c": "Admitted"}  # no time passed: not at the deadline

    run(scenario)


def test_without_an_attestation_window_proposals_take_witness_votes_only() -> None:
    h = Harness(nodes=3, witness_attestation_seconds=0)
    h.api.add_claim("c", 0.2)

    async def scenario() -> None:
        engine = await h.engine()
        await h.settle(engine)
        assert "attestedSince" not in h.api.claim("c")["status"]["proposal"]

    run(scenario)


def test_a_ballot_vote_for_an_older_epoch_never_counts() -> None:
    h = Harness(nodes=3)
    h.api.add_claim("c", 0.2)

    async def scenario() -> None:
        engine = await h.engine()
        await h.settle(engine)
        h.now += timedelta(seconds=11)  # epoch 1 misses its deadline: epoch 2 is proposed
        await h.settle(engine)
        assert h.api.claim("c")["status"]["proposal"]["epoch"] == 2
        assert h.api.ballots == {}  # no vote was written yet
        # every voter answers epoch 1 only (late votes of the aborted epoch)
        proposal = h.api.claim("c")["status"]["proposal"]
        for voter in proposal["voters"]:
            h.api.ballots[voter] = {
                "kind": "CapacityBallot", "metadata": {"name": voter},
                "spec": {"nodeName": voter},
                "status": {"votes": {"uid-c": {"vote": "YES", "role": "witness", "epoch": 1}}},
            }  # fmt: skip
        await h.settle(engine)
        assert h.phases() == {"c": "Voting"}
        h.api.vote_all()  # now for epoch 2
        await h.settle(engine)
        assert h.phases() == {"c": "Admitted"}

    run(scenario)


def test_open_epochs_are_bounded_by_what_a_ballot_holds() -> None:
    # a witness votes on every open epoch: more than half a ballot is refused at start
    with pytest.raises(ValueError, match="max_open_proposals"):
        OperatorSettings(max_open_proposals=MAX_BALLOT_VOTES // 2 + 1)
    assert OperatorSettings(max_open_proposals=MAX_BALLOT_VOTES // 2).max_open_proposals == 128


def test_a_removed_nodes_ballot_is_deleted_with_it() -> None:
    h = Harness(nodes=3)
    h.api.add_claim("c", 0.2)

    async def scenario() -> None:
        engine = await h.engine()
        await h.admit(engine)
        assert set(h.api.ballots) == {"n0", "n1", "n2"}
        gone = h.api.nodes.pop("n2")
        engine.observe_node(gone, deleted=True)  # the watch sees the CapacityNode deleted
        await engine.drain()
        assert set(h.api.ballots) == {"n0", "n1"}
        assert "n2" not in engine.ballots

    run(scenario)


def test_placement_sees_every_new_version_of_a_node_and_of_its_ledger() -> None:
    # the views are kept per node between proposals: new readings of a node, and a claim
    # admitted there (by another operator copy), must reach the next placement at once; what
    # the node's status.allocated says is a report, not what placement counts
    h = Harness(nodes=2)

    async def scenario() -> None:
        engine = await h.engine()
        before = {v.name: v.allocated(Substrate.HOST) for v in engine.views()}
        assert before == {"n0": 0.0, "n1": 0.0}
        assert engine.views()[0] is engine.views()[0]  # nothing changed: the same view
        body = copy.deepcopy(h.api.nodes["n0"])
        body["status"]["allocated"] = {"host": {"share": 0.9, "claims": 1, "holders": [
            {"claim": "ns/gone", "uid": "u-gone", "epoch": 1, "share": 0.9}]}}  # fmt: skip
        body["status"]["readings"]["host"]["load"]["p95"] = 0.3
        engine.observe_node(h.api._stamp(body))
        views = {v.name: v for v in engine.views()}
        assert views["n0"].allocated(Substrate.HOST) == 0.0  # a stale report: not counted
        h.api.admit_elsewhere("n0", 0.6)
        engine.observe_claim(h.api.claim("other"))
        views = {v.name: v for v in engine.views()}
        assert views["n0"].allocated(Substrate.HOST) == pytest.approx(0.6)
        assert views["n0"].headroom(Substrate.HOST) == pytest.approx(0.4)
        # an open proposal of a claim on n1 is counted there, and only while it is open
        h.api.add_claim("c", 0.25)
        await h.settle(engine)
        proposal = h.api.claims[("ns", "c")]["status"]["proposal"]
        assert proposal["placement"] == ["n1"]
        assert {v.name: v.allocated(Substrate.HOST) for v in engine.views()} == pytest.approx(
            {"n0": 0.6, "n1": 0.25}
        )
        assert engine.views(exclude_claim="uid-c")[1].allocated(Substrate.HOST) == 0.0

    run(scenario)


def test_commits_on_one_node_in_one_cycle_are_each_checked_against_the_ledger() -> None:
    # one node, no witnesses: every claim is placed there and committed in the same cycle
    h = Harness(nodes=1)
    for name in ("a", "b", "c", "d"):
        h.api.add_claim(name, 0.2)

    async def scenario() -> None:
        engine = await h.engine()
        await h.settle(engine)
        assert set(h.phases().values()) == {"Voting"}
        h.api.vote_all()
        # meanwhile another copy's claim, seen by the watch, takes 0.25 of the node: three of
        # the four still fit (theta_iso 0.15 leaves room for 0.85)
        h.api.admit_elsewhere("n0", 0.25)
        before = len(h.api.writes)
        await h.settle(engine)
        phases = h.phases()
        assert sorted(phases.values()) == ["Admitted"] * 4 + ["Rejected"]  # "other", 3 of ours
        ledger = engine.ledger.allocations("n0")["host"]
        assert ledger.share == pytest.approx(0.85)
        assert len(ledger.holders) == 4
        assert "CapacityTaken" in [r for _, r, _ in h.events]
        # no ledger write per commit: the node's report is written once, after the commits
        await h.settle(engine)
        node_writes = [k for k, _ in h.api.writes[before:] if k == "CapacityNode"]
        assert len(node_writes) == 1
        holders = h.api.nodes["n0"]["status"]["allocated"]["host"]["holders"]
        assert sum(x["share"] for x in holders) == pytest.approx(0.85)

    run(scenario)


def test_the_ledger_is_built_from_the_claims_on_start_not_from_the_nodes_reports() -> None:
    h = Harness(nodes=1)
    h.api.admit_elsewhere("n0", 0.6)  # admitted before this operator started
    h.api.nodes["n0"]["status"].pop("allocated")  # and its node's report lost
    h.api.add_claim("new", 0.6)

    async def scenario() -> None:
        engine = await h.engine()
        assert engine.ledger.allocations("n0")["host"].share == pytest.approx(0.6)
        engine.observe_claim(h.api.claim("new"))  # kopf's first events (not "other" yet)
        engine.cycle()
        await engine.drain()
        status = h.api.claim("new")["status"]
        assert (status["phase"], status["reason"]) == ("Pending", "WaitingForCapacity")
        assert h.api.nodes["n0"]["status"]["allocated"]["host"]["share"] == pytest.approx(0.6)

    run(scenario)


def test_a_commit_whose_write_outcome_is_unknown_keeps_its_share_until_its_claim_is_seen() -> None:
    h = Harness(nodes=1)
    h.api.add_claim("a", 0.5)

    async def scenario() -> None:
        engine = await h.engine()
        await h.settle(engine)
        h.api.vote_all()
        h.api.lose_response.add("a")  # the commit lands, its response never comes
        await h.settle(engine)
        assert h.phases() == {"a": "Admitted"}
        assert engine.ledger.allocations("n0")["host"].share == pytest.approx(0.5)
        # before the watch brings the admitted claim, another one must not get its room
        h.api.add_claim("b", 0.5)
        engine.observe_claim(h.api.claim("b"))
        engine.cycle()
        await engine.drain()
        assert h.phases() == {"a": "Admitted", "b": "Pending"}
        await h.settle(engine)  # the watch catches up: the status says what the hold said
        assert engine.ledger.allocations("n0")["host"].share == pytest.approx(0.5)
        assert h.phases() == {"a": "Admitted", "b": "Pending"}

    run(scenario)


def test_the_ledger_report_of_a_busy_node_is_written_at_most_once_per_spacing() -> None:
    h = Harness(nodes=1, ledger_report_seconds=10)
    for name in ("a", "b", "c"):
        h.api.add_claim(name, 0.2)

    async def scenario() -> None:
        engine = await h.engine()
        await h.admit(engine)
        await h.settle(engine)

        def reports() -> int:
            return sum(1 for kind, _ in h.api.writes if kind == "CapacityNode")

        assert reports() == 1  # the three commits, reported once
        engine.observe_claim(h.api.claims.pop(("ns", "a")), deleted=True)
        h.now += timedelta(seconds=5)
        await h.settle(engine)
        assert reports() == 1  # within the spacing: not yet
        h.now += timedelta(seconds=5)
        await h.settle(engine)
        assert reports() == 2
        held = h.api.nodes["n0"]["status"]["allocated"]["host"]
        assert sorted(x["claim"] for x in held["holders"]) == ["ns/b", "ns/c"]

    run(scenario)


def test_a_nodes_report_gathers_the_commits_of_a_busy_moment_into_one_write() -> None:
    h = Harness(nodes=1, ledger_report_seconds=10, ledger_report_gather_seconds=1)
    h.api.add_claim("a", 0.2)

    def reports() -> int:
        return sum(1 for kind, _ in h.api.writes if kind == "CapacityNode")

    def holders() -> list[str]:
        held = h.api.nodes["n0"]["status"]["allocated"]["host"]["holders"]
        return sorted(x["claim"] for x in held)

    async def scenario() -> None:
        engine = await h.engine()
        await h.admit(engine)
        await h.settle(engine)
        assert h.phases() == {"a": "Admitted"}
        assert reports() == 0  # the first commit waits for the others of its moment
        h.now += timedelta(seconds=0.5)
        for name in ("b", "c"):
            h.api.add_claim(name, 0.2)
        await h.admit(engine)
        await h.settle(engine)
        assert set(h.phases().values()) == {"Admitted"}
        assert reports() == 0
        h.now += timedelta(seconds=0.5)  # a second after the first commit: all three at once
        await h.settle(engine)
        assert reports() == 1
        assert holders() == ["ns/a", "ns/b", "ns/c"]

    run(scenario)


def test_the_loop_admits_with_nodes_to_report_and_never_spins_without_yielding() -> None:
    # every node is to be reported on start: the loop must let the report (and the steps) run
    h = Harness(nodes=2)
    h.api.add_claim("c", 0.2)

    async def scenario() -> None:
        engine = await h.engine()
        loop = asyncio.create_task(engine.run())

        async def phase(wanted: str) -> None:
            while (h.api.claim("c").get("status") or {}).get("phase") != wanted:
                await h.deliver(engine)
                await asyncio.sleep(0.01)

        try:
            await asyncio.wait_for(phase("Voting"), 5)
            h.api.vote_all()
            await asyncio.wait_for(phase("Admitted"), 5)
        finally:
            loop.cancel()
            await engine.drain()

    run(scenario)


def test_an_operator_serving_some_namespaces_reports_its_claims_and_keeps_the_others() -> None:
    h = Harness(nodes=1, claim_namespaces=["ns"])
    theirs = {"claim": "elsewhere/x", "uid": "u-x", "epoch": 1, "share": 0.3}
    h.api.nodes["n0"]["status"]["allocated"] = {
        "host": {"share": 0.3, "claims": 1, "holders": [theirs]}
    }
    h.api.add_claim("c", 0.2)

    async def scenario() -> None:
        engine = await h.engine()
        await h.admit(engine)
        await h.settle(engine)
        holders = h.api.nodes["n0"]["status"]["allocated"]["host"]["holders"]
        assert sorted(x["claim"] for x in holders) == ["elsewhere/x", "ns/c"]

    run(scenario)


def test_a_waiting_claims_own_timer_never_takes_room_that_an_older_waiting_claim_fits() -> None:
    # room freed between two passes (at most one a second) goes to the oldest claims it fits,
    # not to a younger claim whose 10 s timer happens to come first
    h = Harness(nodes=1)
    for name in ("h1", "h2"):
        h.api.add_claim(name, 0.4)

    async def step(*names: str, deleted: bool = False) -> None:
        for name in names:
            body = h.api.claims.pop(("ns", name)) if deleted else h.api.claim(name)
            engine.observe_claim(body, deleted=deleted)
        engine.cycle()
        await engine.drain()

    async def at(seconds: float, *names: str, deleted: bool = False) -> None:
        h.now = START + timedelta(seconds=seconds)
        await step(*names, deleted=deleted)

    async def scenario() -> None:
        nonlocal engine
        engine = await h.engine()
        await h.settle(engine)
        h.api.vote_all()
        await h.settle(engine)  # h1 and h2 hold 0.8 of the node
        h.api.add_claim("older1", 0.4)
        h.api.add_claim("older2", 0.4)
        h.now = START + timedelta(seconds=1)
        h.api.add_claim("young", 0.4)
        await at(2, "young")  # waits; looked at again at 12 s
        await at(5, "older1", "older2")  # wait; looked at again at 15 s
        assert set(h.phases().values()) == {"Admitted", "Pending"}
        await at(11.5, "h1", deleted=True)  # a pass: the room goes to older1
        await at(11.6, "h2", deleted=True)  # room again, the next pass not before 12.5 s
        await at(12.1)  # young's timer
        await at(12.6)  # the pass
        assert h.phases() == {"older1": "Voting", "older2": "Voting", "young": "Pending"}

    engine: Engine
    run(scenario)


def test_claims_whose_epochs_overlap_are_packed_onto_the_node_already_asked() -> None:
    # one ballot write of that node answers both; placement spreads claims whose epochs do not
    # overlap
    h = Harness(nodes=3)
    for name in ("a", "b"):
        h.api.add_claim(name, 0.2)

    async def scenario() -> None:
        engine = await h.engine()
        await h.settle(engine)
        placed = {n: h.api.claim(n)["status"]["proposal"]["placement"] for n in ("a", "b")}
        assert placed["a"] == placed["b"]
        h.api.vote_all()
        await h.settle(engine)
        h.api.add_claim("c", 0.2)  # after both committed: the emptiest node
        await h.settle(engine)
        assert h.api.claim("c")["status"]["proposal"]["placement"] != placed["a"]

    run(scenario)
