"""Lease JSON as the API server serves it, and liveness; the agent's Lease writes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from lightkube import ApiError
from lightkube.resources.coordination_v1 import Lease

from capacity_agent.cluster import lease_info
from capacity_agent.lease import KubeLeaseApi, LeaseNamespaceMissingError
from capacity_api.lease import LeaseInfo, parse_lease
from tests.unit.kube_fakes import FakeApiServer

NOW = datetime(2026, 11, 22, 5, 0, tzinfo=UTC)


def test_parse_lease_reads_renewal_and_duration() -> None:
    lease = parse_lease(
        {
            "metadata": {"name": "node-a"},
            "spec": {"renewTime": "2026-11-22T04:59:50.123456Z", "leaseDurationSeconds": 15},
        }
    )
    assert lease == LeaseInfo("node-a", datetime(2026, 11, 22, 4, 59, 50, 123456, tzinfo=UTC), 15)
    assert lease.live(NOW)
    assert not lease.live(NOW + timedelta(seconds=6))


def test_a_lease_never_renewed_is_not_live_and_duration_defaults_to_kubelets() -> None:
    lease = parse_lease({"metadata": {"name": "node-b"}, "spec": {}})
    assert lease.renew_time is None
    assert lease.duration_seconds == 40
    assert not lease.live(NOW)


# ---------------------------------------------------------------------------------------------
# The agent's renewals through its Kubernetes client (lightkube, against a scripted API server)

LEASE_PATH = "/apis/coordination.k8s.io/v1/namespaces/capacity-system/leases/n1"
MERGE = "application/merge-patch+json"
APPLY = "application/apply-patch+yaml"
T_WHOLE = 1_800_000_000.0
"""A whole second: the MicroTime must still carry its six fractional digits."""
STAMP = "2027-01-15T08:00:00.000000Z"


def lease_answer() -> dict[str, object]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "n1", "namespace": "capacity-system", "resourceVersion": "3"},
        "spec": {"holderIdentity": "n1", "renewTime": STAMP, "leaseDurationSeconds": 40},
    }


def renew(server: FakeApiServer) -> None:
    KubeLeaseApi(server.client()).renew(
        "n1", "capacity-system", holder="n1", duration_seconds=40, now=T_WHOLE
    )


def test_a_renewal_is_one_merge_patch_of_the_spec() -> None:
    server = FakeApiServer(lease_answer())
    renew(server)
    spec = {"holderIdentity": "n1", "leaseDurationSeconds": 40, "renewTime": STAMP}
    manager = {"fieldManager": "capacity-agent"}
    assert server.sent() == ("PATCH", LEASE_PATH, manager, MERGE, {"spec": spec})


def test_a_missing_lease_is_created_with_acquire_and_renew_time() -> None:
    server = FakeApiServer(404, lease_answer())
    renew(server)
    method, path, query, content_type, body = server.sent()
    assert (method, path, query, content_type) == (
        "PATCH",
        LEASE_PATH,
        {"fieldManager": "capacity-agent"},
        APPLY,
    )
    assert body == {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": "n1",
            "namespace": "capacity-system",
            "labels": {"app.kubernetes.io/managed-by": "capacity-agent"},
        },
        "spec": {
            "holderIdentity": "n1",
            "leaseDurationSeconds": 40,
            "acquireTime": STAMP,
            "renewTime": STAMP,
        },
    }


def test_a_lease_created_meanwhile_is_renewed() -> None:
    server = FakeApiServer(404, 409, lease_answer())
    renew(server)
    assert [server.sent(i)[3] for i in range(3)] == [MERGE, APPLY, MERGE]


def test_a_missing_namespace_is_named() -> None:
    server = FakeApiServer(404, 404)
    with pytest.raises(LeaseNamespaceMissingError, match=r"'capacity-system'.*does not exist"):
        renew(server)


@pytest.mark.parametrize("code", [403, 500])
def test_other_refusals_are_raised_as_they_are(code: int) -> None:
    server = FakeApiServer(code)
    with pytest.raises(ApiError) as info:
        renew(server)
    assert info.value.status.code == code
    assert len(server.requests) == 1


def test_leases_listed_by_the_client_are_read_by_the_shared_rule() -> None:
    server = FakeApiServer(
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "LeaseList",
            "metadata": {"resourceVersion": "9"},
            "items": [lease_answer(), {"metadata": {"name": "n2"}, "spec": {}}],
        }
    )
    leases = [lease_info(item) for item in server.client().list(Lease, namespace="x")]
    assert leases == [
        LeaseInfo("n1", datetime(2027, 1, 15, 8, 0, tzinfo=UTC), 40),
        LeaseInfo("n2", None, 40),
    ]
