"""The pod webhook, as installed by the chart: pods labelled with an admitted claim are bound to
its placement nodes and scheduled there; pods of a rejected or missing claim are refused with
the reason; pods without the label never reach it, also while no webhook replica runs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from capacity_api.webhook import CLAIM_LABEL
from tests.cluster import Cluster, wait_for
from tests.e2e.conftest import NAMESPACE, Platform
from tests.nodes import REAL_NODE_TAINT, image_ref

WEBHOOK = "capacity-platform-webhook"


def _pause_image(platform: Platform) -> str:
    return os.environ.get("CAPACITY_E2E_PAUSE_IMAGE") or image_ref("pause")


def _pod_spec(platform: Platform) -> dict[str, Any]:
    return {
        "containers": [{"name": "main", "image": _pause_image(platform)}],
        # wherever the claim is placed (the real node is tainted), the pod can go there
        "tolerations": [{"key": REAL_NODE_TAINT, "operator": "Exists", "effect": "NoSchedule"}],
        "terminationGracePeriodSeconds": 0,
    }


def _pod(name: str, spec: dict[str, Any], claim: str | None = None) -> dict[str, Any]:
    labels = {CLAIM_LABEL: claim} if claim is not None else {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": spec,
    }


def _required_hostnames(pod: client.V1Pod) -> list[list[str]]:
    affinity = pod.spec.affinity
    node = affinity.node_affinity if affinity else None
    required = node.required_during_scheduling_ignored_during_execution if node else None
    return [
        sorted(req.values)
        for term in (required.node_selector_terms if required else [])
        for req in term.match_expressions or []
        if req.key == "kubernetes.io/hostname" and req.operator == "In"
    ]


def _refusal(
    core: client.CoreV1Api, namespace: str, body: dict[str, Any], status: int = 403
) -> str:
    with pytest.raises(ApiException) as refused:
        core.create_namespaced_pod(namespace, body)
    assert refused.value.status == status, refused.value
    return str(refused.value.body)


def test_pods_of_an_admitted_claim_are_bound_and_scheduled_on_its_nodes(
    platform: Platform, namespace: str, api: client.ApiClient, apps: client.AppsV1Api,
    core: client.CoreV1Api,
) -> None:  # fmt: skip
    cluster = Cluster(api)
    cluster.create_claim(namespace, "web", cGeo=0.05, substrate="host", replicas=2)
    claim = cluster.wait_phase(namespace, "web", {"Admitted", "Rejected"}, timeout=120)
    assert claim["status"]["phase"] == "Admitted", claim["status"]
    placements = sorted(p["node"] for p in claim["status"]["placements"])
    labels = {"app": "web", CLAIM_LABEL: "web"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": labels}, "spec": _pod_spec(platform)},
        },
    }
    apps.create_namespaced_deployment(namespace, deployment)

    def scheduled() -> list[client.V1Pod] | None:
        pods = core.list_namespaced_pod(namespace, label_selector="app=web").items
        running = [p for p in pods if p.status.phase == "Running" and p.spec.node_name]
        return running if len(running) == 3 else None

    pods = wait_for("3 web pods running", scheduled, timeout=120)
    for pod in pods:
        assert _required_hostnames(pod) == [placements], pod.spec.affinity
        assert pod.spec.node_name in placements, (pod.metadata.name, pod.spec.node_name)


def test_pods_of_a_rejected_or_missing_claim_are_refused_with_the_reason(
    platform: Platform, namespace: str, api: client.ApiClient, core: client.CoreV1Api
) -> None:
    cluster = Cluster(api)
    cluster.create_claim(namespace, "too-big", resources={"cpu": "512", "memory": "4Ti"})
    claim = cluster.wait_phase(namespace, "too-big", {"Rejected", "Admitted"}, timeout=120)
    assert claim["status"]["phase"] == "Rejected", claim["status"]
    reason = claim["status"]["reason"]
    message = _refusal(core, namespace, _pod("a", _pod_spec(platform), "too-big"))
    assert (
        f'capacity claim \\"too-big\\" in namespace \\"{namespace}\\" is Rejected ({reason})'
        in (message)
    ), message
    message = _refusal(core, namespace, _pod("b", _pod_spec(platform), "nowhere"))
    assert f'capacity claim \\"nowhere\\" not found in namespace \\"{namespace}\\"' in message


@pytest.fixture
def webhook_scaled_to_zero(apps: client.AppsV1Api, core: client.CoreV1Api) -> Iterator[None]:
    before = apps.read_namespaced_deployment(WEBHOOK, NAMESPACE).spec.replicas
    apps.patch_namespaced_deployment_scale(WEBHOOK, NAMESPACE, {"spec": {"replicas": 0}})
    selector = "app.kubernetes.io/component=webhook,app.kubernetes.io/instance=capacity-platform"
    wait_for(
        "no webhook pod",
        lambda: not core.list_namespaced_pod(NAMESPACE, label_selector=selector).items,
        timeout=60,
    )
    try:
        yield
    finally:
        apps.patch_namespaced_deployment_scale(WEBHOOK, NAMESPACE, {"spec": {"replicas": before}})

        def ready() -> bool:
            status = apps.read_namespaced_deployment(WEBHOOK, NAMESPACE).status
            return (status.ready_replicas or 0) == before

        wait_for(f"{before} webhook replicas ready", ready, timeout=120)


def test_pods_without_the_label_never_reach_the_webhook(
    platform: Platform, namespace: str, core: client.CoreV1Api, webhook_scaled_to_zero: None
) -> None:
    created = core.create_namespaced_pod(namespace, _pod("plain", _pod_spec(platform)))
    assert created.spec.affinity is None, "a pod without the claim label was mutated"
    # a labelled pod, with nobody to judge it, is refused (failurePolicy Fail), not let through
    # the API server answers 500: it could not call the webhook
    message = _refusal(core, namespace, _pod("labelled", _pod_spec(platform), "web"), status=500)
    assert 'failed calling webhook \\"mutate.capacity.platform.dev\\"' in message, message
