"""capctl against a real API server: a Voting claim with a proposal written through the status
subresource (as the operator writes it) and the votes on it in the voters' CapacityBallots (as
the agents write them: the ballot created, its status merge-patched), CapacityNodes with status,
Leases and the calibration ConfigMap; capctl runs as the installed console script."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from capacity_api import GROUP, VERSION
from capacity_api.gates import CALIBRATION_CONFIGMAP
from tests.kube import REPO

CAPCTL = REPO / ".venv" / "bin" / "capctl"
FIT = {
    "headroom": 0.6,
    "fitError": 0.0,
    "isolation": 0.55,
    "gluingDelta": 0.02,
    "lambda1": 0.12,
    "lambdaInt": 0.31,
    "entropy": 0.8,
    "allocated": 0.2,
    "request": 0.25,
    "p95": 0.4,
}


def iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def run_capctl(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CAPCTL), "--kubeconfig", str(kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def platform_namespace(api: client.ApiClient) -> Iterator[str]:
    """A namespace standing in for capacity-system: node Leases and the calibration ConfigMap."""
    name = f"cp-platform-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    try:
        core.delete_namespace(name)
    except ApiException as exc:
        if exc.status != 404:
            raise


@pytest.fixture
def node_names(custom: client.CustomObjectsApi, crds: list[str]) -> Iterator[list[str]]:
    """Unique names for cluster-scoped CapacityNodes and CapacityBallots; whatever the test
    created is deleted."""
    prefix = f"cp-test-{uuid.uuid4().hex[:8]}"
    names = [f"{prefix}-a", f"{prefix}-b", f"{prefix}-c"]
    yield names
    for plural in ("capacitynodes", "capacityballots"):
        for name in names:
            try:
                custom.delete_cluster_custom_object(GROUP, VERSION, plural, name)
            except ApiException as exc:
                if exc.status != 404:
                    raise


def create_node(
    custom: client.CustomObjectsApi, name: str, now: datetime, holders: int
) -> dict[str, Any]:
    custom.create_cluster_custom_object(
        GROUP,
        VERSION,
        "capacitynodes",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "CapacityNode",
            "metadata": {"name": name},
            "spec": {
                "nodeName": name,
                "substrates": ["host"],
                "capacity": {"cpu": "8", "memory": "32Gi"},
            },
        },
    )
    status = {
        "readings": {
            "host": {
                "load": {"mean": 0.3, "p95": 0.4, "max": 0.5},
                "observedAt": iso(now - timedelta(seconds=2)),
                "samples": 64,
            }
        },
        "gates": {
            "host": {
                "headroom": 0.6,
                "gluingDelta": 0.02,
                "lambda1": 0.12,
                "lambdaInt": 0.31,
                "entropy": 0.8,
            }
        },
        "allocated": {
            "host": {
                "share": 0.1 * holders,
                "claims": holders,
                "holders": [
                    {"claim": f"ns/c{i}", "uid": f"u{i}", "epoch": 1, "share": 0.1}
                    for i in range(holders)
                ],
            }
        },
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "Measuring"},
            {"type": "Stale", "status": "False", "reason": "Fresh"},
        ],
    }
    out: dict[str, Any] = custom.patch_cluster_custom_object_status(
        GROUP, VERSION, "capacitynodes", name, {"status": status}
    )
    return out


def create_lease(api: client.ApiClient, namespace: str, name: str, renewed: datetime) -> None:
    client.CoordinationV1Api(api).create_namespaced_lease(
        namespace,
        client.V1Lease(
            metadata=client.V1ObjectMeta(name=name),
            spec=client.V1LeaseSpec(
                holder_identity=name, lease_duration_seconds=40, renew_time=renewed
            ),
        ),
    )


def write_ballot(custom: client.CustomObjectsApi, node: str, votes: dict[str, Any]) -> None:
    """As an agent votes: its node's ballot created when missing, the votes (claim uid -> vote)
    merged into its status."""
    try:
        custom.create_cluster_custom_object(
            GROUP,
            VERSION,
            "capacityballots",
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "CapacityBallot",
                "metadata": {"name": node},
                "spec": {"nodeName": node},
            },
        )
    except ApiException as exc:
        if exc.status != 409:
            raise
    custom.patch_cluster_custom_object_status(
        GROUP, VERSION, "capacityballots", node, {"status": {"votes": votes}}
    )


def create_voting_claim(
    custom: client.CustomObjectsApi, namespace: str, nodes: list[str], now: datetime
) -> dict[str, Any]:
    created: dict[str, Any] = custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "capacityclaims",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "CapacityClaim",
            "metadata": {"name": "web"},
            "spec": {"cGeo": 0.25, "substrate": "host"},
        },
    )
    a, b, c = nodes
    status = {
        "phase": "Voting",
        "reason": "Proposed",
        "message": f"epoch 2: asking {a}, {b}, {c} to vote on 0.250 of host on {a}",
        "observedGeneration": created["metadata"]["generation"],
        "attempts": 2,
        "proposal": {
            "epoch": 2,
            "placement": [a],
            "voters": [a, b, c],
            "deadline": iso(now + timedelta(minutes=10)),
            "share": 0.25,
            "substrate": "host",
        },
        "refusals": {"cp-old-node": "fit_error 0.31 > theta_fit 0.2"},
        "voteCount": "1/2",
    }
    out: dict[str, Any] = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "capacityclaims", "web", {"status": status}
    )
    # the votes: in the voters' ballots, keyed by the claim's uid (the claim holds none while
    # it is Voting); c has not voted (no ballot)
    uid, key = created["metadata"]["uid"], f"{namespace}/web"
    write_ballot(
        custom,
        a,
        {
            uid: {
                "vote": "YES",
                "role": "placement",
                "epoch": 2,
                "reason": "fits: fit_error 0.00 <= 0.2, isolation 0.55 >= 0.15",
                "readings": FIT,
                "time": iso(now),
                "claim": key,
            },
            # another claim's vote in the same ballot: not this claim's
            f"{uid}-other": {
                "vote": "NO",
                "role": "placement",
                "epoch": 2,
                "reason": "fit_error 0.31 > theta_fit 0.2",
                "time": iso(now),
                "claim": f"{namespace}/other",
            },
        },
    )
    # cast for epoch 1 and not yet withdrawn: must be shown as not counted
    write_ballot(
        custom,
        b,
        {
            uid: {
                "vote": "YES",
                "role": "witness",
                "epoch": 1,
                "reason": "placement nodes alive",
                "time": iso(now - timedelta(seconds=20)),
                "claim": key,
            }
        },
    )
    return out


def create_event(api: client.ApiClient, claim: dict[str, Any], now: datetime) -> None:
    meta = claim["metadata"]
    client.CoreV1Api(api).create_namespaced_event(
        meta["namespace"],
        client.CoreV1Event(
            metadata=client.V1ObjectMeta(name=f"web.{uuid.uuid4().hex[:10]}"),
            involved_object=client.V1ObjectReference(
                api_version=f"{GROUP}/{VERSION}",
                kind="CapacityClaim",
                name=meta["name"],
                namespace=meta["namespace"],
                uid=meta["uid"],
            ),
            reason="Proposed",
            message="epoch 2: asking for votes",
            type="Normal",
            count=1,
            first_timestamp=now,
            last_timestamp=now,
            source=client.V1EventSource(component="capacity-operator"),
        ),
    )


def test_explain_and_nodes(
    api: client.ApiClient,
    kubeconfig: Path,
    namespace: str,
    platform_namespace: str,
    node_names: list[str],
) -> None:
    custom = client.CustomObjectsApi(api)
    now = datetime.now(UTC)
    a, b, c = node_names
    create_node(custom, a, now, holders=2)
    create_node(custom, b, now, holders=0)
    create_lease(api, platform_namespace, a, now)
    create_lease(api, platform_namespace, b, now - timedelta(seconds=120))
    client.CoreV1Api(api).create_namespaced_config_map(
        platform_namespace,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=CALIBRATION_CONFIGMAP),
            data={"thetaFit": "0.2", "thetaIso": "0.15"},
        ),
    )
    claim = create_voting_claim(custom, namespace, node_names, now)
    create_event(api, claim, now)
    deadline = (now + timedelta(minutes=10)).strftime("%H:%M:%S")

    # -- explain, text ----------------------------------------------------------------------
    out = run_capctl(
        kubeconfig, "explain", "web", "-n", namespace, "--platform-namespace", platform_namespace
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    text = out.stdout
    assert f"Claim:     {namespace}/web" in text
    assert "Phase:     Voting (Proposed)" in text
    assert f"Why:       Voting: waiting for {b}, {c} until {deadline} UTC (1/2 YES so far)." in (
        text
    )
    assert "Proposal: epoch 2" in text
    assert f"voters     {a}, {b}, {c}" in text
    assert "thetaFit 0.2," in text
    assert f"from ConfigMap {platform_namespace}/{CALIBRATION_CONFIGMAP}" in text
    assert "from the voters' CapacityBallots:" in text
    lines = text.splitlines()
    vote_b = next(line for line in lines if line.strip().startswith(b) and "witness" in line)
    assert vote_b.split()[1:5] == ["witness", "YES", "1", "stale,"]
    assert "stale, not counted" in vote_b
    vote_c = next(line for line in lines if line.strip().startswith(c))
    assert "no vote yet" in vote_c
    assert "fitError ≤ 0.2" in text
    gate_a = next(line for line in lines if line.strip().startswith(f"{a}  0.000"))
    assert gate_a.count("✓") == 4
    assert "cp-old-node  fit_error 0.31 > theta_fit 0.2" in text
    assert "Proposed" in text.split("Events (newest last")[1]
    assert "epoch 2: asking for votes" in text

    # -- explain, json ----------------------------------------------------------------------
    out = run_capctl(
        kubeconfig,
        "explain",
        "web",
        "-n",
        namespace,
        "--platform-namespace",
        platform_namespace,
        "-o",
        "json",
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["claim"]["uid"] == claim["metadata"]["uid"]
    assert data["phase"] == "Voting"
    assert data["why"].startswith(f"Voting: waiting for {b}, {c} until")
    assert data["tally"]["voteCount"] == "1/2"
    assert data["thresholds"]["thetaFit"] == 0.2
    assert data["votesFrom"] == "ballots"
    votes = {v["node"]: v for v in data["votes"]}
    assert votes[a]["counted"] is True
    assert votes[a]["reason"].startswith("fits")
    assert votes[b]["counted"] is False
    assert votes[b]["note"] == "stale, not counted"
    assert votes[c]["vote"] is None
    assert all(g["pass"] for g in votes[a]["gates"])
    assert [e["reason"] for e in data["events"]] == ["Proposed"]
    assert data["refusals"] == [{"node": "cp-old-node", "reason": "fit_error 0.31 > theta_fit 0.2"}]

    # -- nodes ------------------------------------------------------------------------------
    out = run_capctl(kubeconfig, "nodes", "--platform-namespace", platform_namespace)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == [
        "NODE",
        "STATE",
        "READY",
        "STALE",
        "LEASE",
        "SUBSTRATE",
        "OBSERVED",
        "P95",
        "HEADROOM",
        "ALLOC",
        "CLAIMS",
        "GLUE",
        "LAMBDA_INT",
        "ENTROPY",
    ]
    row_a = next(line for line in lines if line.startswith(a + " ")).split()
    assert row_a[:4] == [a, "Alive", "True", "False"]
    assert row_a[5] == "host"
    assert row_a[7:] == ["0.40", "0.60", "0.20", "2", "0.020", "0.310", "0.800"]
    row_b = next(line for line in lines if line.startswith(b + " "))
    assert "expired (" in row_b
    assert row_b.split()[1] == "Suspect"
    row_names = [line.split()[0] for line in lines[1:] if line and not line.startswith(" ")]
    assert row_names == sorted(row_names)

    out = run_capctl(kubeconfig, "nodes", "--platform-namespace", platform_namespace, "-o", "json")
    assert out.returncode == 0, out.stderr
    nodes = {n["name"]: n for n in json.loads(out.stdout)}
    assert nodes[a]["lease"]["expired"] is False
    assert nodes[a]["lease"]["durationSeconds"] == 40
    assert nodes[b]["lease"]["expired"] is True
    host = nodes[a]["substrates"][0]
    assert host["substrate"] == "host"
    assert host["claims"] == 2
    assert host["allocated"] == pytest.approx(0.2)
    assert host["headroom"] == 0.6
    assert c not in nodes


def test_explain_without_calibration_uses_defaults(
    custom: client.CustomObjectsApi,
    kubeconfig: Path,
    namespace: str,
    platform_namespace: str,
) -> None:
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "capacityclaims",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "CapacityClaim",
            "metadata": {"name": "fresh"},
            "spec": {"resources": {"cpu": "1"}},
        },
    )
    out = run_capctl(
        kubeconfig,
        "-n",
        namespace,
        "--platform-namespace",
        platform_namespace,
        "-o",
        "json",
        "explain",
        "fresh",
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["phase"] is None
    assert data["why"] == "Pending: the operator has not picked the claim up yet."
    assert data["thresholds"]["thetaFit"] == 0.165
    assert data["thresholds"]["source"].startswith("defaults")
    assert data["votes"] == []
    assert data["events"] == []


def test_explain_missing_claim(kubeconfig: Path, namespace: str) -> None:
    out = run_capctl(kubeconfig, "explain", "nope", "-n", namespace)
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr == f"capctl: capacityclaim {namespace}/nope not found\n"


def test_unreachable_cluster_is_one_line(kubeconfig: Path, tmp_path: Path) -> None:
    config = yaml.safe_load(kubeconfig.read_text())
    for cluster in config["clusters"]:
        cluster["cluster"]["server"] = "https://127.0.0.1:1"
    broken = tmp_path / "kubeconfig"
    broken.write_text(yaml.safe_dump(config))
    for args in (["explain", "web"], ["nodes"]):
        out = run_capctl(broken, *args)
        assert out.returncode == 2
        assert out.stdout == ""
        assert out.stderr.startswith(
            "capctl: cannot reach the Kubernetes API server at https://127.0.0.1:1: "
        )
        assert out.stderr.count("\n") == 1
        assert "Traceback" not in out.stderr
