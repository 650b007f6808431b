"""Node restriction for agents, as Kubernetes' NodeRestriction admission does for kubelets.

A ``ValidatingAdmissionPolicy`` (CEL, evaluated by the API server) lets a request of an agent's
ServiceAccount:

- create or change only the ``CapacityNode`` named after the node its pod runs on, the node
  name the API server put into the pod-bound token
  (``authentication.kubernetes.io/node-name`` in the user's extra), and never its
  ``status.allocated`` (the operator's ledger);
- change only its own entry of a claim's ``status.votes``, nothing else of the claim's status
  (phase, proposal, placements: the operator's).

A token without a node name (not bound to a pod on a node) is refused outright. The simulated
agents of a test cluster (the chart's ``simulator``) get the same rules with "named after my
node" replaced by "named with the simulator's prefix".

The CEL is generated here from the models, so that a status field added to a model is covered
without anyone remembering the policy: every field of :class:`CapacityClaimStatus` but
``votes`` must stay as it was. :mod:`capacity_api.crdgen` writes the result as a Helm template
(the usernames and the prefix are template expressions) and a test checks it is up to date.
"""

from __future__ import annotations

from typing import Any

from capacity_api import GROUP
from capacity_api.models import CapacityClaim, CapacityClaimStatus, CapacityNode

NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
"""The user-info extra key in which a pod-bound ServiceAccount token carries its node."""

RULE_NODE_NAME = "agent-token-bound-to-node"
RULE_OWN_NODE = "agent-writes-own-capacitynode"
RULE_NO_ALLOCATION = "agent-never-writes-allocated"
RULE_OWN_VOTE = "agent-writes-own-vote"
RULE_CLAIM_STATUS = "agent-writes-only-votes"
RULES = (RULE_NODE_NAME, RULE_OWN_NODE, RULE_NO_ALLOCATION, RULE_OWN_VOTE, RULE_CLAIM_STATUS)
"""Every refusal message starts with ``node restriction (<rule>):``."""

# Helm template expressions the chart fills in (see charts/capacity-platform/templates/_helpers.tpl)
AGENT_USER = '{{ include "capacity-platform.serviceAccountUser" (list . "agent") }}'
SIMULATOR_USER = '{{ include "capacity-platform.serviceAccountUser" (list . "simulator") }}'
SIMULATOR_PREFIX = "{{ .Values.simulator.nodeNamePrefix }}"


def _field_unchanged(field: str) -> str:
    new, old = f"object.status.{field}", f"oldObject.status.{field}"
    return f"(has({new}) == has({old}) && (!has({new}) || {new} == {old}))"


def _claim_fields_but_votes() -> list[str]:
    fields = CapacityClaimStatus.model_fields
    return [info.alias or name for name, info in fields.items() if name != "votes"]


def _says(rule: str, *parts: str) -> str:
    """A CEL messageExpression: ``'node restriction (<rule>): ' + parts...``."""
    return " + ".join([f"'node restriction ({rule}): '", *parts])


def _text(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def node_restriction_policy(name: str) -> dict[str, Any]:
    """The ValidatingAdmissionPolicy (its name, e.g. with the release prefix, is ``name``)."""

    def may_write(key: str) -> str:
        return (
            f"(variables.isAgent ? {key} == variables.nodeName"
            f" : {key}.startsWith('{SIMULATOR_PREFIX}'))"
        )

    own = f"(variables.isAgent ? variables.nodeName : '{SIMULATOR_PREFIX}*')"
    who = "'agent ' + request.userInfo.username"
    votes_old_kept = (
        "!has(oldObject.status) || !has(oldObject.status.votes) || "
        f"oldObject.status.votes.all(k, {may_write('k')} || "
        "(has(object.status) && has(object.status.votes) && k in object.status.votes && "
        "object.status.votes[k] == oldObject.status.votes[k]))"
    )
    votes_none_added = (
        "!has(object.status) || !has(object.status.votes) || "
        f"object.status.votes.all(k, {may_write('k')} || "
        "(has(oldObject.status) && has(oldObject.status.votes) && k in oldObject.status.votes))"
    )
    unchanged = " && ".join(_field_unchanged(f) for f in _claim_fields_but_votes())
    status_kept = (
        "(!has(object.status) && !has(oldObject.status)) || "
        f"(has(object.status) && has(oldObject.status) && {unchanged})"
    )
    allocated_kept = (
        "(!has(object.status) || !has(object.status.allocated)) ? "
        "(oldObject == null || !has(oldObject.status) || !has(oldObject.status.allocated)) : "
        "(oldObject != null && has(oldObject.status) && has(oldObject.status.allocated) && "
        "object.status.allocated == oldObject.status.allocated)"
    )
    nodes = f"request.resource.resource != '{CapacityNode.plural}'"
    claims = f"request.resource.resource != '{CapacityClaim.plural}'"
    validations = [
        {
            "expression": "!variables.isAgent || variables.nodeName != ''",
            "messageExpression": _says(
                RULE_NODE_NAME,
                who,
                _text(
                    " has a token without a node name: use a token bound to the agent's pod "
                    "(a projected ServiceAccount token)"
                ),
            ),
            "reason": "Forbidden",
        },
        {
            "expression": f"{nodes} || {may_write('request.name')}",
            "messageExpression": _says(
                RULE_OWN_NODE,
                who,
                _text(" may write only the CapacityNode of its own node ("),
                own,
                _text("), not "),
                "request.name",
            ),
            "reason": "Forbidden",
        },
        {
            "expression": f"{nodes} || ({allocated_kept})",
            "message": f"node restriction ({RULE_NO_ALLOCATION}): "
            "status.allocated is written by the operator only",
            "reason": "Forbidden",
        },
        {
            "expression": f"{claims} || "
            f"(oldObject != null && ({votes_old_kept}) && ({votes_none_added}))",
            "messageExpression": _says(
                RULE_OWN_VOTE,
                who,
                _text(" may change only its own node's entry in status.votes ("),
                own,
                _text(") of capacity claim "),
                "request.namespace + '/' + request.name",
            ),
            "reason": "Forbidden",
        },
        {
            "expression": f"{claims} || (oldObject != null && ({status_kept}))",
            "message": f"node restriction ({RULE_CLAIM_STATUS}): an agent may change only "
            "status.votes of a claim; phase, proposal, placements and the rest of its status "
            "are written by the operator only",
            "reason": "Forbidden",
        },
    ]
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [GROUP],
                        "apiVersions": ["*"],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": [
                            CapacityNode.plural,
                            f"{CapacityNode.plural}/status",
                            CapacityClaim.plural,
                            f"{CapacityClaim.plural}/status",
                        ],
                    }
                ]
            },
            "matchConditions": [
                {
                    "name": "agents-only",
                    "expression": f"request.userInfo.username == '{AGENT_USER}' || "
                    f"request.userInfo.username == '{SIMULATOR_USER}'",
                }
            ],
            "variables": [
                {
                    "name": "isAgent",
                    "expression": f"request.userInfo.username == '{AGENT_USER}'",
                },
                {
                    "name": "nodeName",
                    "expression": f"'{NODE_NAME_EXTRA}' in request.userInfo.extra && "
                    f"size(request.userInfo.extra['{NODE_NAME_EXTRA}']) > 0 ? "
                    f"request.userInfo.extra['{NODE_NAME_EXTRA}'][0] : ''",
                },
            ],
            "validations": validations,
        },
    }
