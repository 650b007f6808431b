"""Test tiers: every test under unit/, integration/ or e2e/ carries that tier's marker; the
cluster fixtures the integration and e2e tiers share (the test cluster, its clients, kubectl)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import client

from tests import kube

_TIERS = {"unit": "unit", "integration": "integration", "e2e": "e2e"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with the tier of its directory, so `-m unit` selects exactly tests/unit."""
    root = Path(__file__).parent
    for item in items:
        parts = Path(str(item.path)).relative_to(root).parts
        tier = _TIERS.get(parts[0]) if parts else None
        if tier is not None:
            item.add_marker(getattr(pytest.mark, tier))


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
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture(scope="session")
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
