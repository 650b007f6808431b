"""E2E tier: the chart installed with helm (hack/install), the platform running in pods.

Runs against the local cluster (hack/control-plane: the components on its real node, the kwok
nodes published by the chart's simulator) or against any test cluster in
``CAPACITY_TEST_KUBECONFIG`` (contexts that do not look like a test cluster are refused, as in the
integration tier), with extra helm flags for it in ``CAPACITY_E2E_HELM_ARGS`` (e.g. the image of a
kind cluster: ``--set image.pullPolicy=Never``).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client

from capacity_api import GROUP, VERSION
from tests import kube
from tests.cluster import wait_for
from tests.nodes import real_node_or_skip, wait_default_service_account

REPO = Path(__file__).resolve().parents[2]
RELEASE = "capacity-platform"
NAMESPACE = "capacity-system"
CRDS = (
    "capacityballots.capacity.platform.dev",
    "capacityclaims.capacity.platform.dev",
    "capacitynodes.capacity.platform.dev",
    "clusterkopfpeerings.kopf.dev",
)
Run = Callable[..., subprocess.CompletedProcess[str]]


@dataclass(frozen=True)
class Platform:
    """The installed release."""

    kubeconfig: Path
    local: bool
    """Installed onto the local cluster with hack/chart-values/local-cluster.yaml."""

    def install(self, *flags: str) -> subprocess.CompletedProcess[str]:
        """``hack/install`` (helm upgrade --install ... --wait) with extra helm flags."""
        env = dict(os.environ)
        env.pop("KUBECONFIG", None)
        if not self.local:
            env["KUBECONFIG"] = str(self.kubeconfig)
        extra = shlex.split(os.environ.get("CAPACITY_E2E_HELM_ARGS", ""))
        return subprocess.run(
            [str(REPO / "hack" / "install"), *extra, *flags],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )

    def helm(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                str(kube.tool_path("helm")),
                "--kubeconfig",
                str(self.kubeconfig),
                "--namespace",
                NAMESPACE,
                *args,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )


@pytest.fixture(scope="session")
def apps(api: client.ApiClient) -> client.AppsV1Api:
    return client.AppsV1Api(api)


@pytest.fixture(scope="session")
def platform(kubeconfig: Path, api: client.ApiClient) -> Platform:
    """The chart installed (or upgraded to this checkout) and every pod of it ready."""
    installed = Platform(kubeconfig, local=not os.environ.get("CAPACITY_TEST_KUBECONFIG"))
    if installed.local:
        # the platform's pods need the real node (kwok nodes fake their pods): skip, or fail
        # where CAPACITY_REQUIRE_REAL_NODE=1, with the reason `up` gave
        real_node_or_skip(client.CoreV1Api(api))
    done = installed.install()
    assert done.returncode == 0, f"hack/install failed:\n{done.stderr[-4000:]}"
    return installed


@pytest.fixture
def namespace(api: client.ApiClient, platform: Platform) -> Iterator[str]:
    """A fresh namespace for one test; its claims are deleted (the operator frees them) first."""
    name = f"cp-e2e-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    wait_default_service_account(core, name)
    yield name
    custom = client.CustomObjectsApi(api)
    custom.delete_collection_namespaced_custom_object(GROUP, VERSION, name, "capacityclaims")

    def claims_gone() -> bool:
        items = custom.list_namespaced_custom_object(GROUP, VERSION, name, "capacityclaims")
        return not items["items"]

    try:
        wait_for(f"claims of {name} released", claims_gone, timeout=60)
    finally:
        for item in custom.list_namespaced_custom_object(GROUP, VERSION, name, "capacityclaims")[
            "items"
        ]:
            custom.patch_namespaced_custom_object(
                GROUP, VERSION, name, "capacityclaims", item["metadata"]["name"],
                {"metadata": {"finalizers": None}},
            )  # fmt: skip
        core.delete_namespace(name)
