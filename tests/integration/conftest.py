"""Integration tier fixtures: a real kube-apiserver, CRDs applied once, a namespace per test."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from capacity_api import GROUP, VERSION
from tests import kube
from tests.cluster import Cluster
from tests.nodes import wait_default_service_account


@pytest.fixture(scope="session")
def kubeconfig() -> Path:
    """Admin kubeconfig of the test cluster (the local control plane unless
    CAPACITY_TEST_KUBECONFIG names another test cluster)."""
    return kube.test_kubeconfig()


@pytest.fixture(scope="session")
def api(kubeconfig: Path) -> Iterator[client.ApiClient]:
    api_client = kube.api_client(kubeconfig)
    yield api_client
    api_client.close()


@pytest.fixture(scope="session")
def crds(api: client.ApiClient) -> list[str]:
    """Install the CRDs once per session (re-applied, so a changed model is picked up)."""
    return kube.apply_crds(api)


@pytest.fixture
def namespace(api: client.ApiClient, crds: list[str]) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards."""
    name = f"cp-test-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    wait_default_service_account(core, name)
    yield name
    # claims left behind carry the operator's finalizer; nothing serves this namespace any more
    custom = client.CustomObjectsApi(api)
    for item in custom.list_namespaced_custom_object(GROUP, VERSION, name, "capacityclaims")[
        "items"
    ]:
        if item["metadata"].get("finalizers"):
            custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                name,
                "capacityclaims",
                item["metadata"]["name"],
                {"metadata": {"finalizers": None}},
            )
    try:
        core.delete_namespace(name)
    except ApiException as exc:  # already gone is fine
        if exc.status != 404:
            raise


@pytest.fixture
def platform(api: client.ApiClient, crds: list[str]) -> Iterator[str]:
    """A platform namespace of one test's own: node Leases and calibration live here."""
    name = f"cp-platform-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="session")
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture
def cluster(api: client.ApiClient) -> Cluster:
    return Cluster(api)


@pytest.fixture
def custom(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


@pytest.fixture(scope="session")
def kubectl(kubeconfig: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run kubectl (same release as the API server) against the test cluster."""
    binary = kube.kubectl_path()

    def run(
        *args: str, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(binary), "--kubeconfig", str(kubeconfig), *args],
            check=check,
            capture_output=True,
            text=True,
            input=stdin,
            timeout=60,
        )

    return run
