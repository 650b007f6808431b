"""`helm install`: every component runs in pods from the chart, each node is published by its
agent pod (kwok nodes by the simulator pod), and a claim applied with kubectl is admitted."""

from __future__ import annotations

from typing import Any

from kubernetes import client

from capacity_api import GROUP, VERSION
from tests.cluster import Cluster, wait_for
from tests.e2e.conftest import NAMESPACE, Platform, Run
from tests.nodes import NODE_KIND, nodes_of_kind, real_node_or_skip

IMAGE = "capacity-platform:0.1.0"


def _pods(core: client.CoreV1Api, component: str) -> list[client.V1Pod]:
    selector = (
        f"app.kubernetes.io/instance=capacity-platform,app.kubernetes.io/component={component}"
    )
    return list(core.list_namespaced_pod(NAMESPACE, label_selector=selector).items)


def _running(pods: list[client.V1Pod]) -> bool:
    return bool(pods) and all(
        p.status.phase == "Running"
        and all(cs.ready for cs in p.status.container_statuses or [])
        and p.metadata.deletion_timestamp is None
        for p in pods
    )


def _ready_condition(cn: dict[str, Any]) -> str | None:
    for cond in (cn.get("status") or {}).get("conditions") or []:
        if cond["type"] == "Ready":
            return str(cond["status"])
    return None


def test_components_run_from_the_local_image_on_the_real_node(
    platform: Platform, core: client.CoreV1Api, apps: client.AppsV1Api
) -> None:
    real = real_node_or_skip(core)
    expected = {"operator": 1, "webhook": 2, "agent": 1}
    if platform.local:
        expected["simulator"] = 1
    for component, count in expected.items():
        pods = wait_for(
            f"{component} pods running",
            lambda c=component: p if _running(p := _pods(core, c)) else None,
            timeout=180,
        )
        assert len(pods) == count, [p.metadata.name for p in pods]
        for pod in pods:
            assert pod.spec.containers[0].image == IMAGE, pod.metadata.name
            assert pod.spec.service_account_name == f"capacity-platform-{component}"
            if platform.local:
                # the real node runs them for real; kwok nodes would only fake them
                assert pod.spec.node_name == real, (pod.metadata.name, pod.spec.node_name)
                status = pod.status.container_statuses[0]
                assert status.container_id.startswith("containerd://"), status
    daemonset = apps.read_namespaced_daemon_set("capacity-platform-agent", NAMESPACE)
    not_kwok = [
        n
        for n in core.list_node().items
        if (n.metadata.labels or {}).get(NODE_KIND) != "kwok" or not platform.local
    ]
    assert daemonset.status.desired_number_scheduled == len(not_kwok)
    assert daemonset.status.number_ready == len(not_kwok)


def test_every_node_is_published_ready(
    platform: Platform, core: client.CoreV1Api, custom: client.CustomObjectsApi, kubectl: Run
) -> None:
    names = sorted(n.metadata.name for n in core.list_node().items)

    def all_ready() -> list[str] | None:
        cns = custom.list_cluster_custom_object(GROUP, VERSION, "capacitynodes")["items"]
        ready = {cn["metadata"]["name"] for cn in cns if _ready_condition(cn) == "True"}
        missing = [n for n in names if n not in ready]
        return None if missing else names

    wait_for(f"CapacityNodes {names} Ready", all_ready, timeout=180)
    # published by the pods: the agent on each non-kwok node, the simulator for the kwok ones
    for cn_name in names:
        cn = custom.get_cluster_custom_object(GROUP, VERSION, "capacitynodes", cn_name)
        managers = {f["manager"] for f in cn["metadata"].get("managedFields") or []}
        assert "capacity-agent" in managers, (cn_name, managers)
    table = kubectl("get", "cn", *names).stdout
    for name in names:
        assert any(line.split()[:2] == [name, "True"] for line in table.splitlines()), table
    if platform.local:
        kwok = {n.metadata.name for n in nodes_of_kind(core, "kwok")}
        agent_nodes = {p.spec.node_name for p in _pods(core, "agent")}
        assert not kwok & agent_nodes, "agents must not run (faked) on kwok nodes"


def test_a_claim_applied_with_kubectl_is_admitted(
    platform: Platform, namespace: str, kubectl: Run, api: client.ApiClient
) -> None:
    manifest = f"""
apiVersion: {GROUP}/{VERSION}
kind: CapacityClaim
metadata: {{name: small, namespace: {namespace}}}
spec: {{cGeo: 0.05, substrate: host}}
"""
    kubectl("apply", "-f", "-", stdin=manifest)
    claim = Cluster(api).wait_phase(namespace, "small", {"Admitted", "Rejected"}, timeout=120)
    status = claim["status"]
    assert status["phase"] == "Admitted", status
    assert status["placements"], status
    out = kubectl("get", "cc", "small", "-n", namespace).stdout
    assert "Admitted" in out, out
