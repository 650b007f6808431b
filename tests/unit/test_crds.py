"""crds/ is exactly what the models generate, and the generated schema is structural."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from capacity_api import crdgen
from capacity_api.models import CapacityBallot, CapacityClaim, CapacityNode, Resource

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "crds"


def test_committed_crds_match_the_models() -> None:
    for name, text in crdgen.render().items():
        path = CRD_DIR / name
        assert path.exists(), f"{path} is missing: run `make crds`"
        assert path.read_text() == text, f"{path} is out of date: run `make crds`"


def test_check_mode_fails_on_drift_and_regeneration_is_idempotent(tmp_path: Path) -> None:
    assert crdgen.main([str(tmp_path)]) == 0
    assert crdgen.main(["--check", str(tmp_path)]) == 0
    first = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert crdgen.main([str(tmp_path)]) == 0
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == first
    victim = tmp_path / "capacity.platform.dev_capacityclaims.yaml"
    victim.write_text(victim.read_text().replace("minimum: 1", "minimum: 2"))
    assert crdgen.main(["--check", str(tmp_path)]) == 1


def test_a_model_change_shows_up_in_the_generated_crd(monkeypatch: pytest.MonkeyPatch) -> None:
    before = crdgen.render()
    monkeypatch.setitem(
        crdgen.PRINTER_COLUMNS,
        "CapacityClaim",
        [
            *crdgen.PRINTER_COLUMNS["CapacityClaim"],
            {"name": "X", "type": "string", "jsonPath": ".x"},
        ],
    )
    after = crdgen.render()
    assert after != before


def _walk(node: Any, path: str) -> list[str]:
    """Paths of schema nodes that break the structural-schema rules we rely on."""
    problems: list[str] = []
    if not isinstance(node, dict):
        return problems
    if "$ref" in node or "title" in node:
        problems.append(f"{path}: $ref/title left in")
    if "type" not in node and not node.get("x-kubernetes-int-or-string"):
        problems.append(f"{path}: no type")
    problems.extend(
        f"{path}: anyOf outside int-or-string"
        for branch in node.get("anyOf", [])
        if set(branch) - {"type"} or not node.get("x-kubernetes-int-or-string")
    )
    for key, sub in node.get("properties", {}).items():
        problems += _walk(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        problems += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        problems += _walk(node["additionalProperties"], f"{path}{{}}")
    return problems


@pytest.mark.parametrize("model", crdgen.MODELS, ids=lambda m: m.kind)
def test_schema_is_structural_and_typed(model: type[Resource]) -> None:
    schema = crdgen.object_schema(model)
    problems = [p for p in _walk(schema, "") if not p.startswith(".metadata")]
    assert problems == []
    text = yaml.safe_dump(schema)
    # every field is typed: nothing is preserved unknown except free-form maps we declare
    assert "x-kubernetes-preserve-unknown-fields" not in text


def test_claim_schema_carries_ranges_enums_and_cel_rules() -> None:
    spec = crdgen.object_schema(CapacityClaim)["properties"]["spec"]
    props = spec["properties"]
    assert (props["cGeo"]["minimum"], props["cGeo"]["maximum"]) == (0.0, 1.0)
    assert props["replicas"]["minimum"] == 1
    assert props["replicas"]["default"] == 1
    assert set(props["substrate"]["enum"]) == {
        "host",
        "gpu",
        "storage",
        "network",
        "database",
        "auto",
    }
    assert props["resources"]["properties"]["cpu"]["x-kubernetes-int-or-string"] is True
    rules = [r["rule"] for r in spec["x-kubernetes-validations"]]
    assert any("has(self.resources)" in r for r in rules)
    assert any("self.witnesses" in r for r in rules)
    status = crdgen.object_schema(CapacityClaim)["properties"]["status"]["properties"]
    assert set(status["phase"]["enum"]) == {
        "Pending",
        "Voting",
        "Admitted",
        "Rejected",
        "Recovering",
        "Failed",
        "Released",
    }
    assert status["conditions"]["x-kubernetes-list-type"] == "map"
    assert "descriptions" not in spec
    assert spec["properties"]["cGeo"]["description"].startswith("Geometric share")


def test_single_writer_status_fields_are_atomic_and_shared_ones_are_not() -> None:
    """Fields one writer replaces whole are tracked as one field in managedFields (cheaper
    writes); conditions, which the agent and the operator both write, stay keyed by type."""

    def status_of(model: type[Resource]) -> dict[str, Any]:
        props: dict[str, Any] = crdgen.object_schema(model)["properties"]["status"]["properties"]
        return props

    claim = status_of(CapacityClaim)
    for name in ("proposal", "votes", "refusals", "truth"):
        assert claim[name]["x-kubernetes-map-type"] == "atomic", name
    for name in ("placements", "recoveries"):
        assert claim[name]["x-kubernetes-list-type"] == "atomic", name
    assert status_of(CapacityBallot)["votes"]["x-kubernetes-map-type"] == "atomic"
    node = status_of(CapacityNode)
    for name in ("readings", "gates", "allocated"):
        assert node[name]["x-kubernetes-map-type"] == "atomic", name
    assert node["conditions"]["x-kubernetes-list-type"] == "map"
    assert "x-kubernetes-map-type" not in node["witness"]  # the witness's own field manager


def test_crd_metadata() -> None:
    claim = crdgen.crd(CapacityClaim)
    node = crdgen.crd(CapacityNode)
    assert claim["spec"]["scope"] == "Namespaced"
    assert node["spec"]["scope"] == "Cluster"
    assert claim["spec"]["names"]["shortNames"] == ["cc"]
    assert node["spec"]["names"]["shortNames"] == ["cn"]
    for body in (claim, node):
        version = body["spec"]["versions"][0]
        assert version["subresources"] == {"status": {}}
        assert body["spec"]["names"]["categories"] == ["capacity"]
    # the fields an agent's claims watches select on, each a scalar in the schema
    selectable = [f["jsonPath"] for f in claim["spec"]["versions"][0]["selectableFields"]]
    assert selectable == [
        ".status.proposal.asked.first",
        ".status.proposal.asked.second",
        ".status.proposal.asked.third",
        ".status.proposal.asked.more",
    ]
    proposal = claim["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"][
        "properties"
    ]["proposal"]
    types = {k: v["type"] for k, v in proposal["properties"]["asked"]["properties"].items()}
    assert types == {"first": "string", "second": "string", "third": "string", "more": "boolean"}
    assert "selectableFields" not in node["spec"]["versions"][0]
