"""The local cluster is a real one: kube-scheduler places pods, a real kubelet runs them with
containerd and runc (real kernel OOM kills), kwok nodes take pods at scale, and pods on the real
node reach the API server through the ``kubernetes`` Service with their bound tokens."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import pytest
from kubernetes import client

from tests.cluster import unique, wait_for
from tests.kube import REPO
from tests.nodes import (
    NODE_KIND,
    describe,
    image_ref,
    nodes_of_kind,
    on_real_node,
    oom_pod_spec,
    pod,
    ready,
    real_node_or_skip,
)

Kubectl = Callable[..., CompletedProcess[str]]


@pytest.fixture
def real_node(core: client.CoreV1Api) -> str:
    return real_node_or_skip(core)


def create_pod(core: client.CoreV1Api, namespace: str, name: str, spec: dict[str, Any]) -> None:
    core.create_namespaced_pod(
        namespace,
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec},
    )


def wait_terminated(
    core: client.CoreV1Api, namespace: str, name: str, timeout: float = 90
) -> client.V1ContainerStateTerminated:
    """The first container's termination (current state, or the last one after a restart)."""

    def probe() -> client.V1ContainerStateTerminated | None:
        live = pod(core, namespace, name)
        for cs in (live.status.container_statuses or []) if live else []:
            for st in (cs.state, cs.last_state):
                if st is not None and st.terminated is not None:
                    return st.terminated
        return None

    try:
        return wait_for(f"pod {namespace}/{name} terminated", probe, timeout=timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{describe(core, namespace, name)}") from None


def test_real_node_is_ready_with_its_labels_and_taint(
    core: client.CoreV1Api, real_node: str
) -> None:
    node = core.read_node(real_node)
    assert ready(node)
    assert node.metadata.labels[NODE_KIND] == "real"
    assert [(t.key, t.effect) for t in node.spec.taints or []] == [
        ("capacity.platform.dev/real-node", "NoSchedule")
    ]
    info = node.status.node_info
    assert info.kubelet_version == "v1.35.4"
    assert info.container_runtime_version.startswith("containerd://")
    addresses = {a.type: a.address for a in node.status.addresses}
    assert not addresses["InternalIP"].startswith("127."), addresses


def test_platform_image_runs_capctl_and_logs_are_readable(
    core: client.CoreV1Api, namespace: str, real_node: str, kubectl: Kubectl
) -> None:
    name = unique("capctl")
    spec = on_real_node(
        {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "capctl",
                    "image": image_ref("platform"),
                    "imagePullPolicy": "Never",
                    "command": ["capctl", "--version"],
                }
            ],
        }
    )
    create_pod(core, namespace, name, spec)
    done = wait_terminated(core, namespace, name)
    assert done.exit_code == 0, describe(core, namespace, name)
    assert pod(core, namespace, name).spec.node_name == real_node  # type: ignore[union-attr]
    # through kube-apiserver -> kubelet (client certificate, InternalIP), as a user reads logs
    logs = kubectl("logs", "-n", namespace, name).stdout
    assert logs.strip() == "capctl 0.1.0"


def test_memory_limit_exceeded_is_a_kernel_oom_kill(
    core: client.CoreV1Api, namespace: str, real_node: str
) -> None:
    name = unique("hog")
    spec = oom_pod_spec()
    create_pod(core, namespace, name, spec)
    done = wait_terminated(core, namespace, name)
    assert done.reason == "OOMKilled", describe(core, namespace, name)
    assert done.exit_code == 137

    # restartPolicy Never: the kubelet then reports the pod Failed
    def failed() -> bool:
        live = pod(core, namespace, name)
        return live is not None and live.status.phase == "Failed"

    wait_for(f"pod {namespace}/{name} Failed", failed, timeout=30)


def test_pod_reaches_the_api_server_with_a_token_bound_to_its_node(
    core: client.CoreV1Api, api: client.ApiClient, namespace: str, real_node: str
) -> None:
    """In-cluster config (KUBERNETES_SERVICE_HOST, the projected token and CA) works from a pod
    on the real node, and the token names the node the pod runs on."""
    name = unique("incluster")
    script = (
        "from kubernetes import client, config\n"
        "config.load_incluster_config()\n"
        "print(client.VersionApi().get_code().git_version)\n"
        "token = open('/var/run/secrets/kubernetes.io/serviceaccount/token').read()\n"
        "print(token)\n"
    )
    spec = on_real_node(
        {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": image_ref("platform"),
                    "imagePullPolicy": "Never",
                    "command": ["python", "-c", script],
                }
            ],
        }
    )
    create_pod(core, namespace, name, spec)
    done = wait_terminated(core, namespace, name)
    logs = core.read_namespaced_pod_log(name, namespace)
    assert done.exit_code == 0, f"{describe(core, namespace, name)}\n{logs}"
    version, token = logs.split()
    assert version == "v1.35.4"
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["kubernetes.io"]["node"]["name"] == real_node
    assert claims["kubernetes.io"]["pod"]["name"] == name
    review = client.AuthenticationV1Api(api).create_token_review(
        client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token))
    )
    assert review.status.authenticated
    assert review.status.user.username == f"system:serviceaccount:{namespace}:default"
    assert review.status.user.extra["authentication.kubernetes.io/node-name"] == [real_node]


