"""Integration tier fixtures: a real kube-apiserver, CRDs applied once, a namespace per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from capacity_api import GROUP, VERSION
from tests import kube
from tests.cluster import Cluster, wait_for
from tests.nodes import wait_default_service_account

JSON = dict[str, Any]


@pytest.fixture(scope="session")
def crds(api: client.ApiClient) -> list[str]:
    """Install the CRDs once per session (re-applied, so a changed model is picked up), on a
    cluster where no chart-installed operator runs (it would act on the tests' claims)."""
    kube.refuse_beside_chart_operator(api, "the integration tests")
    return kube.apply_crds(api)


@pytest.fixture
def namespace(api: client.ApiClient, crds: list[str]) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards."""
    name = f"cp-test-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    wait_default_service_account(core, name)
    yield name
    # its claims go first, and are gone before the next test starts: a claim waiting for room
    # in a namespace still being deleted would be admitted by the next test's cluster-wide
    # operator onto that test's nodes. Finalizers are not the operator's (it adds none), but a
    # test may have added one.
    custom = client.CustomObjectsApi(api)

    def remaining() -> list[JSON]:
        items: list[JSON] = custom.list_namespaced_custom_object(
            GROUP, VERSION, name, "capacityclaims"
        )["items"]
        return items

    for item in remaining():
        if item["metadata"].get("finalizers"):
            custom.patch_namespaced_custom_object(
                GROUP, VERSION, name, "capacityclaims", item["metadata"]["name"],
                {"metadata": {"finalizers": None}},
            )  # fmt: skip
    custom.delete_collection_namespaced_custom_object(GROUP, VERSION, name, "capacityclaims")
    wait_for(f"the claims of {name} deleted", lambda: not remaining(), timeout=60)
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


@pytest.fixture
def cluster(api: client.ApiClient) -> Cluster:
    return Cluster(api)
