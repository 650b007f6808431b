"""Quorum admission end to end: the real operator and real agents (simulated sources) on a real
API server."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.cluster import (
    REPORT_SECONDS,
    Cluster,
    agents_proc,
    decided,
    ledger_from_claims,
    node_holders,
    operator_proc,
    reported,
    running,
    show,
    unique,
    wait_events,
    wait_for,
)


def replay_file(path: Path, load: float, count: int = 64) -> str:
    """A recording of ``load`` that varies by 0.01 in one slow wave over the window. Not white
    noise: a short window of white noise has about half its power in the upper bins, and now
    and then more than theta_burst (0.6), so the burst gate refused claims that the fit gate
    lets through (1 run in 12 here, first seen in a full test run on 2026-12-06)."""
    with path.open("w") as out:
        for i in range(count):
            u = min(1.0, max(0.0, load + 0.01 * math.sin(2 * math.pi * i / count)))
            out.write(json.dumps({"t": i, "load": u, "signals": {"cpu": u, "memory": u}}) + "\n")
    return f"replay:{path}"


def test_fit_admitted_misfit_rejected_with_gate_and_node(
    kubeconfig: Path, cluster: Cluster, platform: str, namespace: str, tmp_path: Path
) -> None:
    """Nodes measured at 0.6 load: 0.2 fits; 0.5 leaves fit_error 0.2 > theta_fit 0.165."""
    prefix = unique("adm")
    loaded = replay_file(tmp_path / "load.jsonl", 0.6)
    agents = agents_proc(
        kubeconfig, platform, tmp_path / "agents.log", prefix=prefix, count=3, source=loaded
    )
    op = operator_proc(kubeconfig, platform, tmp_path / "operator.log", claim_namespace=namespace)
    try:
        with running(agents, op):
            cluster.wait_nodes_ready(prefix, 3)
            cluster.create_claim(namespace, "fits", cGeo=0.2)
            cluster.create_claim(namespace, "misfit", cGeo=0.5)
            fits = cluster.wait_phase(namespace, "fits", ["Admitted", "Rejected"])
            misfit = cluster.wait_phase(namespace, "misfit", ["Admitted", "Rejected"], timeout=90)
            status = fits["status"]
            assert status["phase"] == "Admitted", f"{status}\n{show(agents, op)}"
            epoch = status["proposal"]["epoch"]
            voters = status["proposal"]["voters"]
            assert len(voters) == 3
            # committed as soon as the placement node and a majority said YES; a late third
            # vote may land after the commit
            assert set(status["votes"]) <= set(voters)
            assert len(status["votes"]) >= 2
            assert all(v["epoch"] == epoch and v["vote"] == "YES" for v in status["votes"].values())
            (placed,) = status["proposal"]["placement"]
            assert status["votes"][placed]["role"] == "placement"
            assert {"fitError", "isolation", "gluingDelta", "lambdaInt"} <= set(
                status["votes"][placed]["readings"]
            )
            assert status["voteCount"] in ("2/2", "3/2")
            assert status["nodes"] == placed
            assert any(
                c["type"] == "Admitted" and c["status"] == "True" for c in status["conditions"]
            )
            # the node's ledger report holds exactly the admitted share
            node = reported(cluster, prefix, namespace)[placed]
            (holder,) = node_holders(node)["host"]
            assert holder["uid"] == fits["metadata"]["uid"]
            assert holder["share"] == pytest.approx(0.2)

            assert misfit["status"]["phase"] == "Rejected", show(agents, op)
            message = misfit["status"]["message"]
            assert "theta_" in message
            assert prefix in message  # names the refusing node(s)
            refusals = misfit["status"]["refusals"]
            assert refusals
            assert all(name.startswith(prefix) for name in refusals)
    finally:
        cluster.delete_nodes(prefix)


def test_agents_hosting_one_node_each_vote_through_watches_of_the_claims_naming_them(
    kubeconfig: Path, cluster: Cluster, platform: str, namespace: str, tmp_path: Path
) -> None:
    """Three agent processes of one node each, as a DaemonSet runs them: each watches only the
    claims whose proposal names its node (field selectors), and the claim is still admitted."""
    prefix = unique("solo")
    agents = [
        agents_proc(
            kubeconfig, platform, tmp_path / f"agent{i}.log", prefix=f"{prefix}-{i}", count=1
        )
        for i in range(3)
    ]
    op = operator_proc(kubeconfig, platform, tmp_path / "operator.log", claim_namespace=namespace)
    try:
        with running(*agents, op):
            cluster.wait_nodes_ready(prefix, 3)
            cluster.create_claim(namespace, "solo", cGeo=0.2)
            body = cluster.wait_phase(namespace, "solo", ["Admitted", "Rejected"])
            assert body["status"]["phase"] == "Admitted", show(*agents, op)
            proposal = body["status"]["proposal"]
            assert sorted(proposal["voters"]) == sorted(f"{prefix}-{i}-0" for i in range(3))
            (placed,) = proposal["placement"]
            assert body["status"]["votes"][placed]["role"] == "placement"
            assert len(body["status"]["votes"]) >= 2  # a majority, the placement node's included
    finally:
        cluster.delete_nodes(prefix)


def test_claim_bigger_than_any_node_is_rejected_at_once(
    kubeconfig: Path, cluster: Cluster, platform: str, namespace: str, tmp_path: Path
) -> None:
    prefix = unique("big")
    agents = agents_proc(kubeconfig, platform, tmp_path / "agents.log", prefix=prefix, count=2)
    op = operator_proc(kubeconfig, platform, tmp_path / "operator.log", claim_namespace=namespace)
    try:
        with running(agents, op):
            cluster.wait_nodes_ready(prefix, 2)
            cluster.create_claim(namespace, "huge", resources={"cpu": "4096"})
            body = cluster.wait_phase(namespace, "huge", ["Rejected", "Admitted"], timeout=30)
            assert body["status"]["phase"] == "Rejected"
            assert body["status"]["reason"] == "ExceedsNodeCapacity"
            assert "proposal" not in body["status"]  # nobody was asked to vote
    finally:
        cluster.delete_nodes(prefix)


def test_only_fitting_node_with_expired_lease_is_not_used(
    kubeconfig: Path, cluster: Cluster, platform: str, namespace: str, tmp_path: Path
) -> None:
    busy, idle = unique("busy"), unique("idle")
    loaded = replay_file(tmp_path / "busy.jsonl", 0.85)
    busy_agents = agents_proc(
        kubeconfig, platform, tmp_path / "busy.log", prefix=busy, count=2, source=loaded
    )
    idle_agent = agents_proc(
        kubeconfig,
        platform,
        tmp_path / "idle.log",
        prefix=idle,
        count=1,
    )
    op = operator_proc(kubeconfig, platform, tmp_path / "operator.log", claim_namespace=namespace)
    try:
        with running(busy_agents, idle_agent, op):
            cluster.wait_nodes_ready(busy, 2)
            cluster.wait_nodes_ready(idle, 1)
            idle_agent.kill()  # the only node with room stops renewing its lease
            lease = client.CoordinationV1Api(cluster.custom.api_client)

            def expired() -> bool:
                spec = lease.read_namespaced_lease(f"{idle}-0", platform).spec
                age = (datetime.now(UTC) - spec.renew_time).total_seconds()
                return age > spec.lease_duration_seconds

            wait_for("the idle node's lease to expire", expired, timeout=30)
            cluster.create_claim(namespace, "needs-room", cGeo=0.4)
            body = cluster.wait_phase(namespace, "needs-room", ["Admitted", "Rejected"], timeout=90)
            placed = [p["node"] for p in body["status"].get("placements") or []]
            assert f"{idle}-0" not in placed
            assert body["status"]["phase"] == "Rejected", show(busy_agents, op)
            assert f"{idle}-0" in body["status"]["message"]
    finally:
        cluster.delete_nodes(busy)
        cluster.delete_nodes(idle)


def test_delete_frees_allocation_and_spec_change_is_reported(
    kubeconfig: Path, cluster: Cluster, platform: str, namespace: str, tmp_path: Path
) -> None:
    prefix = unique("del")
    agents = agents_proc(kubeconfig, platform, tmp_path / "agents.log", prefix=prefix, count=3)
    op = operator_proc(kubeconfig, platform, tmp_path / "operator.log", claim_namespace=namespace)
    try:
        with running(agents, op):
            cluster.wait_nodes_ready(prefix, 3)
            cluster.create_claim(namespace, "held", cGeo=0.3)
            body = cluster.wait_phase(namespace, "held", ["Admitted"], timeout=60)
            node = body["status"]["nodes"]
            assert node_holders(reported(cluster, prefix, namespace)[node])["host"]

            cluster.custom.patch_namespaced_custom_object(
                "capacity.platform.dev",
                "v1alpha1",
                namespace,
                "capacityclaims",
                "held",
                {"spec": {"cGeo": 0.5}},
            )

            def spec_change_noted() -> dict[str, Any] | None:
                claim = cluster.claim(namespace, "held") or {}
                conditions = (claim.get("status") or {}).get("conditions") or []
                return next((c for c in conditions if c.get("reason") == "SpecChanged"), None)

            condition = wait_for("the SpecChanged condition", spec_change_noted, timeout=30)
            assert condition["status"] == "True"  # the admission stands
            still = cluster.claim(namespace, "held") or {}
            assert still["status"]["phase"] == "Admitted"
            assert still["status"]["observedGeneration"] == 2
            (holder,) = node_holders(cluster.nodes(prefix)[node])["host"]
            assert holder["share"] == pytest.approx(0.3)  # unchanged

            cluster.custom.delete_namespaced_custom_object(
                "capacity.platform.dev", "v1alpha1", namespace, "capacityclaims", "held"
            )
            wait_for("the claim to be gone", lambda: cluster.claim(namespace, "held") is None)
            wait_for(
                "the allocation to be freed",
                lambda: not node_holders(cluster.nodes(prefix)[node]).get("host"),
                timeout=REPORT_SECONDS,
            )
    finally:
        cluster.delete_nodes(prefix)


VOTE_TIMEOUT = 8.0
"""The forged-votes test's epoch deadline: long enough for the forgery to land inside it."""