def test_daemonset_lands_one_pod_on_every_node(
    core: client.CoreV1Api, api: client.ApiClient, namespace: str
) -> None:
    nodes = {n.metadata.name for n in core.list_node().items if ready(n)}
    kinds = {n.metadata.labels.get(NODE_KIND) for n in core.list_node().items}
    assert "kwok" in kinds, "the local cluster runs kwok nodes"
    name = unique("ds")
    labels = {"app": name}
    body = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [
                        {
                            "name": "main",
                            "image": image_ref("testbox"),
                            "imagePullPolicy": "Never",
                            "command": ["sleep", "3600"],
                        }
                    ],
                },
            },
        },
    }
    client.AppsV1Api(api).create_namespaced_daemon_set(namespace, body)

    def running_on() -> set[str] | None:
        pods = core.list_namespaced_pod(namespace, label_selector=f"app={name}").items
        where = {p.spec.node_name for p in pods if p.status.phase == "Running"}
        return where if where >= nodes else None

    where = wait_for(f"DaemonSet pods Running on {sorted(nodes)}", running_on, timeout=90)
    pods = core.list_namespaced_pod(namespace, label_selector=f"app={name}").items
    assert len(pods) == len(nodes), [p.spec.node_name for p in pods]
    assert where == nodes


def test_deployment_is_scheduled_onto_kwok_nodes(
    core: client.CoreV1Api, api: client.ApiClient, namespace: str
) -> None:
    kwok = {n.metadata.name for n in nodes_of_kind(core, "kwok") if ready(n)}
    assert kwok, "no Ready kwok node"
    name = unique("web")
    labels = {"app": name}
    replicas = 3 * len(kwok)
    body = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": "main",
                            "image": "capacity.local/not-pulled:1",
                            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
                        }
                    ]
                },
            },
        },
    }
    client.AppsV1Api(api).create_namespaced_deployment(namespace, body)

    def all_running() -> list[client.V1Pod] | None:
        pods = core.list_namespaced_pod(namespace, label_selector=f"app={name}").items
        up = [p for p in pods if p.status.phase == "Running"]
        return up if len(up) == replicas else None

    pods = wait_for(f"{replicas} pods of {name} Running", all_running, timeout=90)
    where = {p.spec.node_name for p in pods}
    # kube-scheduler spread them over the kwok nodes; the tainted real node took none
    assert where <= kwok, where
    assert len(where) > 1, where
    events = core.list_namespaced_event(namespace, field_selector="reason=Scheduled").items
    schedulers = {
        e.reporting_component or e.source.component
        for e in events
        if e.involved_object.name.startswith(name)
    }
    assert schedulers == {"default-scheduler"}


def test_a_second_cluster_without_a_node_leaves_the_real_node_alone(
    core: client.CoreV1Api, namespace: str, real_node: str, tmp_path: Path
) -> None:
    """Another cluster on this machine (as test_agent starts one) shares the default bridge
    name; its up and down must not touch the running node's pods, cgroups, bridge or routes."""
    name = unique("survivor")
    spec = on_real_node(
        {
            "containers": [
                {
                    "name": "main",
                    "image": image_ref("testbox"),
                    "imagePullPolicy": "Never",
                    "command": ["sleep", "3600"],
                }
            ]
        }
    )
    create_pod(core, namespace, name, spec)

    def running() -> bool:
        live = pod(core, namespace, name)
        return bool(
            live
            and live.status.phase == "Running"
            and all(cs.ready for cs in live.status.container_statuses or [])
        )

    wait_for(f"pod {name} Running", running, timeout=60)
    env = {
        **os.environ,
        "CAPACITY_CP_DIR": str(tmp_path / "cp"),
        "CAPACITY_CP_PORT": "28443",
        "CAPACITY_CP_ETCD_PORT": "25790",
        "CAPACITY_CP_CONTROLLERS": "0",
        "CAPACITY_CP_REAL_NODE": "0",
        "CAPACITY_CP_KWOK_NODES": "0",
    }
    for command in ("up", "down"):
        out = subprocess.run(
            [str(REPO / "hack" / "control-plane"), command],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert out.returncode == 0, out.stderr[-3000:]
    live = pod(core, namespace, name)
    assert live is not None
    assert live.status.container_statuses[0].restart_count == 0, describe(core, namespace, name)
    assert running(), describe(core, namespace, name)
    # the API server still reaches the kubelet on the bridge
    assert core.read_namespaced_pod_log(name, namespace) == ""
