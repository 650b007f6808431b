"""Node restriction (the chart's ValidatingAdmissionPolicy): with a token of the agent's
ServiceAccount bound to its pod, an agent writes its own node's CapacityNode and CapacityBallot
(its votes), and is refused, with the rule named, for another node's, for a ballot naming
another node, and for any write of a claim."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from capacity_api import GROUP, VERSION
from tests import kube
from tests.cluster import Cluster, wait_for
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
    return str(others[0])


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


def _vote(epoch: int, claim: str | None = None) -> dict[str, Any]:
    """A vote; with ``claim`` (namespace/name) as a ballot carries it."""
    vote: dict[str, Any] = {
        "vote": "NO",
        "role": "witness",
        "epoch": epoch,
        "reason": "e2e",
        "time": datetime.now(UTC).isoformat(),
    }
    if claim is not None:
        vote["claim"] = claim
    return vote


def _ballot(name: str, node_name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CapacityBallot",
        "metadata": {"name": name},
        "spec": {"nodeName": node_name},
    }


def _ballot_of(custom: client.CustomObjectsApi, name: str) -> dict[str, Any] | None:
    try:
        return dict(custom.get_cluster_custom_object(GROUP, VERSION, "capacityballots", name))
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def test_agent_writes_its_own_ballot_only(
    agent: tuple[str, client.ApiClient], custom: client.CustomObjectsApi
) -> None:
    node, api = agent
    as_agent = client.CustomObjectsApi(api)
    try:  # the agent creates its ballot when it starts: it may not have got that far yet
        as_agent.create_cluster_custom_object(
            GROUP, VERSION, "capacityballots", _ballot(node, node)
        )
    except ApiException as e:
        if e.status != 409:
            raise
    uid = f"e2e-{uuid.uuid4()}"

    def vote(name: str, body: Patch) -> Any:
        return as_agent.patch_cluster_custom_object_status(
            GROUP, VERSION, "capacityballots", name, body
        )

    vote(node, {"status": {"votes": {uid: _vote(1, "e2e/none")}}})
    try:
        mine = _ballot_of(custom, node)
        assert mine is not None
        assert mine["status"]["votes"][uid]["reason"] == "e2e"
    finally:
        vote(node, {"status": {"votes": {uid: None}}})
    assert uid not in ((_ballot_of(custom, node) or {}).get("status") or {}).get("votes", {})

    # a forged ballot for another node (refused before the API server looks for a name clash)
    other = _other_node(custom, node)
    message = _refused(
        as_agent.create_cluster_custom_object,
        GROUP, VERSION, "capacityballots", _ballot(other, other),
    )  # fmt: skip
    assert "node restriction (agent-writes-own-ballot)" in message, message
    assert f"its own node ({node})" in message, message
    assert f"not {other} with spec.nodeName {other}" in message, message
    if _ballot_of(custom, other) is not None:  # its agent (or the simulator) has started
        message = _refused(vote, other, {"status": {"votes": {uid: _vote(1, "e2e/none")}}})
        assert "node restriction (agent-writes-own-ballot)" in message, message

    # its own ballot made to name another node
    message = _refused(
        as_agent.patch_cluster_custom_object,
        GROUP, VERSION, "capacityballots", node, {"spec": {"nodeName": other}},
    )  # fmt: skip
    assert "node restriction (agent-writes-own-ballot)" in message, message
    assert f"not {node} with spec.nodeName {other}" in message, message
    ballot = _ballot_of(custom, node)
    assert ballot is not None
    assert ballot["spec"]["nodeName"] == node


def test_agent_never_writes_a_claim(
    agent: tuple[str, client.ApiClient], namespace: str, api: client.ApiClient
) -> None:
    node, agent_api = agent
    cluster = Cluster(api)
    cluster.create_claim(namespace, "huge", resources={"cpu": "512", "memory": "4Ti"})
    cluster.wait_phase(namespace, "huge", {"Rejected"}, timeout=120)
    as_agent = client.CustomObjectsApi(agent_api)

    def patch(body: Patch) -> Any:
        return as_agent.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, "capacityclaims", "huge", body
        )

    own_vote: Patch = {"status": {"votes": {node: _vote(1)}}}
    # RBAC refuses first: the agent's role has no write on claims
    message = _refused(patch, own_vote)
    assert "cannot patch resource" in message, message  # the answer's JSON: quotes escaped
    assert "capacityclaims/status" in message, message
    # and should a role grant it, the node restriction still refuses
    rbac = client.RbacAuthorizationV1Api(api)
    rbac.create_namespaced_role(
        namespace,
        client.V1Role(
            metadata=client.V1ObjectMeta(name="e2e-claim-writer"),
            rules=[
                client.V1PolicyRule(
                    api_groups=[GROUP],
                    resources=["capacityclaims", "capacityclaims/status"],
                    verbs=["patch", "update"],
                )
            ],
        ),
    )
    rbac.create_namespaced_role_binding(
        namespace,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="e2e-claim-writer"),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="Role", name="e2e-claim-writer"
            ),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name=AGENT, namespace=NAMESPACE)],
        ),
    )
    rule = "node restriction (agent-never-writes-claims)"

    def by_the_policy() -> str | None:  # RBAC refuses until the role binding is in force
        said = _refused(patch, own_vote)
        return said if rule in said else None

    message = wait_for("the extra role in force", by_the_policy, timeout=30)
    assert f"may not write capacity claim {namespace}/huge" in message, message
    message = _refused(patch, {"status": {"phase": "Admitted"}})
    assert rule in message, message
    message = _refused(
        as_agent.patch_namespaced_custom_object,
        GROUP, VERSION, namespace, "capacityclaims", "huge",
        {"metadata": {"labels": {"e2e.capacity.platform.dev/touched": "yes"}}},
    )  # fmt: skip
    assert rule in message, message
    status = cluster.claim(namespace, "huge")["status"]  # type: ignore[index]
    assert node not in (status.get("votes") or {})
    assert status["phase"] == "Rejected"


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
