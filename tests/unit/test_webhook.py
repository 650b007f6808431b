"""The pod webhook's pure decisions: the affinity patch, refusals and their messages, reviews."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import jsonpatch
import pytest

from capacity_api.webhook import (
    CLAIM_LABEL,
    Decision,
    Hook,
    MalformedReviewError,
    bound_to,
    claim_to_read,
    decide,
    parse_review,
    parse_review_body,
    review_response,
)

NS = "shop"
HOST = "kubernetes.io/hostname"


def claim(
    phase: str | None = "Admitted",
    nodes: tuple[str, ...] = ("kwok-node-0",),
    reason: str | None = "QuorumReached",
    **meta: Any,
) -> dict[str, Any]:
    status: dict[str, Any] = {}
    if phase:
        status["phase"] = phase
    if reason:
        status["reason"] = reason
    if nodes:
        status["placements"] = [
            {"node": n, "substrate": "host", "share": 0.25, "epoch": 1} for n in nodes
        ]
    return {"metadata": {"name": "web", "namespace": NS, **meta}, "status": status}


def pod(label: str | None = "web", affinity: Any = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "web-", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "c", "image": "capacity.local/not-pulled:1"}], **spec},
    }
    if label is not None:
        body["metadata"]["labels"][CLAIM_LABEL] = label
    if affinity is not None:
        body["spec"]["affinity"] = affinity
    return body


def review(obj: dict[str, Any], operation: str = "CREATE", kind: str = "Pod") -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": NS,
            "operation": operation,
            "object": obj,
        },
    }


def judge(hook: Hook, body: dict[str, Any], live: dict[str, Any] | None) -> Decision:
    return decide(hook, parse_review(review(body)), live)


def required(*terms: dict[str, Any]) -> dict[str, Any]:
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": list(terms)}
        }
    }


def expr(key: str, *values: str, operator: str = "In") -> dict[str, Any]:
    return {"key": key, "operator": operator, "values": list(values)}


def patched(body: dict[str, Any], decision: Decision) -> dict[str, Any]:
    """The pod as the API server stores it after applying the decision's patch."""
    return apply_patch(body, list(decision.patch))