def test_votes_from_old_epochs_and_strangers_are_ignored(
    kubeconfig: Path, cluster: Cluster, platform: str, namespace: str, tmp_path: Path
) -> None:
    """A forged vote that is not in a voter's ballot, or is for another epoch, never commits a
    claim."""
    prefix = unique("forge")
    # voters that never answer: simulated nodes whose agent is stopped before the claim. Their
    # Leases last 30 s, so that they are still live when a loaded operator gets to the claim
    # (with the usual 6 s it could find them expired and leave the claim waiting for nodes)
    agents = agents_proc(
        kubeconfig, platform, tmp_path / "agents.log", prefix=prefix, count=3, lease_duration=30
    )
    op = operator_proc(
        kubeconfig, platform, tmp_path / "operator.log", claim_namespace=namespace,
        vote_timeout=VOTE_TIMEOUT,
    )  # fmt: skip
    try:
        with running(agents, op):
            cluster.wait_nodes_ready(prefix, 3)
            agents.kill()  # leases stay live for a few seconds; nobody votes
            cluster.create_claim(namespace, "forged", cGeo=0.1)
            body = cluster.wait_phase(namespace, "forged", ["Voting"], timeout=30)
            proposal = body["status"]["proposal"]
            epoch = proposal["epoch"]

            def vote(node: str, vote_epoch: int) -> dict[str, Any]:
                return {
                    "vote": "YES",
                    "role": "placement",
                    "epoch": vote_epoch,
                    "reason": "forged",
                    "time": "2026-01-01T00:00:00Z",
                }

            uid = body["metadata"]["uid"]
            # 1. YES from every voter for this epoch, but in the claim's status, where only
            #    the operator writes the votes it counted: a vote counts only from a ballot
            cluster.custom.patch_namespaced_custom_object_status(
                "capacity.platform.dev", "v1alpha1", namespace, "capacityclaims", "forged",
                {"status": {"votes": {n: vote(n, epoch) for n in proposal["voters"]}}},
            )  # fmt: skip
            # 2. the voters' ballots, for another epoch, with attestations of the placement
            #    from before the proposal's bound; 3. strangers' ballots, for this one, with
            #    attestations from now
            assert proposal["attestedSince"]  # the proposal takes attestations
            ballots = {n: vote(n, epoch + 7) for n in proposal["voters"]}
            ballots |= {f"{prefix}-stranger-{i}": vote("", epoch) for i in range(2)}
            fresh = datetime.now(UTC).isoformat().replace("+00:00", "Z")
            attested = {
                n: dict.fromkeys(
                    proposal["placement"],
                    "2026-01-01T00:00:00Z" if n in proposal["voters"] else fresh,
                )
                for n in ballots
            }
            for node, forged in ballots.items():
                try:  # the voters' agents created theirs at start; the strangers have none
                    cluster.custom.create_cluster_custom_object(
                        "capacity.platform.dev", "v1alpha1", "capacityballots",
                        {"apiVersion": "capacity.platform.dev/v1alpha1", "kind": "CapacityBallot",
                         "metadata": {"name": node}, "spec": {"nodeName": node}},
                    )  # fmt: skip
                except ApiException as exc:
                    if exc.status != 409:
                        raise
                cluster.custom.patch_cluster_custom_object_status(
                    "capacity.platform.dev", "v1alpha1", "capacityballots", node,
                    {"status": {"votes": {uid: {**forged, "claim": f"{namespace}/forged"}},
                                "alive": attested[node]}},
                )  # fmt: skip
            # the operator sees the forged votes (a watch event) and must count none of them:
            # had it counted them, it would have committed at once; instead the epoch runs to
            # its deadline and is aborted with no YES counted
            needed = len(proposal["voters"]) // 2 + 1
            (aborted,) = wait_events(
                cluster.core, namespace, "involvedObject.name=forged,reason=DeadlinePassed",
                timeout=VOTE_TIMEOUT + 15,
            )  # fmt: skip
            assert f"deadline passed with 0/{needed} YES" in aborted.message
            assert not any(
                e.reason == "QuorumReached"
                for e in cluster.core.list_namespaced_event(
                    namespace, field_selector="involvedObject.name=forged"
                ).items
            )
            for node in cluster.nodes(prefix).values():
                assert not node_holders(node).get("host")
    finally:
        cluster.delete_nodes(prefix)


