"""Decisions of the pod admission webhook (DESIGN section 8), I/O-free.

A pod that carries the label ``capacity.platform.dev/claim: <name>`` consumes that CapacityClaim
of its own namespace. The *mutating* hook makes the pod require the claim's placement nodes: it
adds ``kubernetes.io/hostname In <placement nodes>`` to the pod's required node affinity, in
every ``nodeSelectorTerm`` (terms are ORed, so a requirement in only one of them would not bind
the pod). The *validating* hook refuses a pod whose claim is missing or not ``Admitted``, or
whose affinity does not (or no longer, after later mutations) restrict it to the placement nodes.

Everything here works on plain JSON (dicts, as the API server sends them); the server
(``capacity_operator.webhook``) parses the AdmissionReview with :func:`parse_review`, reads the
claim when :func:`claim_to_read` names one, calls :func:`decide` and answers with
:func:`review_response`.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from capacity_api import GROUP
from capacity_api.models import NAME_PATTERN, Phase

CLAIM_LABEL: Final = f"{GROUP}/claim"
"""The pod label naming the claim a pod consumes (the webhooks' objectSelector)."""
HOSTNAME_KEY: Final = "kubernetes.io/hostname"
"""The node label the affinity requirement is on; its value is the node's name."""
REVIEW_API_VERSION: Final = "admission.k8s.io/v1"
REQUIRED: Final = "requiredDuringSchedulingIgnoredDuringExecution"
AFFINITY_PATH: Final = "/spec/affinity"
NODE_AFFINITY_PATH: Final = f"{AFFINITY_PATH}/nodeAffinity"
REQUIRED_PATH: Final = f"{NODE_AFFINITY_PATH}/{REQUIRED}"
TERMS_PATH: Final = f"{REQUIRED_PATH}/nodeSelectorTerms"
BINDS_ONLY: Final = "pods may bind only to an Admitted claim"

_NAME = re.compile(NAME_PATTERN)
_MAX_NAME = 253

JSON = dict[str, Any]


class Hook(StrEnum):
    """Which webhook is asked."""

    MUTATE = "mutate"
    VALIDATE = "validate"


class MalformedReviewError(ValueError):
    """The request body is not an ``admission.k8s.io/v1`` AdmissionReview with a request."""


@dataclass(frozen=True, slots=True)
class ReviewRequest:
    """The parts of an AdmissionReview request the decisions read."""

    uid: str
    """Echoed in the response; the API server matches answers by it."""
    namespace: str
    """The namespace of the object (a pod's ``metadata.namespace`` may still be empty)."""
    operation: str
    """CREATE, UPDATE, DELETE or CONNECT."""
    kind: str
    """``request.kind.kind``, e.g. Pod."""
    obj: Mapping[str, Any]
    """``request.object`` (empty for DELETE)."""
    dry_run: bool = False

    @property
    def pod(self) -> str:
        """``namespace/name`` of the pod for log lines (``generateName*`` before it is named)."""
        meta = _mapping(self.obj.get("metadata"))
        name = meta.get("name") or (f"{meta['generateName']}*" if meta.get("generateName") else "")
        return f"{self.namespace}/{name or '<unnamed>'}"


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one review: allowed or not, why, and for a mutation the JSON Patch."""

    allowed: bool
    message: str
    """Why; for a refusal this is what the user sees after ``denied the request:``."""
    patch: tuple[JSON, ...] = field(default=())
    """RFC 6902 operations on the pod (mutation only; empty: the pod is left as it is)."""
    claim: str | None = None
    """The claim the pod names, for log lines."""


# -- reading the review -------------------------------------------------------------------------


def parse_review_body(raw: bytes) -> ReviewRequest:
    """:func:`parse_review` of a request body as received."""
    try:
        body = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise MalformedReviewError(f"body is not JSON: {exc}") from None
    return parse_review(body)


def parse_review(body: object) -> ReviewRequest:
    """The request of an AdmissionReview; :class:`MalformedReviewError` saying what is wrong."""
    if not isinstance(body, Mapping):
        raise MalformedReviewError("body is not a JSON object")
    api_version, kind = body.get("apiVersion"), body.get("kind")
    if kind != "AdmissionReview":
        raise MalformedReviewError(f"kind is {kind!r}, expected 'AdmissionReview'")
    if api_version != REVIEW_API_VERSION:
        raise MalformedReviewError(
            f"apiVersion is {api_version!r}, only {REVIEW_API_VERSION!r} is served "
            "(set admissionReviewVersions: [v1])"
        )
    request = body.get("request")
    if not isinstance(request, Mapping):
        raise MalformedReviewError("request is missing or not an object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise MalformedReviewError("request.uid is missing or not a string")
    operation = request.get("operation")
    if not isinstance(operation, str) or not operation:
        raise MalformedReviewError("request.operation is missing or not a string")
    obj = request.get("object")
    if obj is None and operation != "CREATE":
        obj = {}
    if not isinstance(obj, Mapping):
        raise MalformedReviewError("request.object is missing or not an object")
    namespace = request.get("namespace") or _mapping(obj.get("metadata")).get("namespace") or ""
    if not isinstance(namespace, str):
        raise MalformedReviewError("request.namespace is not a string")
    kind_of = _mapping(request.get("kind")).get("kind")
    return ReviewRequest(
        uid=uid,
        namespace=namespace,
        operation=operation,
        kind=kind_of if isinstance(kind_of, str) else "",
        obj=obj,
        dry_run=request.get("dryRun") is True,
    )


def claim_label(pod: Mapping[str, Any]) -> str | None:
    """The value of the pod's claim label; None when the pod has no such label."""
    labels = _mapping(_mapping(pod.get("metadata")).get("labels"))
    value = labels.get(CLAIM_LABEL)
    return value if isinstance(value, str) else None


def label_problem(value: str, namespace: str) -> str | None:
    """Why the label value cannot name a claim, or None when it can."""
    if not value:
        return (
            f'label {CLAIM_LABEL} is empty: it must name a CapacityClaim in namespace "{namespace}"'
        )
    if len(value) > _MAX_NAME or not _NAME.match(value):
        return (
            f'label {CLAIM_LABEL}="{value}" is not a CapacityClaim name (lowercase letters, '
            "digits, '-' and '.', starting and ending with a letter or digit)"
        )
    return None


def claim_to_read(request: ReviewRequest) -> str | None:
    """The claim (in ``request.namespace``) :func:`decide` needs, or None when it needs none."""
    if not _judged(request):
        return None
    name = claim_label(request.obj)
    if name is None or label_problem(name, request.namespace) is not None:
        return None
    return name


# -- the decisions ------------------------------------------------------------------------------


def decide(hook: Hook, request: ReviewRequest, claim: Mapping[str, Any] | None) -> Decision:
    """The answer of ``hook`` to ``request``; ``claim`` is the object :func:`claim_to_read`
    named, read from the API server (None: it does not exist)."""
    if not _judged(request):
        return Decision(True, f"{request.operation} of {request.kind or 'object'} is not judged")
    name = claim_label(request.obj)
    if name is None:
        return Decision(True, f"no {CLAIM_LABEL} label")
    if hook is Hook.MUTATE:
        return mutate(request.obj, request.namespace, name, claim)
    return validate(request.obj, request.namespace, name, claim)


def claim_problem(name: str, namespace: str, claim: Mapping[str, Any] | None) -> str | None:
    """Why pods cannot bind to the claim, or None when it is Admitted with placements."""
    if claim is None:
        return f'capacity claim "{name}" not found in namespace "{namespace}"'
    what = f'capacity claim "{name}" in namespace "{namespace}"'
    meta = _mapping(claim.get("metadata"))
    status = _mapping(claim.get("status"))
    phase = status.get("phase")
    reason = status.get("reason")
    if meta.get("deletionTimestamp"):
        return f"{what} is being deleted: {BINDS_ONLY}"
    if not phase:
        return f"{what} has no phase yet: {BINDS_ONLY}"
    if phase != Phase.ADMITTED:
        because = f" ({reason})" if reason else ""
        return f"{what} is {phase}{because}: {BINDS_ONLY}"
    if not placement_nodes(claim):
        return f"{what} is Admitted but has no placements: {BINDS_ONLY}"
    return None


def placement_nodes(claim: Mapping[str, Any]) -> list[str]:
    """The claim's placement node names (``status.placements[].node``), in order, once each."""
    placements = _mapping(claim.get("status")).get("placements")
    nodes = [
        p["node"]
        for p in (placements if isinstance(placements, list) else [])
        if isinstance(p, Mapping) and isinstance(p.get("node"), str) and p["node"]
    ]
    return list(dict.fromkeys(nodes))


def requirement(nodes: Sequence[str]) -> JSON:
    """The node selector requirement that binds a pod to ``nodes``."""
    return {"key": HOSTNAME_KEY, "operator": "In", "values": list(nodes)}


def mutate(
    pod: Mapping[str, Any], namespace: str, name: str, claim: Mapping[str, Any] | None
) -> Decision:
    """Add the placement requirement to the pod's required node affinity.

    The mutating hook never refuses: a pod whose claim is unusable is left as it is and the
    validating hook (which runs after every mutation) refuses it with the reason.
    """
    problem = label_problem(name, namespace) or claim_problem(name, namespace, claim)
    if problem is not None or claim is None:
        return Decision(True, f"left as it is: {problem}", claim=name)
    nodes = placement_nodes(claim)
    patch = tuple(affinity_patch(pod, nodes))
    where = ",".join(nodes)
    if not patch:
        return Decision(True, f"already requires {where}", claim=name)
    return Decision(True, f"requires {where}", patch=patch, claim=name)


def affinity_patch(pod: Mapping[str, Any], nodes: Sequence[str]) -> list[JSON]:
    """JSON Patch operations that make every required nodeSelectorTerm of ``pod`` require
    ``nodes``; none for a term that already carries exactly that requirement.

    An empty term matches no node at all, so it is left empty (adding the requirement would
    widen it).
    """
    want = requirement(nodes)
    spec = pod.get("spec")
    affinity = spec.get("affinity") if isinstance(spec, Mapping) else None
    new_required = {"nodeSelectorTerms": [{"matchExpressions": [want]}]}
    if not isinstance(spec, Mapping):  # the API server refuses such a pod anyway
        return [_add("/spec", {"affinity": {"nodeAffinity": {REQUIRED: new_required}}})]
    if not isinstance(affinity, Mapping):
        return [_add(AFFINITY_PATH, {"nodeAffinity": {REQUIRED: new_required}})]
    node_affinity = affinity.get("nodeAffinity")
    if not isinstance(node_affinity, Mapping):
        return [_add(NODE_AFFINITY_PATH, {REQUIRED: new_required})]
    required = node_affinity.get(REQUIRED)
    if not isinstance(required, Mapping):
        return [_add(REQUIRED_PATH, new_required)]
    terms = required.get("nodeSelectorTerms")
    if not isinstance(terms, list) or not terms:
        return [_add(TERMS_PATH, new_required["nodeSelectorTerms"])]
    ops: list[JSON] = []
    for index, term in enumerate(terms):
        term_map = _mapping(term)
        expressions = term_map.get("matchExpressions")
        if not expressions and not term_map.get("matchFields"):
            continue  # matches nothing; left so
        if isinstance(expressions, list) and expressions:
            if any(_same_requirement(e, want) for e in expressions):
                continue
            ops.append(_add(f"{TERMS_PATH}/{index}/matchExpressions/-", want))
        else:
            ops.append(_add(f"{TERMS_PATH}/{index}/matchExpressions", [want]))
    return ops


def validate(
    pod: Mapping[str, Any], namespace: str, name: str, claim: Mapping[str, Any] | None
) -> Decision:
    """Allow the pod only when its claim is Admitted and the pod can run only on the claim's
    placement nodes."""
    problem = label_problem(name, namespace) or claim_problem(name, namespace, claim)
    if problem is not None or claim is None:
        return Decision(False, problem or "", claim=name)
    nodes = placement_nodes(claim)
    where = ",".join(nodes)
    spec = _mapping(pod.get("spec"))
    node_name = spec.get("nodeName")
    if node_name and node_name not in nodes:
        return Decision(
            False,
            f'pod names node "{node_name}" (spec.nodeName), which is not a placement node of '
            f'capacity claim "{name}" ({where})',
            claim=name,
        )
    if not bound_to(pod, nodes):
        return Decision(
            False,
            f"pod may run on nodes that are not placement nodes of capacity claim "
            f'"{name}" ({where}): every required nodeSelectorTerm must require '
            f"{HOSTNAME_KEY} In them (the mutating webhook adds this; was it bypassed?)",
            claim=name,
        )
    return Decision(True, f"admitted on {where}", claim=name)


def bound_to(pod: Mapping[str, Any], nodes: Sequence[str]) -> bool:
    """Whether the pod's required node affinity lets it run only on ``nodes``: every term
    restricts ``kubernetes.io/hostname`` (or the node's ``metadata.name``) to a subset of them."""
    allowed = set(nodes)
    spec = _mapping(pod.get("spec"))
    required = _mapping(_mapping(_mapping(spec.get("affinity")).get("nodeAffinity")).get(REQUIRED))
    terms = required.get("nodeSelectorTerms")
    if not isinstance(terms, list) or not terms:
        return False
    for term in terms:
        term_map = _mapping(term)
        expressions = _requirements(term_map.get("matchExpressions"))
        fields = _requirements(term_map.get("matchFields"))
        if not expressions and not fields:
            continue  # an empty term matches no node
        restricted = any(_restricts(e, HOSTNAME_KEY, allowed) for e in expressions) or any(
            _restricts(f, "metadata.name", allowed) for f in fields
        )
        if not restricted:
            return False
    return True


# -- the response -------------------------------------------------------------------------------


def review_response(uid: str, decision: Decision) -> JSON:
    """The AdmissionReview to answer with: the same uid, the decision, and for a mutation the
    base64 JSON Patch."""
    response: JSON = {"uid": uid, "allowed": decision.allowed}
    if decision.patch:
        raw = json.dumps(list(decision.patch), separators=(",", ":")).encode()
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(raw).decode()
    if not decision.allowed:
        response["status"] = {"code": 403, "reason": "Forbidden", "message": decision.message}
    return {"apiVersion": REVIEW_API_VERSION, "kind": "AdmissionReview", "response": response}


# -- helpers ------------------------------------------------------------------------------------


def _judged(request: ReviewRequest) -> bool:
    """Only pod creation is judged: a pod's affinity cannot change after it is created."""
    return request.kind == "Pod" and request.operation == "CREATE"


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _add(path: str, value: object) -> JSON:
    return {"op": "add", "path": path, "value": value}


def _requirements(value: object) -> list[Mapping[str, Any]]:
    return [e for e in value if isinstance(e, Mapping)] if isinstance(value, list) else []


def _same_requirement(expression: object, want: Mapping[str, Any]) -> bool:
    e = _mapping(expression)
    values = e.get("values")
    return (
        e.get("key") == want["key"]
        and e.get("operator") == want["operator"]
        and isinstance(values, list)
        and set(values) == set(want["values"])
    )


def _restricts(expression: Mapping[str, Any], key: str, allowed: set[str]) -> bool:
    values = expression.get("values")
    return (
        expression.get("key") == key
        and expression.get("operator") == "In"
        and isinstance(values, list)
        and bool(values)
        and set(values) <= allowed
    )


__all__ = [
    "BINDS_ONLY",
    "CLAIM_LABEL",
    "HOSTNAME_KEY",
    "Decision",
    "Hook",
    "MalformedReviewError",
    "ReviewRequest",
    "affinity_patch",
    "bound_to",
    "claim_label",
    "claim_problem",
    "claim_to_read",
    "decide",
    "label_problem",
    "mutate",
    "parse_review",
    "parse_review_body",
    "placement_nodes",
    "requirement",
    "review_response",
    "validate",
]
