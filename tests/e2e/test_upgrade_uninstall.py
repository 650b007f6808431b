"""`helm upgrade` with changed values rolls the components; a bad value is refused naming the
key; `helm uninstall` keeps the CRDs and the claims. hack/test runs this file last: it uninstalls
the release (and installs it again at the end)."""

from __future__ import annotations

from kubernetes import client

from capacity_api import GROUP, VERSION
from tests.cluster import Cluster, wait_for
from tests.e2e.conftest import CRDS, NAMESPACE, Platform

COMPONENTS = ("operator", "webhook", "agent")


def _pods(core: client.CoreV1Api, component: str) -> list[client.V1Pod]:
    selector = (
        f"app.kubernetes.io/instance=capacity-platform,app.kubernetes.io/component={component}"
    )
    return list(core.list_namespaced_pod(NAMESPACE, label_selector=selector).items)


def _revision(platform: Platform) -> str:
    out = platform.helm("status", "capacity-platform", "-o", "json")
    assert out.returncode == 0, out.stderr
    return out.stdout.split('"version":')[-1].split(",")[0].strip()


def test_bad_value_is_refused_naming_the_key(platform: Platform) -> None:
    before = _revision(platform)
    done = platform.install("--set", "webhook.replicas=-1")
    assert done.returncode != 0
    assert "/webhook/replicas" in done.stderr, done.stderr
    assert _revision(platform) == before, "a refused upgrade must not make a revision"


def test_upgrade_with_changed_values_rolls_the_components(
    platform: Platform, core: client.CoreV1Api, apps: client.AppsV1Api,
    api: client.ApiClient,
) -> None:  # fmt: skip
    old = {c: {p.metadata.uid for p in _pods(core, c)} for c in COMPONENTS}
    done = platform.install(
        "--set", "operator.voteTimeoutSeconds=12", "--set", "webhook.timeoutSeconds=4",
        "--set", "agent.publishInterval=5",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for component in COMPONENTS:

        def rolled(c: str = component) -> list[client.V1Pod] | None:
            pods = [p for p in _pods(core, c) if p.metadata.deletion_timestamp is None]
            fresh = [
                p for p in pods if p.metadata.uid not in old[c] and p.status.phase == "Running"
            ]
            return pods if pods and len(fresh) == len(pods) else None

        wait_for(f"{component} pods replaced", rolled, timeout=180)
    operator = apps.read_namespaced_deployment("capacity-platform-operator", NAMESPACE)
    assert "--vote-timeout=12" in operator.spec.template.spec.containers[0].args
    agent = apps.read_namespaced_daemon_set("capacity-platform-agent", NAMESPACE)
    env = {e.name: e.value for e in agent.spec.template.spec.containers[0].env}
    assert env["CAPACITY_AGENT_PUBLISH_INTERVAL"] == "5"
    hooks = client.AdmissionregistrationV1Api(api).read_mutating_webhook_configuration(
        "capacity-platform-webhook"
    )
    assert hooks.webhooks[0].timeout_seconds == 4
    # the caBundle the webhook patched in survives the upgrade (the chart reads it back)
    assert hooks.webhooks[0].client_config.ca_bundle


def test_uninstall_keeps_crds_and_claims(
    platform: Platform, namespace: str, api: client.ApiClient, core: client.CoreV1Api
) -> None:
    cluster = Cluster(api)
    cluster.create_claim(namespace, "kept", cGeo=0.05, substrate="host")
    cluster.wait_phase(namespace, "kept", {"Admitted", "Rejected"}, timeout=120)
    done = platform.helm("uninstall", "capacity-platform", "--wait", "--timeout", "3m")
    assert done.returncode == 0, done.stderr
    wait_for(
        "platform pods gone",
        lambda: not any(_pods(core, c) for c in COMPONENTS),
        timeout=120,
    )
    ext = client.ApiextensionsV1Api(api)
    for name in CRDS:
        ext.read_custom_resource_definition(name)  # raises 404 if helm deleted it
    assert cluster.claim(namespace, "kept") is not None
    core.read_namespaced_config_map("capacity-calibration", NAMESPACE)
    custom = client.CustomObjectsApi(api)
    assert custom.list_cluster_custom_object(GROUP, VERSION, "capacitynodes")["items"]
    # installed again: the kept objects are taken over, the claim is served again
    done = platform.install()
    assert done.returncode == 0, done.stderr[-3000:]
