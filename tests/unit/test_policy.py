"""The node-restriction policy is generated from the models: a new status field is covered."""

from __future__ import annotations

from capacity_api import policy
from capacity_api.models import CapacityClaimStatus


def _validations() -> list[dict[str, str]]:
    spec = policy.node_restriction_policy("p")["spec"]
    return list(spec["validations"])


def test_every_claim_status_field_but_votes_must_stay_unchanged() -> None:
    (rule,) = [v for v in _validations() if policy.RULE_CLAIM_STATUS in v.get("message", "")]
    for name, info in CapacityClaimStatus.model_fields.items():
        field = info.alias or name
        guarded = f"object.status.{field} == oldObject.status.{field}" in rule["expression"]
        assert guarded is (name != "votes"), field


def test_every_refusal_names_its_rule() -> None:
    said = [v.get("message") or v["messageExpression"] for v in _validations()]
    for rule in policy.RULES:
        assert sum(f"node restriction ({rule})" in text for text in said) == 1, rule


def test_only_the_agent_accounts_are_matched() -> None:
    (condition,) = policy.node_restriction_policy("p")["spec"]["matchConditions"]
    assert policy.AGENT_USER in condition["expression"]
    assert policy.SIMULATOR_USER in condition["expression"]
