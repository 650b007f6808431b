"""The CRD schema does its job on a real API server: good claims in, bad claims out with the field
named, status kept apart from spec, and the printer columns served."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from capacity_api import GROUP, VERSION

Kubectl = Callable[..., subprocess.CompletedProcess[str]]


def claim(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CapacityClaim",
        "metadata": {"name": name},
        "spec": spec,
    }


def create_claim(custom: client.CustomObjectsApi, namespace: str, body: dict[str, Any]) -> Any:
    return custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "capacityclaims", body)


def test_valid_claim_is_accepted_with_defaults(
    custom: client.CustomObjectsApi, namespace: str
) -> None:
    created = create_claim(
        custom,
        namespace,
        claim("web", resources={"cpu": "500m", "memory": "1Gi", "nvidia.com/gpu": 1}),
    )
    spec = created["spec"]
    assert spec["resources"] == {"cpu": "500m", "memory": "1Gi", "nvidia.com/gpu": 1}
    assert spec["replicas"] == 1
    assert spec["substrate"] == "auto"


def test_share_claim_is_accepted(custom: client.CustomObjectsApi, namespace: str) -> None:
    created = create_claim(
        custom,
        namespace,
        claim("batch", cGeo=0.25, cInt=0.1, substrate="host", replicas=2, witnesses=1),
    )
    assert created["spec"]["cGeo"] == 0.25
    assert created["spec"]["witnesses"] == 1


# (test id, spec, the field the message must name, a phrase of the rule)
REFUSED = [
    ("cgeo-above-one", {"cGeo": 1.5}, "spec.cGeo", "less than or equal to 1"),
    ("negative-cpu-string", {"resources": {"cpu": "-1"}}, "spec.resources.cpu", "should match"),
    (
        "negative-cpu-int",
        {"resources": {"cpu": -2}},
        "spec.resources.cpu",
        "greater than or equal to 0",
    ),
    ("malformed-cpu", {"resources": {"cpu": "two cores"}}, "spec.resources.cpu", "should match"),
    (
        "unknown-substrate",
        {"cGeo": 0.1, "substrate": "quantum"},
        "spec.substrate",
        "Unsupported value",
    ),
    ("zero-replicas", {"cGeo": 0.1, "replicas": 0}, "spec.replicas", "greater than or equal to 1"),
    (
        "resources-and-cgeo",
        {"cGeo": 0.1, "resources": {"cpu": "1"}},
        "spec",
        "exactly one of spec.resources or spec.cGeo/spec.cInt",
    ),
    ("neither", {"replicas": 2}, "spec", "exactly one of spec.resources or spec.cGeo/spec.cInt"),
    ("empty-resources", {"resources": {}}, "spec.resources", "at least 1 properties"),
    (
        "too-many-voters",
        {"cGeo": 0.1, "replicas": 20, "witnesses": 20},
        "spec.witnesses",
        "must not exceed 32 voters",
    ),
]


@pytest.mark.parametrize(
    ("spec", "field", "rule"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED]
)
def test_invalid_claim_is_refused_naming_the_field(
    custom: client.CustomObjectsApi, namespace: str, spec: dict[str, Any], field: str, rule: str
) -> None:
    with pytest.raises(ApiException) as info:
        create_claim(custom, namespace, claim("bad", **spec))
    assert info.value.status == 422
    body = json.loads(info.value.body)
    causes = body["details"]["causes"]
    fields = {c.get("field") for c in causes}
    assert field in fields, body["message"]
    assert rule in body["message"]
    # nothing was stored
    with pytest.raises(ApiException) as missing:
        custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "capacityclaims", "bad")
    assert missing.value.status == 404


def test_spec_update_leaves_status_untouched(
    custom: client.CustomObjectsApi, namespace: str
) -> None:
    create_claim(custom, namespace, claim("sub", cGeo=0.2))
    status = {"status": {"phase": "Admitted", "reason": "QuorumReached", "voteCount": "3/2"}}
    custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "capacityclaims", "sub", status
    )
    # a write to the main resource cannot change status, and changing spec keeps it
    updated = custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "capacityclaims",
        "sub",
        {"spec": {"cGeo": 0.3}, "status": {"phase": "Rejected"}},
    )
    assert updated["spec"]["cGeo"] == 0.3
    assert updated["metadata"]["generation"] == 2
    assert updated["status"]["phase"] == "Admitted"
    assert updated["status"]["reason"] == "QuorumReached"
    # and a status write cannot change spec
    after = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "capacityclaims", "sub", {"spec": {"cGeo": 0.9}}
    )
    assert after["spec"]["cGeo"] == 0.3
    assert after["metadata"]["generation"] == 2


def test_status_is_validated_too(custom: client.CustomObjectsApi, namespace: str) -> None:
    create_claim(custom, namespace, claim("st", cGeo=0.2))
    with pytest.raises(ApiException) as info:
        custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, "capacityclaims", "st", {"status": {"phase": "Maybe"}}
        )
    assert info.value.status == 422
    assert "status.phase" in info.value.body


def test_server_side_table_shows_printer_columns(
    api: client.ApiClient, custom: client.CustomObjectsApi, namespace: str
) -> None:
    create_claim(custom, namespace, claim("tbl", cGeo=0.2, replicas=2))
    custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        "capacityclaims",
        "tbl",
        {"status": {"phase": "Admitted", "nodes": "n1,n2", "voteCount": "3/2", "reason": "Quorum"}},
    )
    response = api.call_api(
        f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/capacityclaims",
        "GET",
        header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
        response_type="object",
        _return_http_data_only=True,
    )
    columns = [c["name"] for c in response["columnDefinitions"]]
    assert columns == ["Name", "Phase", "Nodes", "Votes", "Reason", "Age"]
    (row,) = response["rows"]
    assert row["cells"][:5] == ["tbl", "Admitted", "n1,n2", "3/2", "Quorum"]


def test_kubectl_get_cc_and_cn_use_short_names(
    kubectl: Kubectl, custom: client.CustomObjectsApi, namespace: str
) -> None:
    create_claim(custom, namespace, claim("short", cGeo=0.2))
    out = kubectl("get", "cc", "-n", namespace).stdout
    header = out.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "NODES", "VOTES", "REASON", "AGE"]
    assert out.splitlines()[1].startswith("short")
    nodes = kubectl("get", "cn").stdout + kubectl("get", "cn", check=False).stderr
    assert "NAME" in nodes.splitlines()[0] or "No resources found" in nodes
    categories = kubectl("get", "capacity", "-n", namespace).stdout
    assert "capacityclaim.capacity.platform.dev/short" in categories


def test_capacity_node_is_cluster_scoped_with_columns(
    api: client.ApiClient, custom: client.CustomObjectsApi, crds: list[str]
) -> None:
    name = "it-node-columns"
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CapacityNode",
        "metadata": {"name": name},
        "spec": {
            "nodeName": name,
            "substrates": ["host"],
            "geometry": {"host": {"units": 8}},
            "capacity": {"cpu": "8", "memory": "32Gi"},
        },
    }
    try:
        custom.create_cluster_custom_object(GROUP, VERSION, "capacitynodes", body)
        custom.patch_cluster_custom_object_status(
            GROUP,
            VERSION,
            "capacitynodes",
            name,
            {
                "status": {
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "True",
                            "reason": "Measuring",
                            "lastTransitionTime": "2026-01-01T00:00:00Z",
                        },
                        {
                            "type": "Stale",
                            "status": "False",
                            "reason": "Fresh",
                            "lastTransitionTime": "2026-01-01T00:00:00Z",
                        },
                    ],
                    "readings": {
                        "host": {
                            "load": {"mean": 0.2, "p95": 0.4, "max": 0.5},
                            "signals": {
                                "cpu": {"mean": 0.2, "p95": 0.4, "max": 0.5},
                                "memory": {"mean": 0.3, "p95": 0.3, "max": 0.3},
                            },
                            "observedAt": "2026-01-01T00:00:00Z",
                            "samples": 64,
                        }
                    },
                    "gates": {
                        "host": {
                            "headroom": 0.6,
                            "gluingDelta": 0.01,
                            "lambda1": 0.2,
                            "lambdaInt": 0.3,
                            "entropy": 0.8,
                        }
                    },
                }
            },
        )
        response = api.call_api(
            f"/apis/{GROUP}/{VERSION}/capacitynodes/{name}",
            "GET",
            header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
            response_type="object",
            _return_http_data_only=True,
        )
        columns = [c["name"] for c in response["columnDefinitions"]]
        assert columns == [
            "Name", "Ready", "Stale", "Fenced", "CPU", "Mem", "GPU", "Headroom", "Age"
        ]  # fmt: skip
        wide = {c["name"] for c in response["columnDefinitions"] if c.get("priority")}
        assert wide == {"Fenced"}  # kubectl shows it with -o wide only
        cells = dict(zip(columns, response["rows"][0]["cells"], strict=True))
        assert [cells[c] for c in ("Name", "Ready", "Stale", "CPU", "Mem")] == [
            name, "True", "False", 0.4, 0.3
        ]  # fmt: skip
        assert cells["Fenced"] in (None, "")  # the operator never fenced it
        assert cells["Headroom"] == 0.6
        # a reading outside [0,1] is refused
        with pytest.raises(ApiException) as info:
            custom.patch_cluster_custom_object_status(
                GROUP,
                VERSION,
                "capacitynodes",
                name,
                {
                    "status": {
                        "gates": {
                            "host": {
                                "headroom": 1.5,
                                "gluingDelta": 0,
                                "lambda1": 0,
                                "lambdaInt": 0,
                                "entropy": 0,
                            }
                        }
                    }
                },
            )
        assert info.value.status == 422
        assert "status.gates.host.headroom" in info.value.body
    finally:
        custom.delete_cluster_custom_object(GROUP, VERSION, "capacitynodes", name)
