"""Witness confirmation (DESIGN section 6): what a witness reports, which reports count, and how
they decide between Suspect and Failed; the probe against a real health server; a witness pass
through the Kubernetes client."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from capacity_agent.metrics import AgentMetrics, HealthServer
from capacity_agent.witness import WITNESS_FIELD_MANAGER, Witness, endpoint_url, probe
from capacity_api.models import Probe, WitnessReport
from capacity_api.recovery import (
    MAX_WITNESS_REPORTS,
    Liveness,
    Witnesses,
    assess,
    expired_at,
    same_reports,
    suspects,
    tally,
    witness_report,
)
from tests.unit.kube_fakes import FakeApiServer
from tests.unit.test_recovery import NOW, lease


def report(node: str, alive: bool, ago: float = 0.0) -> WitnessReport:
    return WitnessReport(
        node=node,
        alive=alive,
        probe=Probe.REACHABLE if alive else Probe.UNREACHABLE,
        observed_at=NOW - timedelta(seconds=ago),
    )


def test_a_quorum_of_witnesses_fails_a_suspect_node_before_the_grace_period() -> None:
    stale = lease("x", 12)  # expired 2 s ago, grace 30 s
    dead = Witnesses(dead=("a", "b"))
    assert assess(stale, NOW, 30, witnesses=dead, witness_quorum=2) is Liveness.FAILED
    assert assess(stale, NOW, 30, witnesses=dead, witness_quorum=3) is Liveness.SUSPECT
    assert assess(stale, NOW, 30, witnesses=dead, witness_quorum=0) is Liveness.SUSPECT
    # too few witnesses: the hard grace period still fails it
    assert assess(lease("x", 45), NOW, 30, witnesses=dead, witness_quorum=3) is Liveness.FAILED


def test_a_node_one_witness_sees_alive_is_never_failed() -> None:
    seen = Witnesses(dead=("a", "b", "c"), alive=("d",))
    assert assess(lease("x", 3600), NOW, 30, witnesses=seen, witness_quorum=2) is Liveness.SUSPECT
    assert "d still sees it alive" in seen.summary
    # a live Lease is alive whatever the witnesses say
    assert assess(lease("x", 1), NOW, 30, witnesses=seen, witness_quorum=2) is Liveness.ALIVE


def test_only_reports_of_alive_witnesses_made_after_the_expiry_count() -> None:
    stale = lease("x", 12)
    since = expired_at(stale)
    assert since == NOW - timedelta(seconds=2)
    reports = {
        "a": [report("x", False)],
        "b": [report("other", False), report("x", False, ago=1)],
        "c": [report("x", False, ago=5)],  # made before the lease expired: not evidence
        "d": [report("x", False)],  # d is itself expired: does not count
        "x": [report("x", True)],  # the suspect about itself
    }
    got = tally("x", reports, alive_nodes=["a", "b", "c", "x"], expired_at=since)
    assert got == Witnesses(dead=("a", "b"))
    assert got.confirmed(2)
    assert not got.confirmed(3)
    assert got.summary == "confirmed by 2 witness(es): a, b"


def test_a_witness_reports_expired_peers_not_its_own_nodes_longest_expired_first() -> None:
    leases = [lease("mine", 100), lease("live", 1), lease("late", 20), lease("later", 60)]
    assert [x.name for x in suspects(leases, ["mine"], NOW)] == ["later", "late"]
    many = [lease(f"n{i:02}", 20 + i) for i in range(40)]
    assert len(suspects(many, [], NOW)) == MAX_WITNESS_REPORTS


def test_a_report_is_alive_when_the_lease_is_live_or_the_agent_answers() -> None:
    assert not witness_report(lease("x", 20), Probe.UNREACHABLE, NOW).alive
    assert not witness_report(lease("x", 20), Probe.NO_ENDPOINT, NOW).alive
    assert witness_report(lease("x", 20), Probe.REACHABLE, NOW).alive
    assert witness_report(lease("x", 1), Probe.UNREACHABLE, NOW).alive


def test_the_same_reports_later_are_not_written_again() -> None:
    first = [witness_report(lease("x", 20), Probe.UNREACHABLE, NOW)]
    later = [witness_report(lease("x", 20), Probe.UNREACHABLE, NOW + timedelta(seconds=9))]
    assert same_reports(first, later)
    assert not same_reports(first, [witness_report(lease("x", 20), Probe.REACHABLE, NOW)])
    assert not same_reports(first, [])


def test_the_probe_reaches_a_real_health_server_and_not_a_closed_port() -> None:
    healthy = True

    def health() -> tuple[bool, str]:
        return healthy, "ok" if healthy else "no measurement tick"

    server = HealthServer(AgentMetrics().registry, health, address="127.0.0.1", port=0)
    server.start()
    try:
        url = endpoint_url("127.0.0.1", server.port)
        assert url == f"http://127.0.0.1:{server.port}/healthz"
        assert probe(url) is Probe.REACHABLE
        healthy = False  # an agent whose loops stopped answers 503: not alive
        assert probe(url) is Probe.UNREACHABLE
    finally:
        server.stop()
    assert probe(url) is Probe.UNREACHABLE
    assert probe(None) is Probe.NO_ENDPOINT
    assert endpoint_url(None, 8080) is None
    assert endpoint_url("fd00::1", 8080) == "http://[fd00::1]:8080/healthz"


# ---------------------------------------------------------------------------------------------
# Through the Kubernetes client (lightkube, against a scripted API server)


def lease_json(name: str, renewed_ago: float, duration: int = 10) -> dict[str, object]:
    renewed = NOW - timedelta(seconds=renewed_ago)
    return {
        "metadata": {"name": name, "namespace": "capacity-system"},
        "spec": {
            "renewTime": renewed.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "leaseDurationSeconds": duration,
        },
    }


def lease_list(*items: dict[str, object]) -> dict[str, object]:
    return {"kind": "LeaseList", "metadata": {"resourceVersion": "1"}, "items": list(items)}


def node_json(name: str, endpoint: str | None = None) -> dict[str, object]:
    status = {"witness": {"endpoint": endpoint}} if endpoint else {}
    return {"kind": "CapacityNode", "metadata": {"name": name}, "status": status}


def witness(server: FakeApiServer) -> Witness:
    return Witness(
        server.client(), "w", ["w"], "capacity-system", endpoint="http://w/healthz", interval=5
    )


def test_a_witness_pass_reads_leases_and_endpoints_and_applies_under_its_own_manager() -> None:
    leases = lease_list(lease_json("w", 1), lease_json("x", 20), lease_json("y", 30))
    server = FakeApiServer(leases, node_json("x"), 404, node_json("w"), leases, 404, 404)
    w = witness(server)
    reports = asyncio.run(w.step(NOW))
    assert [(r.node, r.alive, r.probe) for r in reports] == [
        ("y", False, Probe.NO_ENDPOINT),  # the longest expired first
        ("x", False, Probe.NO_ENDPOINT),
    ]
    paths = [request.url.path for request in server.requests]
    nodes = "/apis/capacity.platform.dev/v1alpha1/capacitynodes"
    assert paths == [
        "/apis/coordination.k8s.io/v1/namespaces/capacity-system/leases",
        f"{nodes}/y",
        f"{nodes}/x",
        f"{nodes}/w/status",
    ]
    method, _, query, content_type, body = server.sent()
    assert (method, query) == ("PATCH", {"fieldManager": WITNESS_FIELD_MANAGER, "force": "true"})
    assert content_type == "application/apply-patch+yaml"
    assert body["status"]["witness"]["endpoint"] == "http://w/healthz"
    assert [r["node"] for r in body["status"]["witness"]["reports"]] == ["y", "x"]
    # the same reports again are not written again (404s: the nodes' objects are gone now)
    again = asyncio.run(w.step(NOW + timedelta(seconds=5)))
    assert same_reports(again, reports)
    assert len(server.requests) == 7


def test_a_witness_apply_before_the_publisher_created_the_object_is_retried_later() -> None:
    server = FakeApiServer(lease_list(lease_json("w", 1)), 404)
    with pytest.raises(RuntimeError, match="CapacityNode w does not exist yet"):
        asyncio.run(witness(server).step(NOW))