def apply_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902, as the API server applies it (kopf's jsonpatch)."""
    out: dict[str, Any] = jsonpatch.apply_patch(copy.deepcopy(doc), ops)
    return out


def terms_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    node_affinity = body["spec"]["affinity"]["nodeAffinity"]
    terms: list[dict[str, Any]] = node_affinity["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    return terms


# -- mutation -----------------------------------------------------------------------------------

ONE = ("kwok-node-0",)
THREE = ("kwok-node-0", "kwok-node-1", "kwok-node-2")


@pytest.mark.parametrize(
    ("case", "affinity", "nodes", "expected_terms"),
    [
        ("no affinity, one placement", None, ONE, [{"matchExpressions": [expr(HOST, *ONE)]}]),
        (
            "no affinity, three placements",
            None,
            THREE,
            [{"matchExpressions": [expr(HOST, *THREE)]}],
        ),
        (
            "pod affinity only",
            {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
            ONE,
            [{"matchExpressions": [expr(HOST, *ONE)]}],
        ),
        (
            "only preferred node affinity",
            {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
            ONE,
            [{"matchExpressions": [expr(HOST, *ONE)]}],
        ),
        (
            "existing required terms: added to each, since terms are ORed",
            required(
                {"matchExpressions": [expr("type", "kwok")]},
                {"matchExpressions": [expr("zone", "a", "b")]},
            ),
            THREE,
            [
                {"matchExpressions": [expr("type", "kwok"), expr(HOST, *THREE)]},
                {"matchExpressions": [expr("zone", "a", "b"), expr(HOST, *THREE)]},
            ],
        ),
        (
            "a term with matchFields only (DaemonSet pods) gets matchExpressions",
            required({"matchFields": [expr("metadata.name", "kwok-node-1")]}),
            ONE,
            [
                {
                    "matchFields": [expr("metadata.name", "kwok-node-1")],
                    "matchExpressions": [expr(HOST, *ONE)],
                }
            ],
        ),
        (
            "the exact requirement already there (any order): no duplicate",
            required(
                {"matchExpressions": [expr(HOST, "kwok-node-2", "kwok-node-0", "kwok-node-1")]}
            ),
            THREE,
            [{"matchExpressions": [expr(HOST, "kwok-node-2", "kwok-node-0", "kwok-node-1")]}],
        ),
        (
            "a hostname requirement with other nodes is ANDed, not replaced",
            required({"matchExpressions": [expr(HOST, "elsewhere")]}),
            ONE,
            [{"matchExpressions": [expr(HOST, "elsewhere"), expr(HOST, *ONE)]}],
        ),
        (
            "empty list of terms",
            required(),
            ONE,
            [{"matchExpressions": [expr(HOST, *ONE)]}],
        ),
    ],
)
def test_mutation_requires_the_placement_nodes_in_every_term(
    case: str, affinity: Any, nodes: tuple[str, ...], expected_terms: list[dict[str, Any]]
) -> None:
    body = pod(affinity=affinity)
    decision = judge(Hook.MUTATE, body, claim(nodes=nodes))
    assert decision.allowed, case
    out = patched(body, decision)
    assert terms_of(out) == expected_terms, case
    # the rest of the pod is untouched, and the result passes validation
    assert out["metadata"] == body["metadata"]
    assert out["spec"]["containers"] == body["spec"]["containers"]
    assert judge(Hook.VALIDATE, out, claim(nodes=nodes)).allowed, case
    # mutating the mutated pod again changes nothing (reinvocation is harmless)
    assert judge(Hook.MUTATE, out, claim(nodes=nodes)).patch == (), case


def test_mutation_keeps_other_affinity_and_selectors() -> None:
    affinity: dict[str, Any] = {
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": HOST}]
        },
        "nodeAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 1, "preference": {"matchExpressions": [expr("disk", "ssd")]}}
            ]
        },
    }
    body = pod(affinity=affinity, nodeSelector={"type": "kwok"})
    out = patched(body, judge(Hook.MUTATE, body, claim(nodes=THREE)))
    assert out["spec"]["nodeSelector"] == {"type": "kwok"}
    assert out["spec"]["affinity"]["podAntiAffinity"] == affinity["podAntiAffinity"]
    node_affinity = out["spec"]["affinity"]["nodeAffinity"]
    assert node_affinity["preferredDuringSchedulingIgnoredDuringExecution"] == [
        {"weight": 1, "preference": {"matchExpressions": [expr("disk", "ssd")]}}
    ]
    assert terms_of(out) == [{"matchExpressions": [expr(HOST, *THREE)]}]


def test_an_empty_term_matches_no_node_and_stays_so() -> None:
    body = pod(affinity=required({}, {"matchExpressions": [expr("type", "kwok")]}))
    out = patched(body, judge(Hook.MUTATE, body, claim()))
    assert terms_of(out) == [{}, {"matchExpressions": [expr("type", "kwok"), expr(HOST, *ONE)]}]


def test_repeated_placements_are_named_once() -> None:
    body = pod()
    decision = judge(Hook.MUTATE, body, claim(nodes=("a", "b", "a")))
    assert terms_of(patched(body, decision)) == [{"matchExpressions": [expr(HOST, "a", "b")]}]


@pytest.mark.parametrize(
    ("case", "label", "live"),
    [
        ("claim missing", "web", None),
        ("claim Voting", "web", claim("Voting", nodes=(), reason="Proposed")),
        ("claim Rejected", "web", claim("Rejected", nodes=(), reason="ExceedsNodeCapacity")),
        ("empty label", "", None),
        ("invalid label", "Web_1", None),
    ],
)
def test_mutation_never_refuses_and_leaves_unusable_claims_to_validation(
    case: str, label: str, live: dict[str, Any] | None
) -> None:
    decision = judge(Hook.MUTATE, pod(label=label), live)
    assert decision.allowed, case
    assert decision.patch == (), case
    assert not judge(Hook.VALIDATE, pod(label=label), live).allowed, case


# -- validation ---------------------------------------------------------------------------------

BOUND_ONE = required({"matchExpressions": [expr(HOST, *ONE)]})


@pytest.mark.parametrize(
    ("case", "label", "live", "message"),
    [
        ("missing", "web", None, 'capacity claim "web" not found in namespace "shop"'),
        (
            "Rejected",
            "web",
            claim("Rejected", nodes=(), reason="ExceedsNodeCapacity"),
            'capacity claim "web" in namespace "shop" is Rejected (ExceedsNodeCapacity): '
            "pods may bind only to an Admitted claim",
        ),
        (
            "Voting",
            "web",
            claim("Voting", nodes=(), reason="Proposed"),
            'capacity claim "web" in namespace "shop" is Voting (Proposed): '
            "pods may bind only to an Admitted claim",
        ),
        (
            "Pending without reason",
            "web",
            claim("Pending", nodes=(), reason=None),
            'capacity claim "web" in namespace "shop" is Pending: '
            "pods may bind only to an Admitted claim",
        ),
        (
            "not looked at yet",
            "web",
            claim(None, nodes=(), reason=None),
            'capacity claim "web" in namespace "shop" has no phase yet: '
            "pods may bind only to an Admitted claim",
        ),
        (
            "Recovering: its placements are moving, so no new pod binds to them",
            "web",
            claim("Recovering", nodes=ONE, reason="NodeLost"),
            'capacity claim "web" in namespace "shop" is Recovering (NodeLost): '
            "pods may bind only to an Admitted claim",
        ),
        (
            "Failed",
            "web",
            claim("Failed", nodes=(), reason="RecoveriesExhausted"),
            'capacity claim "web" in namespace "shop" is Failed (RecoveriesExhausted): '
            "pods may bind only to an Admitted claim",
        ),
        (
            "Admitted but being deleted",
            "web",
            claim(deletionTimestamp="2026-01-01T00:00:00Z"),
            'capacity claim "web" in namespace "shop" is being deleted: '
            "pods may bind only to an Admitted claim",
        ),
        (
            "Admitted without placements",
            "web",
            claim(nodes=()),
            'capacity claim "web" in namespace "shop" is Admitted but has no placements: '
            "pods may bind only to an Admitted claim",
        ),
        (
            "empty label",
            "",
            None,
            f'label {CLAIM_LABEL} is empty: it must name a CapacityClaim in namespace "shop"',
        ),
        (
            "invalid label",
            "Web_1",
            None,
            f'label {CLAIM_LABEL}="Web_1" is not a CapacityClaim name (lowercase letters, digits, '
            "'-' and '.', starting and ending with a letter or digit)",
        ),
    ],
)
def test_validation_refuses_with_the_claim_phase_and_reason(
    case: str, label: str, live: dict[str, Any] | None, message: str
) -> None:
    decision = judge(Hook.VALIDATE, pod(label=label, affinity=BOUND_ONE), live)
    assert not decision.allowed, case
    assert decision.message == message, case
    response = review_response("uid-1", decision)["response"]
    assert response == {
        "uid": "uid-1",
        "allowed": False,
        "status": {"code": 403, "reason": "Forbidden", "message": message},
    }


@pytest.mark.parametrize(
    ("case", "affinity", "spec", "allowed"),
    [
        ("bound by the mutation", BOUND_ONE, {}, True),
        (
            "bound by a subset in matchFields",
            required({"matchFields": [expr("metadata.name", *ONE)]}),
            {},
            True,
        ),
        ("no affinity (the mutation was bypassed)", None, {}, False),
        (
            "one term of two is not bound (terms are ORed)",
            required(
                {"matchExpressions": [expr(HOST, *ONE)]},
                {"matchExpressions": [expr("type", "kwok")]},
            ),
            {},
            False,
        ),
        (
            "bound to other nodes too",
            required({"matchExpressions": [expr(HOST, "kwok-node-0", "x")]}),
            {},
            False,
        ),
        (
            "NotIn does not bind",
            required({"matchExpressions": [expr(HOST, "x", operator="NotIn")]}),
            {},
            False,
        ),
        ("spec.nodeName on a placement node", BOUND_ONE, {"nodeName": "kwok-node-0"}, True),
        ("spec.nodeName elsewhere", BOUND_ONE, {"nodeName": "kwok-node-2"}, False),
    ],
)
def test_validation_allows_only_pods_bound_to_the_placement_nodes(
    case: str, affinity: Any, spec: dict[str, Any], allowed: bool
) -> None:
    decision = judge(Hook.VALIDATE, pod(affinity=affinity, **spec), claim(nodes=ONE))
    assert decision.allowed is allowed, f"{case}: {decision.message}"
    if not allowed:
        assert '"web"' in decision.message
        assert "kwok-node-0" in decision.message


def test_admitted_with_three_placements_is_allowed_and_says_where() -> None:
    body = pod(affinity=required({"matchExpressions": [expr(HOST, *THREE)]}))
    decision = judge(Hook.VALIDATE, body, claim(nodes=THREE))
    assert decision == Decision(
        True, "admitted on kwok-node-0,kwok-node-1,kwok-node-2", claim="web"
    )
    assert bound_to(body, THREE)
    assert not bound_to(body, ONE)


@pytest.mark.parametrize(
    ("case", "body", "operation", "kind"),
    [
        ("no claim label", pod(label=None), "CREATE", "Pod"),
        ("an update (affinity cannot change after creation)", pod(), "UPDATE", "Pod"),
        ("not a pod", {"metadata": {"name": "x"}}, "CREATE", "Deployment"),
    ],
)
def test_what_is_not_judged_is_allowed_without_reading_a_claim(
    case: str, body: dict[str, Any], operation: str, kind: str
) -> None:
    request = parse_review(review(body, operation=operation, kind=kind))
    assert claim_to_read(request) is None, case
    for hook in Hook:
        decision = decide(hook, request, None)
        assert decision.allowed, case
        assert decision.patch == (), case


def test_only_a_valid_label_leads_to_a_claim_read() -> None:
    assert claim_to_read(parse_review(review(pod(label="web.v2")))) == "web.v2"
    assert claim_to_read(parse_review(review(pod(label="")))) is None
    assert claim_to_read(parse_review(review(pod(label="-web")))) is None


# -- the AdmissionReview ------------------------------------------------------------------------


def test_mutation_response_carries_the_uid_and_a_base64_json_patch() -> None:
    body = pod()
    request = parse_review(review(body))
    decision = decide(Hook.MUTATE, request, claim(nodes=THREE))
    out = review_response(request.uid, decision)
    assert out["apiVersion"] == "admission.k8s.io/v1"
    assert out["kind"] == "AdmissionReview"
    response = out["response"]
    assert response["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    assert terms_of(apply_patch(body, ops)) == [{"matchExpressions": [expr(HOST, *THREE)]}]
    assert "status" not in response


def test_an_allowed_review_without_changes_has_no_patch() -> None:
    response = review_response("u", Decision(True, "already requires kwok-node-0"))["response"]
    assert response == {"uid": "u", "allowed": True}


def test_the_namespace_comes_from_the_request_and_the_pod_name_from_generate_name() -> None:
    request = parse_review(review(pod()))
    assert request.namespace == NS
    assert request.pod == "shop/web-*"
    assert not request.dry_run


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"garbage", "body is not JSON"),
        (b"\xff\xfe\x00", "body is not JSON"),
        (b"[]", "body is not a JSON object"),
        (b'{"kind": "Pod"}', "kind is 'Pod', expected 'AdmissionReview'"),
        (
            b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1beta1"}',
            "only 'admission.k8s.io/v1' is served",
        ),
        (b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"}', "request is missing"),
        (
            b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {}}',
            "request.uid is missing",
        ),
        (
            b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", '
            b'"request": {"uid": "u", "operation": "CREATE"}}',
            "request.object is missing",
        ),
        (
            b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", '
            b'"request": {"uid": "u", "operation": "CREATE", "object": []}}',
            "request.object is missing or not an object",
        ),
    ],
)
def test_malformed_reviews_are_refused_with_what_is_wrong(raw: bytes, message: str) -> None:
    with pytest.raises(MalformedReviewError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_review_body(raw)


def test_a_pod_without_metadata_or_spec_does_not_crash_the_decisions() -> None:
    body = {"kind": "Pod"}
    request = parse_review(review(body))
    for hook in Hook:
        assert decide(hook, request, claim()).allowed
    labelled = {"metadata": {"labels": {CLAIM_LABEL: "web"}}}
    mutation = decide(Hook.MUTATE, parse_review(review(labelled)), claim())
    assert terms_of(apply_patch(labelled, list(mutation.patch))) == [
        {"matchExpressions": [expr(HOST, *ONE)]}
    ]
