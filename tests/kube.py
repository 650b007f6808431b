"""Helpers shared by the integration, e2e and benchmark tiers: which cluster to use, CRDs, kubectl.

The tests run against the local control plane that ``hack/control-plane up`` starts (real etcd and
kube-apiserver), or against the cluster in ``CAPACITY_TEST_KUBECONFIG``. They refuse a kubeconfig
whose current context does not look like a test cluster, because they create and delete objects.
"""

from __future__ import annotations

import os
import subprocess
import time
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

REPO = Path(__file__).resolve().parent.parent
CRD_DIR = REPO / "crds"
TEST_CONTEXT_PREFIXES = ("kind-", "capacity-local")
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


class NotATestClusterError(RuntimeError):
    """The kubeconfig points somewhere the tests must not touch."""


def control_plane_up() -> Path:
    """Start (or reuse) the local control plane; return its admin kubeconfig."""
    out = subprocess.run(
        [str(REPO / "hack" / "control-plane"), "up"],
        check=True,
        capture_output=True,
        text=True,
        timeout=1800,  # the first run builds kube-apiserver and etcd from source
    )
    return Path(out.stdout.strip().splitlines()[-1])


def check_test_context(kubeconfig: Path) -> str:
    """Return the current context name, or raise when it does not look like a test cluster.

    Accepted: contexts named kind-* or capacity-local, or any context whose API server is on a
    loopback address. ``CAPACITY_TEST_ALLOW_CONTEXT=<name>`` accepts one more context by name.
    """
    data = yaml.safe_load(kubeconfig.read_text())
    name = data.get("current-context", "")
    allowed = os.environ.get("CAPACITY_TEST_ALLOW_CONTEXT")
    if name.startswith(TEST_CONTEXT_PREFIXES) or (allowed and name == allowed):
        return str(name)
    contexts = {c["name"]: c["context"] for c in data.get("contexts", [])}
    clusters = {c["name"]: c["cluster"] for c in data.get("clusters", [])}
    cluster = clusters.get(contexts.get(name, {}).get("cluster", ""), {})
    host = urlparse(cluster.get("server", "")).hostname or ""
    if host in LOOPBACK:
        return str(name)
    raise NotATestClusterError(
        f"refusing to run tests against context {name!r} (server {cluster.get('server')!r}): "
        "it is not kind-*, capacity-local or on loopback; set CAPACITY_TEST_ALLOW_CONTEXT="
        f"{name} if it really is a throwaway test cluster"
    )


def test_kubeconfig() -> Path:
    """The kubeconfig the test session uses (checked), starting the local control plane if
    none is given."""
    given = os.environ.get("CAPACITY_TEST_KUBECONFIG")
    path = Path(given) if given else control_plane_up()
    check_test_context(path)
    return path


def api_client(kubeconfig: Path) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(kubeconfig))


def apply_crds(api: client.ApiClient, timeout: float = 60.0) -> list[str]:
    """Create or update every CRD in crds/ and wait until each is Established."""
    ext = client.ApiextensionsV1Api(api)
    names: list[str] = []
    for path in sorted(CRD_DIR.glob("*.yaml")):
        body: dict[str, Any] = yaml.safe_load(path.read_text())
        name = body["metadata"]["name"]
        names.append(name)
        try:
            live = ext.read_custom_resource_definition(name)
        except ApiException as exc:
            if exc.status != 404:
                raise
            ext.create_custom_resource_definition(body)
        else:
            body["metadata"]["resourceVersion"] = live.metadata.resource_version
            ext.replace_custom_resource_definition(name, body)
    deadline = time.monotonic() + timeout
    for name in names:
        while True:
            crd = ext.read_custom_resource_definition(name)
            conditions = {c.type: c.status for c in (crd.status.conditions or [])}
            if conditions.get("Established") == "True":
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {name} not Established after {timeout}s")
            time.sleep(0.2)
    return names


@cache
def tool_path(name: str) -> Path:
    """A pinned tool (kubectl, helm, ...), built once by hack/kube-tools."""
    out = subprocess.run(
        [str(REPO / "hack" / "kube-tools"), "path", name],
        check=True,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def kubectl_path() -> Path:
    """kubectl of the same release as the control plane."""
    return tool_path("kubectl")


OPERATOR_SELECTOR = (
    "app.kubernetes.io/part-of=capacity-platform,app.kubernetes.io/component=operator"
)
"""The chart's operator Deployment."""


def chart_operators(api: client.ApiClient) -> list[str]:
    """``namespace/name`` of every chart-installed operator Deployment that runs a pod.

    Such an operator serves claims of every namespace, so it acts on an integration test's or a
    benchmark's claims too, next to the operator the test runs: with the platform left installed
    by ``make run``, the admission benchmark at 100 nodes and 10/s had half its claims admitted
    by the chart's operator onto the chart's nodes, p50 18 s instead of 0.1 s, 58 API requests
    per claim instead of 22."""
    apps = client.AppsV1Api(api)
    found = apps.list_deployment_for_all_namespaces(label_selector=OPERATOR_SELECTOR).items
    return [
        f"{d.metadata.namespace}/{d.metadata.name}"
        for d in found
        if (d.status.ready_replicas or 0) > 0 or (d.spec.replicas or 0) > 0
    ]


def refuse_beside_chart_operator(api: client.ApiClient, what: str) -> None:
    """Stop with the reason and the way out when a chart-installed operator runs."""
    running = chart_operators(api)
    if running:
        raise NotATestClusterError(
            f"a chart-installed operator runs ({', '.join(running)}): it would act on the "
            f"claims of {what} too and change the results. Uninstall it first: hack/run stop "
            "(or helm uninstall the release)."
        )