def test_concurrent_claims_never_over_allocate(
    kubeconfig: Path, cluster: Cluster, platform: str, namespace: str, tmp_path: Path
) -> None:
    """200 claims at once against 10 nodes: no node past capacity at any observed moment, never
    more epochs open than the operator's flow control allows, and the admitted count is what
    fits."""
    prefix = unique("conc")
    nodes, claims, share = 10, 200, 0.25  # isolation >= 0.15 lets each node hold 3 (0.75)
    open_at_most = 8
    agents = agents_proc(kubeconfig, platform, tmp_path / "agents.log", prefix=prefix, count=nodes)
    op = operator_proc(
        kubeconfig,
        platform,
        tmp_path / "operator.log",
        claim_namespace=namespace,
        vote_timeout=10,
        extra=["--max-open-proposals", str(open_at_most)],
    )
    try:
        with running(agents, op):
            cluster.wait_nodes_ready(prefix, nodes)
            with ThreadPoolExecutor(16) as pool:
                list(
                    pool.map(
                        lambda i: cluster.create_claim(namespace, f"c{i:03d}", cGeo=share),
                        range(claims),
                    )
                )
            worst = 0.0

            def settled() -> bool:
                nonlocal worst
                items = cluster.claims(namespace)
                for node in cluster.nodes(prefix).values():  # the ledger's report, never past 1
                    held = sum(h["share"] for h in node_holders(node).get("host", []))
                    assert held <= 1.0 + 1e-9, f"{node['metadata']['name']} reports {held}"
                ledger = ledger_from_claims(items)
                worst = max([worst, *ledger.values()])
                assert all(v <= 1.0 + 1e-9 for v in ledger.values()), ledger
                phases = [(c.get("status") or {}).get("phase") for c in items]
                # one list is one snapshot: the claims Voting in it hold open epochs
                voting = phases.count("Voting")
                assert voting <= open_at_most, f"{voting} epochs open at once"
                admitted = phases.count("Admitted")
                return admitted == nodes * 3 and all(decided(c) for c in items)

            wait_for("the claims that fit admitted, the others waiting", settled, 240, 0.5)
            items = cluster.claims(namespace)
            ledger = ledger_from_claims(items)
            assert all(v == pytest.approx(0.75) for v in ledger.values())
            assert len(ledger) == nodes
            # the nodes' reports come to agree with the ledger derived from the claims
            reported(cluster, prefix, namespace)
            # the rest wait for room, unwritten since: none was rejected for want of it
            waiting = [c for c in items if c["status"]["phase"] == "Pending"]
            assert len(waiting) == claims - nodes * 3
            assert {c["status"]["reason"] for c in waiting} == {"WaitingForCapacity"}

            # room freed: the oldest waiting claims take it, without a retry storm
            admitted = sorted(
                c["metadata"]["name"] for c in items if c["status"]["phase"] == "Admitted"
            )
            for name in admitted[:4]:
                cluster.delete_claim(namespace, name)
            oldest = sorted(
                waiting, key=lambda c: (c["metadata"]["creationTimestamp"], c["metadata"]["name"])
            )
            wait_for(
                "four waiting claims admitted in their place", settled, timeout=60, interval=0.5
            )
            now_admitted = {
                c["metadata"]["name"]
                for c in cluster.claims(namespace)
                if c["status"]["phase"] == "Admitted"
            }
            assert {c["metadata"]["name"] for c in oldest[:4]} <= now_admitted, show(op)
            assert worst <= 1.0 + 1e-9
    finally:
        cluster.delete_nodes(prefix)
