"""The local cluster's nodes as tests see them: the real node (kubelet + containerd) and kwok nodes.

``hack/control-plane`` labels every node ``capacity.platform.dev/node-kind`` (``real`` or ``kwok``)
and taints the real node, so that only pods meant for it (tolerating the taint and selecting it)
land there. Images on the real node are built here (``hack/image``) and never pulled.
"""

from __future__ import annotations

import os
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.cluster import wait_for
from tests.kube import REPO

NODE_KIND = "capacity.platform.dev/node-kind"
REAL_NODE_TAINT = "capacity.platform.dev/real-node"
REQUIRE_REAL_NODE = "CAPACITY_REQUIRE_REAL_NODE"


def control_plane_dir() -> Path:
    default = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
    return Path(os.environ.get("CAPACITY_CP_DIR", default / "capacity-platform" / "control-plane"))


@cache
def image_ref(name: str) -> str:
    """The reference a pod spec uses for a locally built image (``hack/image ref``)."""
    out = subprocess.run(
        [str(REPO / "hack" / "image"), "ref", name],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout.strip()


def ready(node: client.V1Node) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (node.status.conditions or []))


def nodes_of_kind(core: client.CoreV1Api, kind: str) -> list[client.V1Node]:
    return list(core.list_node(label_selector=f"{NODE_KIND}={kind}").items)


def real_node_or_skip(core: client.CoreV1Api) -> str:
    """The real node's name; without one, skip, or fail where CAPACITY_REQUIRE_REAL_NODE=1
    (as in CI), with the reason ``hack/control-plane up`` gave."""
    real = [n for n in nodes_of_kind(core, "real") if ready(n)]
    if real:
        return str(real[0].metadata.name)
    why_file = control_plane_dir() / "node" / "unavailable"
    why = (
        f"no real node: {why_file.read_text().strip()}"
        if why_file.exists()
        else f"no Ready node labelled {NODE_KIND}=real"
    )
    if os.environ.get(REQUIRE_REAL_NODE) == "1":
        pytest.fail(f"{why} ({REQUIRE_REAL_NODE}=1)")
    pytest.skip(why)


def on_real_node(spec: dict[str, Any]) -> dict[str, Any]:
    """A pod spec that lands on the real node: selects it and tolerates its taint."""
    return {
        **spec,
        "nodeSelector": {NODE_KIND: "real"},
        "tolerations": [{"key": REAL_NODE_TAINT, "operator": "Exists", "effect": "NoSchedule"}],
    }


def real_node_pod_spec(
    command: list[str], *, memory: str, cpu: str = "500m", restart: str = "Never"
) -> dict[str, Any]:
    """A pod for the real node running ``command`` in the testbox image under these limits."""
    return on_real_node(
        {
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "hog" if command[0] == "/bin/memhog" else "main",
                    "image": image_ref("testbox"),
                    "imagePullPolicy": "Never",
                    "command": command,
                    "resources": {"limits": {"memory": memory, "cpu": cpu}},
                }
            ],
        }
    )


def oom_pod_spec() -> dict[str, Any]:
    """A pod for the real node whose one container allocates 200 MiB, page by page, under a
    32 MiB limit: the kernel OOM-kills it (restartPolicy Never: the pod then goes Failed)."""
    return real_node_pod_spec(["/bin/memhog", "200"], memory="32Mi")


def wait_default_service_account(core: client.CoreV1Api, namespace: str) -> None:
    """Pods need their namespace's ``default`` ServiceAccount (the ServiceAccount admission
    plugin refuses them before kube-controller-manager has made it)."""

    def probe() -> bool:
        try:
            core.read_namespaced_service_account("default", namespace)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    wait_for(f"ServiceAccount {namespace}/default", probe, timeout=60)


def pod(core: client.CoreV1Api, namespace: str, name: str) -> client.V1Pod | None:
    try:
        return core.read_namespaced_pod(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def describe(core: client.CoreV1Api, namespace: str, name: str) -> str:
    """A pod's phase, container states and Events, for assertion messages."""
    live = pod(core, namespace, name)
    if live is None:
        return f"pod {namespace}/{name} not found"
    events = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
    lines = [f"pod {namespace}/{name}: phase={live.status.phase} node={live.spec.node_name}"]
    lines += [
        f"  container {cs.name}: state={cs.state} last={cs.last_state}"
        for cs in live.status.container_statuses or []
    ]
    lines += [f"  event {e.reason}: {e.message}" for e in events.items]
    return "\n".join(lines)
