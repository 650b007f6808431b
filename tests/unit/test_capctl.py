"""capctl's pure renderers: the one-sentence why, votes (stale ones marked; an open proposal's
from the voters' ballots), gates, JSON, nodes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubernetes import client as kube_client
from kubernetes.client.rest import ApiException

import capacity_cli as capctl
import capacity_cli.cluster
from capacity_api.lease import LeaseInfo
from capacity_api.models import CapacityBallot, CapacityClaim, CapacityNode, Phase, Proposal, Truth
from capacity_cli import Calibration, EventInfo

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> str:
    return (NOW + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


FIT_YES = {
    "headroom": 0.7,
    "fitError": 0.0,
    "isolation": 0.5,
    "gluingDelta": 0.02,
    "lambda1": 0.1,
    "lambdaInt": 0.31,
    "entropy": 0.8,
}
FIT_NO = {**FIT_YES, "fitError": 0.31, "headroom": 0.05}


def vote(
    value: str, role: str, epoch: int, reason: str = "", readings: dict[str, float] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"vote": value, "role": role, "epoch": epoch, "time": at(-1)}
    if reason:
        body["reason"] = reason
    if readings is not None:
        body["readings"] = readings
    return body


def proposal(epoch: int, placement: list[str], voters: list[str], deadline: float = 3) -> Any:
    return {
        "epoch": epoch,
        "placement": placement,
        "voters": voters,
        "deadline": at(deadline),
        "share": 0.25,
        "substrate": "host",
    }


def claim(status: dict[str, Any] | None, **spec: Any) -> CapacityClaim:
    body: dict[str, Any] = {
        "metadata": {
            "name": "web",
            "namespace": "team-a",
            "uid": "uid-1",
            "generation": 1,
            "creationTimestamp": at(-60),
        },
        "spec": spec or {"resources": {"cpu": "2", "memory": "4Gi"}, "replicas": 2},
    }
    if status is not None:
        body["status"] = {"observedGeneration": 1, **status}
    return CapacityClaim.model_validate(body)


def admitted() -> CapacityClaim:
    return claim(
        {
            "phase": "Admitted",
            "reason": "QuorumReached",
            "message": "admitted on node-a, node-b with 3/2 YES votes (epoch 2)",
            "proposal": proposal(2, ["node-a", "node-b"], ["node-a", "node-b", "node-c"], -5),
            "votes": {
                "node-a": vote("YES", "placement", 2, "fits", FIT_YES),
                "node-b": vote("YES", "placement", 2, "fits", FIT_YES),
                "node-c": vote("YES", "witness", 2, "placement nodes alive: node-a, node-b"),
            },
            "placements": [
                {"node": "node-a", "substrate": "host", "share": 0.25, "epoch": 2},
                {"node": "node-b", "substrate": "host", "share": 0.25, "epoch": 2},
            ],
            "conditions": [
                {
                    "type": "Admitted",
                    "status": "True",
                    "reason": "QuorumReached",
                    "message": "admitted",
                    "lastTransitionTime": at(-5),
                }
            ],
            "nodes": "node-a,node-b",
            "voteCount": "3/2",
        }
    )


def rejected() -> CapacityClaim:
    return claim(
        {
            "phase": "Rejected",
            "reason": "AttemptsExhausted",
            "message": "no quorum after 2 proposals; last: node-b: isolation 0.05 < theta_iso 0.15",
            "attempts": 2,
            "proposal": proposal(2, ["node-b"], ["node-b", "node-c", "node-d"], -5),
            "votes": {
                "node-b": vote(
                    "NO",
                    "placement",
                    2,
                    "isolation 0.05 < theta_iso 0.15",
                    {**FIT_YES, "isolation": 0.05},
                ),
            },
            "refusals": {
                "node-a": "fit_error 0.31 > theta_fit 0.165",
                "node-b": "isolation 0.05 < theta_iso 0.15",
            },
        },
        cGeo=0.25,
        substrate="host",
    )


def epoch_3_open() -> dict[str, Any]:
    """The status of a claim Voting on epoch 3 (its votes not included)."""
    return {
        "phase": "Voting",
        "reason": "Proposed",
        "message": "epoch 3: asking node-a, node-b, node-c, node-d to vote",
        "attempts": 3,
        "proposal": proposal(3, ["node-a"], ["node-a", "node-b", "node-c", "node-d"], 3),
    }


def voting() -> CapacityClaim:
    return claim(
        {
            **epoch_3_open(),
            "votes": {
                "node-a": vote("YES", "placement", 3, "fits", FIT_YES),
                "node-b": vote("YES", "witness", 3, "placement nodes alive: node-a"),
                # cast for the previous epoch: must not count
                "node-c": vote("YES", "witness", 2, "placement nodes alive: node-e"),
                # a placement vote of an old epoch, with failing readings
                "node-e": vote("NO", "placement", 2, "fit_error 0.31 > theta_fit 0.165", FIT_NO),
            },
            "refusals": {"node-e": "fit_error 0.31 > theta_fit 0.165"},
        },
        cGeo=0.25,
    )


def pending() -> CapacityClaim:
    return claim(
        {
            "phase": "Pending",
            "reason": "WaitingForNodes",
            "message": "no node has fresh readings and a live lease yet",
        }
    )


# -- the sentence --------------------------------------------------------------------------------


def test_why_admitted() -> None:
    assert capctl.why(admitted(), NOW) == (
        "Admitted on node-a, node-b with 3/2 YES votes in epoch 2."
    )


def test_why_rejected_names_each_refusal() -> None:
    assert capctl.why(rejected(), NOW) == (
        "Rejected after 2 proposals: node-a refused (fit_error 0.31 > theta_fit 0.165); "
        "node-b refused (isolation 0.05 < theta_iso 0.15)."
    )


def test_why_rejected_without_votes_uses_the_message() -> None:
    c = claim(
        {
            "phase": "Rejected",
            "reason": "ExceedsNodeCapacity",
            "message": "the request is 2.00 of the largest host node's capacity",
        }
    )
    assert capctl.why(c, NOW) == (
        "Rejected (ExceedsNodeCapacity): the request is 2.00 of the largest host node's capacity."
    )


def test_why_voting_counts_only_this_epoch() -> None:
    # node-c voted YES for epoch 2: 2 YES count (node-a, node-b), 3 of 4 needed
    assert capctl.why(voting(), NOW) == (
        "Voting: waiting for node-c, node-d until 12:00:03 UTC (2/3 YES so far)."
    )


def test_why_voting_after_the_deadline() -> None:
    assert capctl.why(voting(), NOW + timedelta(seconds=10)) == (
        "Voting: the deadline 12:00:03 UTC passed with 2/3 YES and no vote from node-c, node-d; "
        "the operator aborts epoch 3 next."
    )


def test_why_voting_refused_by_a_placement_node() -> None:
    c = claim(
        {
            "phase": "Voting",
            "proposal": proposal(1, ["node-a"], ["node-a", "node-b", "node-c"]),
            "votes": {"node-a": vote("NO", "placement", 1, "lambda_int 0.71 > theta_burst 0.6")},
        }
    )
    assert capctl.why(c, NOW) == (
        "Voting: epoch 1 fails because node-a refused (lambda_int 0.71 > theta_burst 0.6); "
        "the operator aborts it next."
    )


def test_why_voting_after_a_spec_change() -> None:
    c = voting()
    c.metadata.generation = 2
    assert capctl.why(c, NOW) == (
        "Voting: the spec changed during epoch 3 (generation 2); "
        "the operator starts the admission over."
    )


def test_why_pending() -> None:
    assert capctl.why(pending(), NOW) == "Pending: waiting for nodes with fresh readings."
    assert capctl.why(claim(None), NOW) == "Pending: the operator has not picked the claim up yet."
    other = claim(
        {
            "phase": "Pending",
            "reason": "WaitingForCapacity",
            "message": "waiting for open proposals of other claims to commit or abort",
        }
    )
    assert capctl.why(other, NOW) == (
        "Pending: waiting for open proposals of other claims to commit or abort."
    )


# -- votes and gates -----------------------------------------------------------------------------


def test_stale_votes_are_marked_and_not_counted() -> None:
    e = capctl.explain(voting(), now=NOW)
    rows = {r.node: r for r in e.rows}
    assert [r.node for r in e.rows] == ["node-a", "node-b", "node-c", "node-d", "node-e"]
    assert rows["node-a"].counted
    assert rows["node-a"].note == "counted"
    assert not rows["node-c"].counted
    assert rows["node-c"].note == "stale, not counted"
    assert rows["node-d"].vote is None
    assert rows["node-d"].note == "no vote yet"
    assert rows["node-e"].note == "not a voter, not counted"
    assert e.result is not None
    assert (e.result.yes, e.result.needed) == (2, 3)

    text = capctl.explanation_text(e)
    stale_line = next(line for line in text.splitlines() if line.strip().startswith("node-c"))
    assert "stale, not counted" in stale_line
    assert "2/3 YES counted" in text


def test_gate_readings_against_thresholds() -> None:
    text = capctl.explain_text(voting(), now=NOW)
    assert "fitError ≤ 0.165" in text
    assert "isolation ≥ 0.15" in text
    assert "gluingDelta ≤ 0.1" in text
    assert "lambdaInt ≤ 0.6" in text
    gates = text.split("Gate readings of placement votes")[1].split("\n\n")[0].splitlines()
    node_a = next(line for line in gates if line.split()[0] == "node-a")
    assert node_a.split()[1:] == ["0.000", "✓", "0.500", "✓", "0.020", "✓", "0.310", "✓"]
    node_e = next(line for line in gates if line.split()[0] == "node-e")
    assert "(not counted)  0.310 ✗" in node_e
    # witnesses carry no fit readings and get no gate line
    assert {line.split()[0] for line in gates[2:]} == {"node-a", "node-e"}


def test_calibrated_thresholds_judge_the_readings() -> None:
    calibration = Calibration.from_configmap({"thetaFit": "0.4", "thetaBurst": "0.3"}, "cm")
    checks = {c.gate.reading: c for c in capctl.gate_checks(FIT_NO, calibration.thresholds)}
    assert checks["fitError"].passed is True  # 0.31 <= 0.4
    assert checks["lambdaInt"].passed is False  # 0.31 > 0.3
    assert checks["isolation"].passed is True
    assert capctl.gate_checks({}, calibration.thresholds)[0].passed is None


def test_a_value_just_past_the_threshold_does_not_print_as_the_threshold() -> None:
    checks = capctl.gate_checks({"fitError": 0.1651}, Calibration().thresholds)
    assert checks[0].cell() == "0.1651 ✗"


# -- the live votes of an open proposal: in the voters' ballots -----------------------------------


def ballot(node: str, votes: dict[str, dict[str, Any]]) -> CapacityBallot:
    return CapacityBallot.model_validate(
        {
            "metadata": {"name": node},
            "spec": {"nodeName": node},
            "status": {"votes": {uid: {**v, "claim": "team-a/web"} for uid, v in votes.items()}},
        }
    )


def voting_on_ballots() -> CapacityClaim:
    """A Voting claim as the operator writes it: no votes in the claim, they are in ballots."""
    return claim(epoch_3_open(), cGeo=0.25)


BALLOTS = {
    "node-a": ballot(
        "node-a",
        {
            "uid-1": vote("YES", "placement", 3, "fits", FIT_YES),
            # another claim's vote in the same ballot
            "uid-2": vote("NO", "placement", 7, "fit_error 0.31 > theta_fit 0.165", FIT_NO),
        },
    ),
    "node-b": ballot("node-b", {"uid-1": vote("YES", "witness", 3, "placement nodes alive")}),
    # node-c's vote of the previous epoch, not yet withdrawn: shown stale, not counted
    "node-c": ballot("node-c", {"uid-1": vote("YES", "witness", 2, "placement nodes alive")}),
    # node-d has no ballot yet; node-e is no voter (its ballot is not read)
    "node-e": ballot("node-e", {"uid-1": vote("NO", "witness", 3, "node-a is down")}),
}


def test_a_voting_claims_votes_come_from_its_voters_ballots() -> None:
    c = voting_on_ballots()
    assert capctl.ballot_voters(c) == ["node-a", "node-b", "node-c", "node-d"]
    votes = capctl.votes_in_ballots(c, BALLOTS)
    assert sorted(votes) == ["node-a", "node-b", "node-c"]
    assert votes["node-a"].reason == "fits"
    e = capctl.explain(c, now=NOW, ballot_votes=votes)
    assert e.votes_from == "ballots"
    rows = {r.node: r for r in e.rows}
    assert [r.node for r in e.rows] == ["node-a", "node-b", "node-c", "node-d"]
    assert rows["node-a"].note == "counted"
    assert rows["node-b"].note == "counted"
    assert rows["node-c"].note == "stale, not counted"
    assert rows["node-d"].vote is None
    assert rows["node-d"].note == "no vote yet"
    assert e.result is not None
    assert (e.result.yes, e.result.needed) == (2, 3)
    assert e.why == "Voting: waiting for node-c, node-d until 12:00:03 UTC (2/3 YES so far)."

    text = capctl.explanation_text(e)
    assert (
        "Votes (2/3 YES counted; 3 of 4 voters needed), from the voters' CapacityBallots:" in text
    )
    gates = text.split("Gate readings of placement votes")[1].split("\n\n")[0].splitlines()
    assert [line.split()[0] for line in gates[2:]] == ["node-a"]
    data = json.loads(json.dumps(capctl.explanation_json(e)))
    assert data["votesFrom"] == "ballots"
    assert data["tally"]["voteCount"] == "2/3"
    assert data["why"] == e.why
    assert {v["node"]: v["counted"] for v in data["votes"]} == {
        "node-a": True,
        "node-b": True,
        "node-c": False,
        "node-d": False,
    }
    # the claim itself holds no vote while it is Voting
    assert capctl.why(c, NOW) == (
        "Voting: waiting for node-a, node-b, node-c, node-d until 12:00:03 UTC (0/3 YES so far)."
    )
    assert capctl.explain_json(c, now=NOW)["votesFrom"] == "claim"


def test_a_witness_attestation_in_its_ballot_is_shown_as_its_counted_yes() -> None:
    status = epoch_3_open()
    status["proposal"]["attestedSince"] = "2026-01-01T11:59:50Z"
    c = claim(status, cGeo=0.25)
    attesting = CapacityBallot.model_validate(
        {"metadata": {"name": "node-d"}, "spec": {"nodeName": "node-d"},
         "status": {"alive": {"node-a": "2026-01-01T11:59:58Z"}}}
    )  # fmt: skip
    too_old = CapacityBallot.model_validate(
        {"metadata": {"name": "node-c"}, "spec": {"nodeName": "node-c"},
         "status": {"alive": {"node-a": "2026-01-01T11:59:40Z"}}}
    )  # fmt: skip
    ballots = {**BALLOTS, "node-c": too_old, "node-d": attesting}
    e = capctl.explain(c, now=NOW, ballot_votes=capctl.votes_in_ballots(c, ballots))
    rows = {r.node: r for r in e.rows}
    assert rows["node-d"].note == "counted"
    assert rows["node-c"].note == "no vote yet"
    assert e.result is not None
    assert (e.result.yes, e.result.needed) == (3, 3)


def test_a_placement_nodes_no_in_its_ballot_fails_the_epoch() -> None:
    c = voting_on_ballots()
    no = ballot("node-a", {"uid-1": vote("NO", "placement", 3, "isolation 0.05 < theta_iso 0.15")})
    e = capctl.explain(c, now=NOW, ballot_votes=capctl.votes_in_ballots(c, {"node-a": no}))
    assert e.why == (
        "Voting: epoch 3 fails because node-a refused (isolation 0.05 < theta_iso 0.15); "
        "the operator aborts it next."
    )
    # no ballot at all: nobody has voted yet
    e = capctl.explain(c, now=NOW, ballot_votes=capctl.votes_in_ballots(c, {}))
    assert all(r.note == "no vote yet" for r in e.rows)
    assert e.result is not None
    assert e.result.yes == 0


def test_a_decided_claim_shows_the_votes_copied_into_it() -> None:
    for decided in (admitted(), rejected()):
        assert capctl.ballot_voters(decided) == []
        assert capctl.votes_in_ballots(decided, BALLOTS) == {}
        e = capctl.explain(decided, now=NOW, ballot_votes={})
        assert e.votes_from == "claim"
        assert decided.status is not None
        assert {r.node for r in e.rows if r.vote} == set(decided.status.votes or {})
    text = capctl.explain_text(admitted(), now=NOW, ballot_votes={})
    assert "3/2 YES votes in epoch 2" in text
    assert "CapacityBallots" not in text


def test_a_recovery_proposal_is_voted_on_in_ballots() -> None:
    c = admitted()
    assert c.status is not None
    c.status.phase = Phase.RECOVERING
    # the committed proposal (epoch 2, the placements'): closed, its votes are in the claim
    assert not capctl.proposal_open(c)
    assert capctl.ballot_voters(c) == []
    recovery = proposal(3, ["node-c"], ["node-b", "node-c", "node-d"])
    c.status.proposal = Proposal.model_validate(recovery)
    c.status.votes = None
    assert capctl.proposal_open(c)
    assert capctl.ballot_voters(c) == ["node-b", "node-c", "node-d"]
    ballots = {"node-c": ballot("node-c", {"uid-1": vote("YES", "placement", 3, "fits", FIT_YES)})}
    e = capctl.explain(c, now=NOW, ballot_votes=capctl.votes_in_ballots(c, ballots))
    assert e.votes_from == "ballots"
    assert [(r.node, r.note) for r in e.rows] == [
        ("node-b", "no vote yet"),
        ("node-c", "counted"),
        ("node-d", "no vote yet"),
    ]


# -- the whole report ------------------------------------------------------------------------------


def test_admitted_text_report() -> None:
    events = [
        EventInfo("Normal", "QuorumReached", "admitted", NOW - timedelta(seconds=5)),
        EventInfo("Normal", "Proposed", "epoch 1", NOW - timedelta(seconds=30)),
    ]
    text = capctl.explain_text(admitted(), Calibration(), events, now=NOW)
    assert "Claim:     team-a/web" in text
    assert "Phase:     Admitted (QuorumReached)" in text
    assert "Why:       Admitted on node-a, node-b with 3/2 YES votes in epoch 2." in text
    assert "Proposal: epoch 2" in text
    assert "placement  node-a, node-b" in text
    assert "Placements:" in text
    assert "Conditions:" in text
    # events newest last
    assert text.index("epoch 1") < text.index("QuorumReached  1")
    assert "stale" not in text


def test_rejected_text_lists_refusals() -> None:
    text = capctl.explain_text(rejected(), now=NOW)
    assert "Refusals (earlier epochs; not proposed again):" in text
    assert "node-a  fit_error 0.31 > theta_fit 0.165" in text
    assert "Placements: none" in text
    gates = text.split("Gate readings of placement votes")[1].split("\n\n")[0]
    assert "0.050 ✗" in gates  # node-b's isolation
    # the epoch is closed: a missing vote is not awaited
    assert "no vote yet" not in text
    assert "node-c  witness    -     -      no vote" in text


def test_stale_placement_vote_is_marked_in_the_gate_table() -> None:
    c = voting()
    assert c.status is not None
    assert c.status.votes is not None
    c.status.votes["node-a"] = c.status.votes["node-a"].model_copy(update={"epoch": 2})
    text = capctl.explain_text(c, now=NOW)
    gates = text.split("Gate readings of placement votes")[1].split("\n\n")[0].splitlines()
    node_a = next(line for line in gates if line.split()[0] == "node-a")
    assert node_a.split()[1:4] == ["(stale)", "0.000", "✓"]
    assert capctl.why(c, NOW) == (
        "Voting: waiting for node-a, node-c, node-d until 12:00:03 UTC (1/3 YES so far)."
    )


def test_pending_text_report() -> None:
    text = capctl.explain_text(pending(), now=NOW)
    assert "Why:       Pending: waiting for nodes with fresh readings." in text
    assert "Proposal: none" in text
    assert "Votes: none" in text


def test_events_are_the_newest_ten_oldest_first() -> None:
    events = [
        EventInfo("Normal", f"R{i}", f"m{i}", NOW - timedelta(seconds=100 - i)) for i in range(15)
    ]
    kept = capctl.recent_events(reversed(events))
    assert [e.reason for e in kept] == [f"R{i}" for i in range(5, 15)]


@pytest.mark.parametrize("build", [admitted, rejected, voting, pending])
def test_json_is_valid_and_complete(build: Any) -> None:
    data = capctl.explain_json(build(), Calibration(), now=NOW)
    parsed = json.loads(json.dumps(data))
    for key in (
        "claim",
        "spec",
        "phase",
        "reason",
        "message",
        "why",
        "thresholds",
        "proposal",
        "tally",
        "votes",
        "refusals",
        "placements",
        "conditions",
        "events",
    ):
        assert key in parsed
    assert parsed["claim"] == {
        "namespace": "team-a",
        "name": "web",
        "uid": "uid-1",
        "generation": 1,
        "observedGeneration": 1,
        "created": at(-60),
        "deleting": False,
    }
    assert parsed["why"] == capctl.why(build(), NOW)
    assert parsed["thresholds"]["thetaFit"] == 0.165


def test_json_of_a_voting_claim() -> None:
    data = json.loads(json.dumps(capctl.explain_json(voting(), now=NOW)))
    assert data["phase"] == "Voting"
    assert data["tally"] == {
        "outcome": "Wait",
        "yes": 2,
        "needed": 3,
        "voters": 4,
        "voteCount": "2/3",
        "reason": "",
    }
    votes = {v["node"]: v for v in data["votes"]}
    assert votes["node-c"]["counted"] is False
    assert votes["node-c"]["note"] == "stale, not counted"
    assert votes["node-c"]["epoch"] == 2
    assert votes["node-d"]["vote"] is None
    gates = {g["reading"]: g for g in votes["node-a"]["gates"]}
    assert gates["fitError"] == {
        "reading": "fitError",
        "value": 0.0,
        "op": "<=",
        "threshold": "theta_fit",
        "thresholdValue": 0.165,
        "pass": True,
    }
    assert votes["node-b"]["gates"] == []
    assert data["refusals"] == [{"node": "node-e", "reason": "fit_error 0.31 > theta_fit 0.165"}]
    assert data["proposal"]["epoch"] == 3


# -- nodes -----------------------------------------------------------------------------------------


def cnode(name: str, *, ready: str = "True", holders: int = 2, gpu: bool = False) -> CapacityNode:
    substrates = ["host", "gpu"] if gpu else ["host"]
    gate = {"headroom": 0.5, "gluingDelta": 0.01, "lambda1": 0.2, "lambdaInt": 0.3, "entropy": 0.7}
    reading = {"load": {"mean": 0.3, "p95": 0.4, "max": 0.5}, "observedAt": at(-4), "samples": 64}
    return CapacityNode.model_validate(
        {
            "metadata": {"name": name},
            "spec": {"nodeName": name, "substrates": substrates},
            "status": {
                "readings": dict.fromkeys(substrates, reading),
                "gates": dict.fromkeys(substrates, gate),
                "allocated": {
                    "host": {
                        "share": 0.1 * holders,
                        "claims": holders,
                        "holders": [
                            {"claim": f"ns/c{i}", "uid": f"u{i}", "epoch": 1, "share": 0.1}
                            for i in range(holders)
                        ],
                    }
                }
                if holders
                else {},
                "conditions": [
                    {"type": "Ready", "status": ready},
                    {"type": "Stale", "status": "False"},
                ],
            },
        }
    )


def test_nodes_json_sorted_with_leases() -> None:
    nodes = [cnode("node-b", ready="False", holders=0), cnode("node-a", gpu=True)]
    leases = {
        "node-a": LeaseInfo("node-a", NOW - timedelta(seconds=3), 40),
        "node-b": LeaseInfo("node-b", NOW - timedelta(seconds=90), 40),
    }
    data = json.loads(json.dumps(capctl.nodes_json(nodes, leases, now=NOW)))
    assert [n["name"] for n in data] == ["node-a", "node-b"]
    a, b = data
    assert a["ready"] == "True"
    assert a["stale"] == "False"
    assert a["lease"]["expired"] is False
    assert a["lease"]["ageSeconds"] == 3
    assert b["lease"]["expired"] is True
    assert b["ready"] == "False"
    assert (a["liveness"], b["liveness"]) == ("Alive", "Suspect")
    host = a["substrates"][0]
    assert host["substrate"] == "host"
    assert host["p95"] == 0.4
    assert host["headroom"] == 0.5
    assert host["allocated"] == pytest.approx(0.2)
    assert host["claims"] == 2
    assert host["gluingDelta"] == 0.01
    assert host["lambdaInt"] == 0.3
    assert host["entropy"] == 0.7
    assert a["substrates"][1]["substrate"] == "gpu"
    assert a["substrates"][1]["claims"] == 0


def test_nodes_text_table() -> None:
    nodes = [cnode("node-b", holders=0), cnode("node-a", gpu=True), cnode("node-c")]
    leases = {
        "node-a": LeaseInfo("node-a", NOW - timedelta(seconds=3), 40),
        "node-b": LeaseInfo("node-b", NOW - timedelta(seconds=90), 40),
    }
    text = capctl.nodes_text(nodes, leases, now=NOW)
    lines = text.splitlines()
    assert lines[0].split() == list(capctl.NODE_HEADERS)
    assert lines[1].split() == [
        "node-a",
        "Alive",
        "True",
        "False",
        "3s",
        "host",
        "4s",
        "0.40",
        "0.50",
        "0.20",
        "2",
        "0.010",
        "0.300",
        "0.700",
    ]
    assert lines[2].split()[0] == "gpu"  # the same node's next substrate
    assert "expired (90s)" in lines[3]
    assert lines[3].split()[1] == "Suspect"  # node-b: lease expired
    assert lines[4].split()[4] == "none"  # node-c has no lease
    # aligned: every column starts at the same offset
    assert len({line.index("SUBSTRATE") for line in lines[:1]}) == 1
    assert lines[1].index("host") == lines[0].index("SUBSTRATE")
    assert lines[2].index("gpu") == lines[0].index("SUBSTRATE")


def test_nodes_marked_by_the_operator_show_suspect_or_failed() -> None:
    failed = cnode("node-f")
    assert failed.status is not None
    ready = next(c for c in failed.status.conditions or [] if c.type == "Ready")
    ready.reason = "NodeFailed"
    assert capctl.nodes_json([failed], {}, now=NOW)[0]["liveness"] == "Failed"
    ready.reason = "LeaseExpired"
    assert capctl.nodes_json([failed], {}, now=NOW)[0]["liveness"] == "Suspect"
    ready.reason = "WitnessedAlive"
    assert capctl.nodes_json([failed], {}, now=NOW)[0]["liveness"] == "Suspect"


def test_a_node_back_but_not_trusted_yet_shows_returning() -> None:
    node = cnode("node-r")
    assert node.status is not None
    assert node.status.conditions is not None
    fenced = node.status.conditions[0].model_copy(
        update={"type": "Fenced", "reason": "Returning", "message": "renews its lease again"}
    )
    node.status.conditions.append(fenced)
    assert capctl.nodes_json([node], {}, now=NOW)[0]["liveness"] == "Returning"
    fenced.reason = "NodeFenced"
    assert capctl.nodes_json([node], {}, now=NOW)[0]["liveness"] == "Failed"
    fenced.status = fenced.status.__class__("False")
    fenced.reason = "NodeReturned"
    assert capctl.nodes_json([node], {}, now=NOW)[0]["liveness"] == "Alive"


def test_no_nodes() -> None:
    assert capctl.nodes_text([], {}, now=NOW) == "No CapacityNodes found.\n"
    assert capctl.nodes_json([], {}, now=NOW) == []


def test_human_duration() -> None:
    assert capctl.human_duration(7) == "7s"
    assert capctl.human_duration(185) == "3m05s"
    assert capctl.human_duration(42 * 60) == "42m"
    assert capctl.human_duration(5 * 3600 + 12 * 60) == "5h12m"
    assert capctl.human_duration(51 * 3600) == "2d3h"


def test_parser_accepts_flags_on_either_side() -> None:
    parser = capctl.build_parser()
    args = parser.parse_args(["explain", "web", "-n", "team-a", "-o", "json"])
    assert (args.claim, args.namespace, args.output) == ("web", "team-a", "json")
    args = parser.parse_args(["-o", "json", "--platform-namespace", "p", "nodes"])
    assert (args.output, args.platform_namespace, args.namespace) == ("json", "p", None)


def test_explain_shows_the_truth_of_the_decision() -> None:
    c = admitted()
    assert c.status is not None
    c.status.truth = Truth.model_validate(
        {
            "decision": "Admitted", "verdict": "Falsified",
            "since": (NOW - timedelta(seconds=60)).isoformat(),
            "until": (NOW + timedelta(seconds=540)).isoformat(),
            "evidence": [{"kind": "OOMKilled", "node": "node-a", "pod": "web-1",
                          "container": "main", "reason": "OOMKilled",
                          "message": "exit code 137, restarts 0",
                          "time": (NOW - timedelta(seconds=30)).isoformat()}],
        }
    )  # fmt: skip
    text = capctl.explain_text(c, now=NOW)
    assert "Truth: Falsified (the admitted decision, observed from" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("OOMKilled"))
    assert row.split()[:4] == ["OOMKilled", "node-a", "web-1/main", "30s"]
    data = capctl.explain_json(c, now=NOW)
    assert data["truth"]["verdict"] == "Falsified"
    r = rejected()
    assert r.status is not None
    r.status.truth = Truth.model_validate(
        {"decision": "Rejected", "verdict": "MissedOpportunity",
         "since": NOW.isoformat(), "until": NOW.isoformat(), "headroom": {"node-b": 0.61}}
    )  # fmt: skip
    text = capctl.explain_text(r, now=NOW)
    assert "Truth: MissedOpportunity (the rejected decision" in text
    assert "node-b     0.610" in text


def test_read_ballots_leaves_out_missing_and_unreadable_ones(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refusal(status: int, name: str | None) -> ApiException:
        exc = ApiException(status=status, reason="x")
        exc.body = json.dumps({"message": "no", "details": {"name": name} if name else {}})
        return exc

    class Custom:
        missing_kind = False

        def __init__(self, _: Any) -> None:
            pass

        def get_cluster_custom_object(self, *args: Any, **_: Any) -> Any:
            node = args[3]
            if Custom.missing_kind:
                raise refusal(404, None)
            if node == "node-a":
                return BALLOTS["node-a"].wire()
            if node == "node-c":
                raise refusal(403, node)
            if node == "node-d":
                return {"metadata": {"name": node}, "spec": {}}
            raise refusal(404, node)

    monkeypatch.setattr(kube_client, "CustomObjectsApi", Custom)
    voters = ["node-a", "node-b", "node-c", "node-d"]
    ballots = capacity_cli.cluster.read_ballots(None, voters)
    assert ballots is not None
    assert list(ballots) == ["node-a"]
    warnings = capsys.readouterr().err
    assert "cannot read capacityballot node-c: 403 x: no; its vote is not shown" in warnings
    assert "capacityballot node-d does not parse" in warnings
    Custom.missing_kind = True  # a platform without ballots: the claim's votes stand
    assert capacity_cli.cluster.read_ballots(None, voters) is None
