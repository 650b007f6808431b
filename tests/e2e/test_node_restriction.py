"""Node restriction (the chart's ValidatingAdmissionPolicy): with a token of the agent's
ServiceAccount bound to its pod, an agent writes its own node's CapacityNode and its own vote,
and is refused, with the rule named, for anyone else's."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from capacity_api import GROUP, VERSION
from tests import kube
from tests.cluster import Cluster
from tests.e2e.conftest import NAMESPACE, Platform

AGENT = "capacity-platform-agent"
Patch = dict[str, Any]


def _agent_pod(core: client.CoreV1Api) -> client.V1Pod:
    pods = core.list_namespaced_pod(
        NAMESPACE, label_selector="app.kubernetes.io/component=agent"
    ).items
    running = [p for p in pods if p.status.phase == "Running" and p.spec.node_name]
    assert running, "no agent pod running"
    return running[0]


def _token(core: client.CoreV1Api, pod: client.V1Pod | None) -> str:
    bound = (
        client.V1BoundObjectReference(
            api_version="v1", kind="Pod", name=pod.metadata.name, uid=pod.metadata.uid
        )
        if pod is not None
        else None
    )
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=600, bound_object_ref=bound)
    )
    out = core.create_namespaced_service_account_token(AGENT, NAMESPACE, request)
    return str(out.status.token)


def _as(kubeconfig: Path, token: str) -> client.ApiClient:
    admin = kube.api_client(kubeconfig)
    config = client.Configuration()
    config.host = admin.configuration.host
    config.ssl_ca_cert = admin.configuration.ssl_ca_cert
    config.api_key = {"authorization": f"Bearer {token}"}
    admin.close()
    return client.ApiClient(config)


@pytest.fixture(scope="module")
def agent(platform: Platform, core: client.CoreV1Api) -> Iterator[tuple[str, client.ApiClient]]:
    """The agent pod's node, and a client with a token bound to that pod."""
    pod = _agent_pod(core)
    api = _as(platform.kubeconfig, _token(core, pod))
    yield str(pod.spec.node_name), api
    api.close()


def _refused(call: Any, *args: Any) -> str:
    with pytest.raises(ApiException) as refused:
        call(*args)
    assert refused.value.status == 403, refused.value
    return str(refused.value.body)


def _other_node(custom: client.CustomObjectsApi, mine: str) -> str:
    names = [
        cn["metadata"]["name"]
        for cn in custom.list_cluster_custom_object(GROUP, VERSION, "capacitynodes")["items"]
    ]
    others = [n for n in names if n != mine]
    assert others, "needs a second CapacityNode"
    return others[0]


def test_agent_writes_its_own_capacitynode_only(
    agent: tuple[str, client.ApiClient], custom: client.CustomObjectsApi
) -> None:
    node, api = agent
    as_agent = client.CustomObjectsApi(api)
    label: Patch = {"metadata": {"labels": {"e2e.capacity.platform.dev/touched": "yes"}}}
    as_agent.patch_cluster_custom_object(GROUP, VERSION, "capacitynodes", node, label)
    other = _other_node(custom, node)
    message = _refused(
        as_agent.patch_cluster_custom_object, GROUP, VERSION, "capacitynodes", other, label
    )
    assert "node restriction (agent-writes-own-capacitynode)" in message, message
    assert f"its own node ({node}), not {other}" in message, message
    status: Patch = {"status": {"conditions": []}}
    message = _refused(
        as_agent.patch_cluster_custom_object_status, GROUP, VERSION, "capacitynodes", other, status
    )
    assert "agent-writes-own-capacitynode" in message, message


def test_agent_never_writes_the_allocation_ledger(agent: tuple[str, client.ApiClient]) -> None:
    node, api = agent
    forged: Patch = {"status": {"allocated": {"host": {"share": 0.99, "claims": 1, "holders": []}}}}
    message = _refused(
        client.CustomObjectsApi(api).patch_cluster_custom_object_status,
        GROUP, VERSION, "capacitynodes", node, forged,
    )  # fmt: skip
    assert "node restriction (agent-never-writes-allocated)" in message, message


def _vote(epoch: int) -> dict[str, Any]:
    return {
        "vote": "NO",
        "role": "witness",
        "epoch": epoch,
        "reason": "e2e",
        "time": datetime.now(UTC).isoformat(),
    }


def test_agent_changes_only_its_own_vote(
    agent: tuple[str, client.ApiClient], namespace: str, api: client.ApiClient,
    custom: client.CustomObjectsApi,
) -> None:  # fmt: skip
    node, agent_api = agent
    cluster = Cluster(api)
    cluster.create_claim(namespace, "huge", resources={"cpu": "512", "memory": "4Ti"})
    cluster.wait_phase(namespace, "huge", {"Rejected"}, timeout=120)
    as_agent = client.CustomObjectsApi(agent_api)
    other = _other_node(custom, node)

    def patch(body: Patch) -> Any:
        return as_agent.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, "capacityclaims", "huge", body
        )

    message = _refused(patch, {"status": {"votes": {other: _vote(1)}}})
    assert "node restriction (agent-writes-own-vote)" in message, message
    assert f"its own node's entry in status.votes ({node})" in message, message
    message = _refused(patch, {"status": {"phase": "Admitted"}})
    assert "node restriction (agent-writes-only-votes)" in message, message
    patch({"status": {"votes": {node: _vote(1)}}})
    votes = cluster.claim(namespace, "huge")["status"]["votes"]  # type: ignore[index]
    assert votes[node]["reason"] == "e2e"


def test_a_token_not_bound_to_a_node_is_refused(
    platform: Platform, core: client.CoreV1Api, agent: tuple[str, client.ApiClient]
) -> None:
    node, _ = agent
    unbound = _as(platform.kubeconfig, _token(core, None))
    try:
        message = _refused(
            client.CustomObjectsApi(unbound).patch_cluster_custom_object,
            GROUP, VERSION, "capacitynodes", node,
            {"metadata": {"labels": {"e2e.capacity.platform.dev/touched": "unbound"}}},
        )  # fmt: skip
    finally:
        unbound.close()
    assert "node restriction (agent-token-bound-to-node)" in message, message
