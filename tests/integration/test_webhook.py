"""The pod admission webhook as its own process, called by the real API server.

Each test runs ``python -m capacity_operator.webhook`` on 127.0.0.1 in self-signed mode and
registers Mutating and Validating webhook configurations of its own that reach it by URL and
match only the test's namespace and pods carrying the claim label. The webhook patches their
caBundle itself. Claims get their status by hand (no operator runs here), and pods go to the
kwok nodes, where they run without containers.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from capacity_api import GROUP, VERSION
from capacity_api.webhook import CLAIM_LABEL, HOSTNAME_KEY
from tests.cluster import Cluster, Proc, unique, wait_for
from tests.services import free_port

IMAGE = "capacity.local/not-pulled:1"
SECRET = "webhook-tls"
MUTATE = "mutate.capacity.platform.dev"
VALIDATE = "validate.capacity.platform.dev"
BINDS_ONLY = "pods may bind only to an Admitted claim"


@dataclass
class Webhook:
    proc: Proc
    port: int
    config: str


def webhook_proc(env: Env, config: str, port: int, log: Path) -> Proc:
    argv = [
        sys.executable,
        "-m",
        "capacity_operator.webhook",
        "--kubeconfig",
        str(env.kubeconfig),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--self-signed",
        "--ip",
        "127.0.0.1",
        "--secret-namespace",
        env.platform,
        "--secret-name",
        SECRET,
        "--webhook-config-name",
        config,
        "--resync-seconds",
        "1",
    ]
    return Proc(f"webhook:{port}", argv, log)


def hook(name: str, url: str, namespace: str) -> dict[str, Any]:
    return {
        "name": name,
        "clientConfig": {"url": url},
        "rules": [
            {
                "operations": ["CREATE"],
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }
        ],
        # only this test's namespace, only pods that name a claim
        "namespaceSelector": {
            "matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "In", "values": [namespace]}
            ]
        },
        "objectSelector": {"matchExpressions": [{"key": CLAIM_LABEL, "operator": "Exists"}]},
        "failurePolicy": "Fail",
        "timeoutSeconds": 5,
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
    }


@dataclass
class Env:
    """The cluster as one test sees it."""

    kubeconfig: Path
    api: client.ApiClient
    namespace: str
    """Where the test's claims and pods live (the only namespace the webhooks match)."""
    platform: str
    """Where the webhook keeps its Secret."""
    logs: Path

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    @property
    def admission(self) -> client.AdmissionregistrationV1Api:
        return client.AdmissionregistrationV1Api(self.api)

    @property
    def cluster(self) -> Cluster:
        return Cluster(self.api)


@pytest.fixture
def env(
    kubeconfig: Path, api: client.ApiClient, namespace: str, platform: str, tmp_path: Path
) -> Env:
    return Env(kubeconfig, api, namespace, platform, tmp_path)


@contextmanager
def serving_webhook(env: Env) -> Iterator[Webhook]:
    """The webhook process and its two configurations (deleted again before it stops)."""
    port = free_port()
    config = unique("cp-webhook")
    mutating = hook(MUTATE, f"https://127.0.0.1:{port}/mutate", env.namespace)
    mutating["reinvocationPolicy"] = "IfNeeded"
    validating = hook(VALIDATE, f"https://127.0.0.1:{port}/validate", env.namespace)
    proc = webhook_proc(env, config, port, env.logs / "webhook.log")
    try:
        env.admission.create_mutating_webhook_configuration(
            {"metadata": {"name": config}, "webhooks": [mutating]}
        )
        env.admission.create_validating_webhook_configuration(
            {"metadata": {"name": config}, "webhooks": [validating]}
        )
        yield Webhook(proc.start(), port, config)
    finally:
        _delete_configs(env.admission, config)
        proc.stop()


@pytest.fixture
def webhook(env: Env) -> Iterator[Webhook]:
    with serving_webhook(env) as serving:
        yield serving


def _delete_configs(admission: client.AdmissionregistrationV1Api, name: str) -> None:
    for delete in (
        admission.delete_mutating_webhook_configuration,
        admission.delete_validating_webhook_configuration,
    ):
        try:
            delete(name)
        except ApiException as exc:
            if exc.status != 404:
                raise


# -- helpers ------------------------------------------------------------------------------------


def kwok_nodes(core: client.CoreV1Api) -> list[str]:
    nodes = sorted(n.metadata.name for n in core.list_node(label_selector="type=kwok").items)
    if len(nodes) < 3:
        pytest.skip(f"needs 3 kwok nodes, the cluster has {len(nodes)}")
    return nodes


def set_status(
    custom: client.CustomObjectsApi, namespace: str, name: str, status: dict[str, Any]
) -> None:
    custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "capacityclaims", name, {"status": status}
    )


