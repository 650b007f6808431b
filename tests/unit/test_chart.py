"""The Helm chart renders what a user installs: `helm lint --strict` and `helm template` with the
pinned helm (hack/kube-tools; no cluster, no network)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from capacity_api import crdgen
from tests import kube

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "capacity-platform"
KUBE_VERSION = "1.35.4"
Obj = dict[str, Any]


def helm() -> str:
    return os.environ.get("HELM") or str(kube.tool_path("helm"))


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm(), *args], capture_output=True, text=True, check=False, timeout=120)


def render(*args: str) -> list[Obj]:
    done = run_helm(
        "template", "capacity-platform", str(CHART), "--namespace", "capacity-system",
        "--kube-version", KUBE_VERSION, *args,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in of_kind(objs, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def pod_specs(objs: list[Obj]) -> Iterator[tuple[str, Obj]]:
    for o in objs:
        if o["kind"] in ("Deployment", "DaemonSet"):
            yield o["metadata"]["name"], o["spec"]["template"]["spec"]


def test_lint_strict_passes() -> None:
    done = run_helm("lint", "--strict", "--kube-version", KUBE_VERSION, str(CHART))
    assert done.returncode == 0, done.stdout + done.stderr


def test_generated_templates_match_the_models() -> None:
    for name, text in crdgen.render_chart().items():
        path = CHART / name
        assert path.exists(), f"{path} is missing: run `make crds`"
        assert path.read_text() == text, f"{path} is out of date: run `make crds`"


def test_default_install_has_every_component_with_its_own_service_account() -> None:
    objs = render()
    accounts = {o["metadata"]["name"] for o in of_kind(objs, "ServiceAccount")}
    assert accounts == {
        "capacity-platform-operator",
        "capacity-platform-webhook",
        "capacity-platform-agent",
    }
    for name, spec in pod_specs(objs):
        assert spec["serviceAccountName"] == name, name
    operator = one(objs, "Deployment", "capacity-platform-operator")
    assert operator["spec"]["replicas"] == 1
    assert operator["spec"]["strategy"] == {"type": "Recreate"}
    args = operator["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=capacity-system" in args
    assert not any(a.startswith("--standalone") for a in args), "peering must stay on"
    webhook = one(objs, "Deployment", "capacity-platform-webhook")
    assert webhook["spec"]["replicas"] == 2
    pdb = one(objs, "PodDisruptionBudget", "capacity-platform-webhook")
    assert pdb["spec"]["minAvailable"] == 1
    assert "podAntiAffinity" in webhook["spec"]["template"]["spec"]["affinity"]
    assert of_kind(objs, "ServiceMonitor") == []


def test_every_container_is_hardened_and_has_resources() -> None:
    for name, spec in pod_specs(render("--set", "simulator.enabled=true")):
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in spec["containers"]:
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False, name
            assert ctx["readOnlyRootFilesystem"] is True, name
            assert ctx["capabilities"] == {"drop": ["ALL"]}, name
            assert container["resources"]["requests"]["cpu"], name
            assert container["resources"]["limits"]["memory"], name
        assert not spec.get("hostPID"), name
        assert not spec.get("hostNetwork"), name


def test_agent_reads_the_host_read_only_and_tolerates_every_taint() -> None:
    ds = one(render(), "DaemonSet", "capacity-platform-agent")
    spec = ds["spec"]["template"]["spec"]
    assert {"operator": "Exists"} in spec["tolerations"]
    mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
    assert mounts["/host/proc"]["readOnly"] is True
    assert mounts["/host/sys"]["readOnly"] is True
    host_paths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert host_paths == {"host-proc": "/proc", "host-sys": "/sys"}
    env = {e["name"]: e for e in spec["containers"][0]["env"]}
    assert env["HOST_PROC"]["value"] == "/host/proc"
    assert env["HOST_SYS"]["value"] == "/host/sys"
    assert env["CAPACITY_AGENT_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_crds_are_kept_on_uninstall_and_can_be_left_out() -> None:
    crds = of_kind(render(), "CustomResourceDefinition")
    assert {c["metadata"]["name"] for c in crds} == {
        "capacityballots.capacity.platform.dev",
        "capacityclaims.capacity.platform.dev",
        "capacitynodes.capacity.platform.dev",
        "clusterkopfpeerings.kopf.dev",
    }
    for crd in crds:
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert of_kind(render("--set", "crds.install=false"), "CustomResourceDefinition") == []


def test_webhook_only_sees_labelled_pods_outside_system_namespaces() -> None:
    objs = render("--set", "webhook.failurePolicy=Ignore", "--set", "webhook.timeoutSeconds=3")
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        (hook,) = one(objs, kind, "capacity-platform-webhook")["webhooks"]
        assert hook["objectSelector"]["matchExpressions"] == [
            {"key": "capacity.platform.dev/claim", "operator": "Exists"}
        ]
        (term,) = hook["namespaceSelector"]["matchExpressions"]
        assert term["operator"] == "NotIn"
        assert {"kube-system", "kube-public", "kube-node-lease", "capacity-system"} <= set(
            term["values"]
        )
        assert hook["failurePolicy"] == "Ignore"
        assert hook["timeoutSeconds"] == 3
        assert hook["clientConfig"]["service"]["name"] == "capacity-platform-webhook"
        assert "caBundle" not in hook["clientConfig"], "self-signed: the webhook patches it"


def test_cert_manager_mode_renders_a_certificate_and_no_secret_rights() -> None:
    objs = render("--set", "webhook.certManager.enabled=true")
    cert = one(objs, "Certificate", "capacity-platform-webhook")
    assert cert["spec"]["dnsNames"] == ["capacity-platform-webhook.capacity-system.svc"]
    assert cert["spec"]["issuerRef"]["kind"] == "Issuer"
    hook = one(objs, "ValidatingWebhookConfiguration", "capacity-platform-webhook")
    assert (
        hook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
        == "capacity-system/capacity-platform-webhook"
    )
    roles = [r for r in of_kind(objs, "Role") if r["metadata"]["name"].endswith("-webhook")]
    assert roles == [], "cert-manager mode needs no rights on Secrets"
    args = one(objs, "Deployment", "capacity-platform-webhook")["spec"]["template"]["spec"][
        "containers"
    ][0]["args"]
    assert "--cert-dir=/certs" in args
    assert "--self-signed" not in args


@pytest.mark.parametrize(
    ("flags", "rendered"),
    [
        ((), False),
        (("--api-versions", "monitoring.coreos.com/v1/ServiceMonitor"), True),
        (("--set", "serviceMonitor.enabled=true"), True),
        (
            (
                "--set",
                "serviceMonitor.enabled=false",
                "--api-versions",
                "monitoring.coreos.com/v1/ServiceMonitor",
            ),
            False,
        ),
    ],
)
def test_service_monitor_follows_the_api_or_the_value(
    flags: tuple[str, ...], rendered: bool
) -> None:
    assert bool(of_kind(render(*flags), "ServiceMonitor")) is rendered


def test_node_restriction_policy_names_the_agent_accounts() -> None:
    objs = render("--set", "simulator.enabled=true")
    policy = one(objs, "ValidatingAdmissionPolicy", "capacity-platform-node-restriction")
    condition = policy["spec"]["matchConditions"][0]["expression"]
    assert "system:serviceaccount:capacity-system:capacity-platform-agent" in condition
    assert "system:serviceaccount:capacity-system:capacity-platform-simulator" in condition
    assert "kwok-node-" in yaml.safe_dump(policy)
    binding = one(objs, "ValidatingAdmissionPolicyBinding", "capacity-platform-node-restriction")
    assert binding["spec"]["validationActions"] == ["Deny"]
    disabled = render("--set", "nodeRestriction.enabled=false")
    assert of_kind(disabled, "ValidatingAdmissionPolicy") == []


def _grants(role: Obj) -> dict[str, set[str]]:
    return {
        resource: set(rule["verbs"])
        for rule in role["rules"]
        if "capacity.platform.dev" in rule.get("apiGroups", [])
        for resource in rule["resources"]
    }


def test_agents_vote_in_their_ballot_and_never_write_a_claim() -> None:
    objs = render("--set", "simulator.enabled=true")
    agent = _grants(one(objs, "ClusterRole", "capacity-platform-agent"))
    assert agent["capacityballots"] == {"get", "create", "patch", "update"}
    assert agent["capacityballots/status"] == {"get", "patch", "update"}
    assert agent["capacityclaims"] == {"get", "list", "watch"}
    assert "capacityclaims/status" not in agent
    binding = one(objs, "ClusterRoleBinding", "capacity-platform-agent")
    accounts = {s["name"] for s in binding["subjects"]}
    assert accounts == {"capacity-platform-agent", "capacity-platform-simulator"}
    operator = _grants(one(objs, "ClusterRole", "capacity-platform-operator"))
    assert operator["capacityballots"] == {"get", "list", "watch", "delete"}
    assert "capacityballots/status" not in operator


def test_outcome_store_on_an_empty_dir_a_kept_claim_or_postgresql_from_a_secret() -> None:
    def store(*args: str) -> tuple[Obj, dict[str, Obj], list[Obj]]:
        objs = render(*args)
        spec = one(objs, "Deployment", "capacity-platform-operator")["spec"]["template"]["spec"]
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        volume = next(v for v in spec["volumes"] if v["name"] == "outcomes")
        return volume, env, of_kind(objs, "PersistentVolumeClaim")

    volume, env, claims = store()
    assert "emptyDir" in volume
    assert claims == []
    assert env["CAPACITY_OPERATOR_STORE_PATH"]["value"] == "/var/lib/capacity-platform/outcomes.db"
    assert "CAPACITY_OPERATOR_STORE_DSN" not in env
    volume, env, claims = store(
        "--set", "operator.store.persistence.enabled=true",
        "--set", "operator.store.persistence.size=5Gi",
        "--set", "operator.store.postgres.existingSecret=outcomes-db",
    )  # fmt: skip
    (claim,) = claims
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    ref = env["CAPACITY_OPERATOR_STORE_DSN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "outcomes-db", "key": "dsn"}


@pytest.mark.parametrize(
    ("flag", "says"),
    [
        ("webhook.replicas=-1", "/webhook/replicas"),
        ("webhook.failurePolicy=Sometimes", "/webhook/failurePolicy"),
        ("webhook.timeoutSeconds=60", "/webhook/timeoutSeconds"),
        ("agent.cgroupPath=kubepods", "/agent/cgroupPath"),
        ("simulator.nodeNamePrefix=kwok", "/simulator/nodeNamePrefix"),
        ("operator.maxAttempts=0", "/operator/maxAttempts"),
        ("operator.store.persistence.enabled=maybe", "/operator/store/persistence/enabled"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("agent.intervall=1", "intervall"),
    ],
)
def test_schema_refuses_a_bad_value_naming_the_key(flag: str, says: str) -> None:
    done = run_helm("template", "x", str(CHART), "--kube-version", KUBE_VERSION, "--set", flag)
    assert done.returncode != 0
    assert says in done.stderr, done.stderr


def test_local_cluster_values_keep_platform_pods_on_the_real_node() -> None:
    objs = render("--values", str(REPO / "hack" / "chart-values" / "local-cluster.yaml"))
    for name, spec in pod_specs(objs):
        if name.endswith("-agent"):
            terms = spec["affinity"]["nodeAffinity"][
                "requiredDuringSchedulingIgnoredDuringExecution"
            ]
            assert terms["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == ["kwok"]
            continue
        assert spec["nodeSelector"] == {"capacity.platform.dev/node-kind": "real"}, name
        assert spec["tolerations"][0]["key"] == "capacity.platform.dev/real-node", name
        assert spec["containers"][0]["imagePullPolicy"] == "Never", name
    simulator = one(objs, "Deployment", "capacity-platform-simulator")
    args = simulator["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--node-name=kwok-node" in args
    assert "--simulate=3" in args


def test_the_test_guard_finds_exactly_the_chart_operator() -> None:
    """Integration tests and benchmarks refuse to run beside a chart-installed operator
    (tests.kube.chart_operators): its label selector picks the operator Deployment, and only
    it."""
    wanted = dict(pair.split("=") for pair in kube.OPERATOR_SELECTOR.split(","))
    picked = [
        o["metadata"]["name"]
        for o in render()
        if o["kind"] == "Deployment" and wanted.items() <= o["metadata"]["labels"].items()
    ]
    assert picked == ["capacity-platform-operator"]
