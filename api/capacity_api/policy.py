"""Node restriction for agents, as Kubernetes' NodeRestriction admission does for kubelets.

A ``ValidatingAdmissionPolicy`` (CEL, evaluated by the API server) lets a request of an agent's
ServiceAccount:

- create or change only the ``CapacityNode`` named after the node its pod runs on, the node
  name the API server put into the pod-bound token
  (``authentication.kubernetes.io/node-name`` in the user's extra), and never its
  ``status.allocated`` (the operator's ledger);
- create or change only the ``CapacityBallot`` named after that node whose ``spec.nodeName``
  is that node too: its votes, keyed by claim uid, go there and nowhere else (another node's
  ballot, or a ballot naming one node and voting for another, is refused);
- never write a ``CapacityClaim``, neither the object nor its status: phase, proposal, votes
  and placements are the operator's (it copies the counted votes from the ballots into the
  claim at commit).

A token without a node name (not bound to a pod on a node) is refused outright. The simulated
agents of a test cluster (the chart's ``simulator``) get the same rules with "named after my
node" replaced by "named with the simulator's prefix".

The resource names come from the models. :mod:`capacity_api.crdgen` writes the result as a Helm
template (the usernames and the prefix are template expressions) and a test checks it is up to
date.
"""

from __future__ import annotations

from typing import Any

from capacity_api import GROUP
from capacity_api.models import CapacityBallot, CapacityClaim, CapacityNode

NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
"""The user-info extra key in which a pod-bound ServiceAccount token carries its node."""

RULE_NODE_NAME = "agent-token-bound-to-node"
RULE_OWN_NODE = "agent-writes-own-capacitynode"
RULE_NO_ALLOCATION = "agent-never-writes-allocated"
RULE_OWN_BALLOT = "agent-writes-own-ballot"
RULE_NO_CLAIMS = "agent-never-writes-claims"
RULES = (RULE_NODE_NAME, RULE_OWN_NODE, RULE_NO_ALLOCATION, RULE_OWN_BALLOT, RULE_NO_CLAIMS)
"""Every refusal message starts with ``node restriction (<rule>):``."""

# Helm template expressions the chart fills in (see charts/capacity-platform/templates/_helpers.tpl)
AGENT_USER = '{{ include "capacity-platform.serviceAccountUser" (list . "agent") }}'
SIMULATOR_USER = '{{ include "capacity-platform.serviceAccountUser" (list . "simulator") }}'
SIMULATOR_PREFIX = "{{ .Values.simulator.nodeNamePrefix }}"


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
    allocated_kept = (
        "(!has(object.status) || !has(object.status.allocated)) ? "
        "(oldObject == null || !has(oldObject.status) || !has(oldObject.status.allocated)) : "
        "(oldObject != null && has(oldObject.status) && has(oldObject.status.allocated) && "
        "object.status.allocated == oldObject.status.allocated)"
    )
    # a write of the status subresource carries the whole object, its spec included
    ballot_node = "(has(object.spec) && has(object.spec.nodeName) ? object.spec.nodeName : '')"
    ballot_own = f"{may_write('request.name')} && {ballot_node} == request.name"
    nodes = f"request.resource.resource != '{CapacityNode.plural}'"
    ballots = f"request.resource.resource != '{CapacityBallot.plural}'"
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
            "expression": f"{ballots} || ({ballot_own})",
            "messageExpression": _says(
                RULE_OWN_BALLOT,
                who,
                _text(" may write only the CapacityBallot of its own node ("),
                own,
                _text("), with spec.nodeName equal to its name; not "),
                "request.name",
                _text(" with spec.nodeName "),
                f"({ballot_node} == '' ? '(none)' : {ballot_node})",
            ),
            "reason": "Forbidden",
        },
        {
            "expression": claims,
            "messageExpression": _says(
                RULE_NO_CLAIMS,
                who,
                _text(" may not write capacity claim "),
                "request.namespace + '/' + request.name",
                _text(
                    ": claims (their status too) are written by the operator only; an agent "
                    "votes in the CapacityBallot of its node"
                ),
            ),
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
                            CapacityBallot.plural,
                            f"{CapacityBallot.plural}/status",
                        ],
                    },
                    {
                        # claims: not even a delete
                        "apiGroups": [GROUP],
                        "apiVersions": ["*"],
                        "operations": ["CREATE", "UPDATE", "DELETE"],
                        "resources": [CapacityClaim.plural, f"{CapacityClaim.plural}/status"],
                    },
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