def admitted(nodes: list[str]) -> dict[str, Any]:
    return {
        "phase": "Admitted",
        "reason": "QuorumReached",
        "message": "admitted by hand for the webhook test",
        "placements": [{"node": n, "substrate": "host", "share": 0.25, "epoch": 1} for n in nodes],
        "nodes": ",".join(nodes),
    }


def pod_body(name: str, claim: str | None, **spec: Any) -> dict[str, Any]:
    labels = {"app": name} if claim is None else {"app": name, CLAIM_LABEL: claim}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "main", "image": IMAGE}], **spec},
    }


def trust(core: client.CoreV1Api, platform: str) -> ssl.SSLContext:
    """A client context trusting only the CA in the webhook's Secret, as the API server does."""
    secret = core.read_namespaced_secret(SECRET, platform)
    return ssl.create_default_context(cadata=base64.b64decode(secret.data["ca.crt"]).decode())


def call(
    port: int, path: str, context: ssl.SSLContext, data: bytes | None = None
) -> tuple[int, str]:
    """An HTTPS request to the webhook on 127.0.0.1:``port``; (status, body)."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        conn.request("POST" if data is not None else "GET", path, body=data)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def ca_bundles(admission: client.AdmissionregistrationV1Api, config: str) -> list[str | None]:
    mutating = admission.read_mutating_webhook_configuration(config)
    validating = admission.read_validating_webhook_configuration(config)
    return [w.client_config.ca_bundle for w in [*mutating.webhooks, *validating.webhooks]]


def wait_serving(webhook: Webhook, env: Env, claim: str) -> client.V1Pod:
    """Until the API server calls the webhook through the patched configuration: a dry-run
    create of a pod for the admitted ``claim`` succeeds (the mutated pod is returned)."""
    secret = wait_for("the webhook's Secret", lambda: _secret(env.core, env.platform), timeout=30)
    bundle = secret.data["ca.crt"]
    wait_for(
        f"caBundle in both configurations {webhook.config}",
        lambda: ca_bundles(env.admission, webhook.config) == [bundle, bundle],
        timeout=30,
    )
    assert webhook.proc.alive, webhook.proc.tail()

    def dry_run() -> client.V1Pod | None:
        body = pod_body("probe", claim, nodeSelector={"type": "kwok"})
        try:
            out: client.V1Pod = env.core.create_namespaced_pod(env.namespace, body, dry_run="All")
        except ApiException as exc:
            if exc.status == 500 and "failed calling webhook" in (exc.body or ""):
                return None  # the API server has not seen the new caBundle yet
            raise
        # not mutated: the API server has not seen the new configurations yet
        return out if out.spec.affinity is not None else None

    return wait_for("the API server to call the webhook", dry_run, timeout=30)


def _secret(core: client.CoreV1Api, namespace: str) -> client.V1Secret | None:
    try:
        return core.read_namespaced_secret(SECRET, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def required_terms(pod: client.V1Pod) -> list[client.V1NodeSelectorTerm]:
    affinity = pod.spec.affinity
    assert affinity is not None, f"pod {pod.metadata.name} has no affinity"
    required = affinity.node_affinity.required_during_scheduling_ignored_during_execution
    return list(required.node_selector_terms)


def refusal(core: client.CoreV1Api, namespace: str, body: dict[str, Any]) -> str:
    with pytest.raises(ApiException) as info:
        core.create_namespaced_pod(namespace, body)
    assert info.value.status == 403, info.value.body
    message: str = json.loads(info.value.body)["message"]
    return message


# -- tests --------------------------------------------------------------------------------------


def test_pods_of_an_admitted_claim_run_only_on_its_placement_nodes(
    webhook: Webhook, env: Env
) -> None:
    core, ns = env.core, env.namespace
    kwok = kwok_nodes(core)
    placement = kwok[1:3]  # kwok[0] is as good a node for these pods, but not a placement
    env.cluster.create_claim(ns, "web", cGeo=0.25)
    set_status(env.custom, ns, "web", admitted(placement))

    probe = wait_serving(webhook, env, "web")
    (term,) = required_terms(probe)
    assert {"key": HOSTNAME_KEY, "operator": "In", "values": placement} in [
        e.to_dict() for e in term.match_expressions
    ]

    # a Deployment whose pods already require type=kwok: the requirement joins that term
    kwok_term = {"matchExpressions": [{"key": "type", "operator": "In", "values": ["kwok"]}]}
    template = pod_body(
        "web",
        "web",
        affinity={
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [kwok_term]}
            }
        },
    )
    client.AppsV1Api(env.api).create_namespaced_deployment(
        ns,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": template["metadata"]["labels"]},
                    "spec": template["spec"],
                },
            },
        },
    )

    def running() -> list[client.V1Pod] | None:
        pods = core.list_namespaced_pod(ns, label_selector="app=web").items
        ready = [p for p in pods if p.status.phase == "Running"]
        return ready if len(ready) == 3 else None

    pods = wait_for("3 Running pods of Deployment web", running, timeout=90)
    for pod in pods:
        assert pod.spec.node_name in placement, (pod.metadata.name, pod.spec.node_name)
        (term,) = required_terms(pod)
        assert [e.to_dict() for e in term.match_expressions] == [
            {"key": "type", "operator": "In", "values": ["kwok"]},
            {"key": HOSTNAME_KEY, "operator": "In", "values": placement},
        ]
    log = webhook.proc.output()
    assert f"mutate {ns}/web-" in log
    assert f"claim=web allowed: admitted on {','.join(placement)}" in log

    # what the API server trusts is the Secret's CA; the health endpoints and bad requests
    context = trust(core, env.platform)
    assert call(webhook.port, "/healthz", context) == (200, "ok\n")
    assert call(webhook.port, "/readyz", context) == (200, "ok\n")
    status, text = call(webhook.port, "/validate", context, data=b"{not json")
    assert status == 400
    assert text.startswith("malformed AdmissionReview: body is not JSON")
    assert call(webhook.port, "/mutate", context, data=b'{"kind": "AdmissionReview"}') == (
        400,
        "malformed AdmissionReview: apiVersion is None, only 'admission.k8s.io/v1' is served "
        "(set admissionReviewVersions: [v1])\n",
    )
    assert webhook.proc.alive

    # a second replica finds the Secret valid and serves the same certificate: both agree
    before = core.read_namespaced_secret(SECRET, env.platform).metadata.resource_version
    port = free_port()
    second = webhook_proc(env, webhook.config, port, env.logs / "second.log").start()
    try:

        def ready() -> bool:
            try:
                return call(port, "/readyz", context) == (200, "ok\n")
            except ConnectionError:
                assert second.alive, second.tail()
                return False

        wait_for("the second replica to be ready", ready, timeout=30)
        wait_for(
            "the second logs the reuse",
            lambda: "reusing the certificate in Secret" in second.output(),
            timeout=5,
        )
    finally:
        second.stop()
    assert core.read_namespaced_secret(SECRET, env.platform).metadata.resource_version == before


def test_pods_of_missing_or_unadmitted_claims_are_refused_and_unlabelled_pods_never_wait(
    webhook: Webhook, env: Env
) -> None:
    core, ns = env.core, env.namespace
    kwok = kwok_nodes(core)
    env.cluster.create_claim(ns, "web", cGeo=0.25)
    set_status(env.custom, ns, "web", admitted(kwok[:1]))
    env.cluster.create_claim(ns, "too-big", cGeo=1.0)
    rejected = {"phase": "Rejected", "reason": "ExceedsNodeCapacity", "message": "never fits"}
    set_status(env.custom, ns, "too-big", rejected)
    env.cluster.create_claim(ns, "voting", cGeo=0.1)
    set_status(env.custom, ns, "voting", {"phase": "Voting", "reason": "Proposed"})
    wait_serving(webhook, env, "web")

    denied = f'admission webhook "{VALIDATE}" denied the request: '
    assert refusal(core, ns, pod_body("a", "too-big")) == (
        f'{denied}capacity claim "too-big" in namespace "{ns}" is Rejected '
        f"(ExceedsNodeCapacity): {BINDS_ONLY}"
    )
    assert refusal(core, ns, pod_body("b", "voting")) == (
        f'{denied}capacity claim "voting" in namespace "{ns}" is Voting (Proposed): {BINDS_ONLY}'
    )
    assert refusal(core, ns, pod_body("c", "nothing")) == (
        f'{denied}capacity claim "nothing" not found in namespace "{ns}"'
    )
    # a pod that names a node outside the placement itself (no scheduler involved)
    message = refusal(core, ns, pod_body("d", "web", nodeName=kwok[2]))
    assert f'pod names node "{kwok[2]}" (spec.nodeName)' in message
    assert core.list_namespaced_pod(ns).items == []
    log = webhook.proc.output()
    assert f'validate {ns}/a claim=too-big refused: capacity claim "too-big"' in log

    # with the webhook gone, labelled pods cannot be created (failurePolicy Fail) ...
    webhook.proc.stop()
    with pytest.raises(ApiException) as info:
        core.create_namespaced_pod(ns, pod_body("e", "web"))
    assert "failed calling webhook" in info.value.body
    # ... but a pod without the label is never sent to it, and is created untouched
    created = core.create_namespaced_pod(ns, pod_body("plain", None, nodeSelector={"type": "kwok"}))
    assert created.spec.affinity is None
    assert created.spec.node_selector == {"type": "kwok"}
