"""Quantities and the wire form of the models."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from capacity_api.models import CapacityClaim, CapacityClaimSpec, Phase
from capacity_api.quantity import QuantityError, parse_quantity

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500m", Decimal("0.5")),
        ("2", Decimal(2)),
        (2, Decimal(2)),
        ("1Ki", Decimal(1024)),
        ("4Gi", Decimal(4 * 2**30)),
        ("1.5G", Decimal("1.5e9")),
        ("1e3", Decimal(1000)),
        ("2E-2", Decimal("0.02")),
        (".5", Decimal("0.5")),
        ("+3", Decimal(3)),
        ("100n", Decimal("1e-7")),
    ],
)
def test_parse_quantity(text: str | int, expected: Decimal) -> None:
    assert parse_quantity(text) == expected


@pytest.mark.parametrize("bad", ["-1", "two", "1.5Xi", "", "1 Gi", "Gi", "--1", -3, True])
def test_parse_quantity_refuses(bad: str | int) -> None:
    with pytest.raises(QuantityError):
        parse_quantity(bad)


def test_model_refuses_what_the_schema_refuses() -> None:
    with pytest.raises(ValidationError, match="cGeo"):
        CapacityClaimSpec.model_validate({"cGeo": 1.5})
    with pytest.raises(ValidationError, match="cpu"):
        CapacityClaimSpec.model_validate({"resources": {"cpu": "-1"}})
    with pytest.raises(ValidationError, match="replicas"):
        CapacityClaimSpec.model_validate({"cGeo": 0.1, "replicas": 0})


def test_wire_round_trip_uses_camel_case_aliases() -> None:
    claim = CapacityClaim.model_validate(
        {
            "metadata": {"name": "x", "namespace": "ns"},
            "spec": {"resources": {"nvidia.com/gpu": 1, "db-connections": "10"}, "replicas": 2},
            "status": {"phase": "Admitted", "voteCount": "2/2", "observedGeneration": 1},
        }
    )
    assert claim.spec.resources is not None
    assert claim.spec.resources.nvidia_gpu == 1
    assert claim.status is not None
    assert claim.status.phase is Phase.ADMITTED
    wire = claim.wire()
    assert wire["kind"] == "CapacityClaim"
    assert wire["spec"]["resources"] == {"nvidia.com/gpu": 1, "db-connections": "10"}
    assert wire["status"]["voteCount"] == "2/2"
    assert "vote_count" not in wire["status"]


def test_examples_are_valid_claims() -> None:
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert files, "examples/ has claims for the run command"
    seen = 0
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "CapacityClaim":
                CapacityClaim.model_validate(doc)
                seen += 1
    assert seen >= 3
