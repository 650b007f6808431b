"""Generate CustomResourceDefinitions from the pydantic models.

``python -m capacity_api.crdgen crds/`` writes one YAML file per resource; ``--check`` exits
non-zero when the files on disk differ from what the models generate. The output is a structural
OpenAPI v3 schema: every ``$ref`` inlined, ``Optional`` unwrapped into "not required", titles
dropped, docstrings kept as descriptions, and the Kubernetes extensions (int-or-string, CEL
rules, list types) carried over from the models' ``json_schema_extra``.

``--chart charts/capacity-platform`` also writes the chart's generated templates: the same CRDs
(behind ``crds.install``, annotated to be kept on uninstall) and the node-restriction
ValidatingAdmissionPolicy of :mod:`capacity_api.policy`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from capacity_api import GROUP, VERSION, policy
from capacity_api.models import (
    ASKED_FIELDS,
    ASKED_PATH,
    CapacityBallot,
    CapacityClaim,
    CapacityNode,
    Resource,
)

JSONSchema = dict[str, Any]

_DROP_KEYS = {"title", "$defs", "discriminator"}


def _resolve(node: JSONSchema, defs: dict[str, JSONSchema]) -> JSONSchema:
    """Inline $ref, keeping the referring field's own description."""
    ref = node.get("$ref")
    if ref is None:
        return node
    target = dict(defs[ref.rsplit("/", 1)[-1]])
    extra = {k: v for k, v in node.items() if k != "$ref"}
    target.update(extra)
    return target


def _unwrap_optional(node: JSONSchema, defs: dict[str, JSONSchema]) -> JSONSchema:
    """``X | None`` arrives as anyOf [X, null]: return X with the outer keys merged in."""
    branches = node.get("anyOf")
    if not branches:
        return node
    non_null = [b for b in branches if b.get("type") != "null"]
    if len(non_null) == len(branches):
        return node
    outer = {k: v for k, v in node.items() if k not in ("anyOf", "default")}
    if len(non_null) == 1:
        inner = dict(_resolve(non_null[0], defs))
        inner.update(outer)
        return inner
    return {**outer, "anyOf": non_null}


_FORMATS = ("date-time", "int32", "int64", "double", "float")


def _keep(node: JSONSchema, key: str, value: Any) -> bool:
    """Whether a pydantic schema key survives into the structural schema."""
    if key in _DROP_KEYS:
        return False
    if key == "default":
        return not (value is None or isinstance(value, dict | list))  # scalars only
    if key == "format":
        return value in _FORMATS
    if key == "anyOf" and not node.get("x-kubernetes-int-or-string"):
        raise ValueError(f"a union cannot be expressed in a structural schema: {node}")
    return True


def _convert(key: str, value: Any, defs: dict[str, JSONSchema]) -> Any:
    if key == "properties":
        return {name: structural(sub, defs) for name, sub in value.items()}
    if key in ("items", "additionalProperties") and isinstance(value, dict):
        return structural(value, defs)
    return value


def structural(node: JSONSchema, defs: dict[str, JSONSchema]) -> JSONSchema:
    """Turn one pydantic JSON schema node into a structural Kubernetes schema node."""
    node = _unwrap_optional(_resolve(node, defs), defs)
    out: JSONSchema = {}
    for key, value in node.items():
        if _keep(node, key, value):
            out[key] = _convert(key, value, defs)
    if isinstance(out.get("description"), str):
        out["description"] = " ".join(out["description"].split())
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if "const" in out:
        out["enum"] = [out.pop("const")]
        out.setdefault("type", "string")
    if (
        out.get("type") == "object"
        and "properties" not in out
        and "additionalProperties" not in out
    ):
        out["x-kubernetes-preserve-unknown-fields"] = True
    if "required" in out and "properties" in out:
        out["required"] = [r for r in out["required"] if r in out["properties"]]
        if not out["required"]:
            del out["required"]
    return _ordered(out)


_FIRST = ("description", "type")


def _ordered(node: JSONSchema) -> JSONSchema:
    """Description and type first, then the other keys in alphabetical order (stable output)."""
    head = {k: node[k] for k in _FIRST if k in node}
    tail = {k: node[k] for k in sorted(node) if k not in _FIRST}
    return {**head, **tail}


def _conditions_list(schema: JSONSchema) -> None:
    """Mark ``conditions`` arrays as list-maps keyed by type (one entry per condition type)."""
    conditions = schema.get("properties", {}).get("status", {}).get("properties", {})
    if "conditions" in conditions:
        conditions["conditions"]["x-kubernetes-list-type"] = "map"
        conditions["conditions"]["x-kubernetes-list-map-keys"] = ["type"]


def object_schema(model: type[BaseModel]) -> JSONSchema:
    """The openAPIV3Schema of a resource model (spec and status)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    props = raw["properties"]
    schema: JSONSchema = {
        "type": "object",
        "description": raw.get("description", ""),
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of the object."},
            "kind": {"type": "string", "description": "Kind of the object."},
            "metadata": {"type": "object"},
            "spec": structural(props["spec"], defs),
            "status": structural(props["status"], defs),
        },
        "required": ["spec"],
    }
    _conditions_list(schema)
    return schema


PRINTER_COLUMNS: dict[str, list[JSONSchema]] = {
    "CapacityClaim": [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Nodes", "type": "string", "jsonPath": ".status.nodes"},
        {"name": "Votes", "type": "string", "jsonPath": ".status.voteCount"},
        {"name": "Reason", "type": "string", "jsonPath": ".status.reason"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
    "CapacityNode": [
        {
            "name": "Ready",
            "type": "string",
            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
        },
        {
            "name": "Stale",
            "type": "string",
            "description": "True when a substrate or the whole node (lease expired) is stale",
            "jsonPath": '.status.conditions[?(@.type=="Stale")].status',
        },
        {
            "name": "Fenced",
            "type": "string",
            "description": "True while the operator does not use the node (failed, or back and "
            "not trusted again yet)",
            "jsonPath": '.status.conditions[?(@.type=="Fenced")].status',
            "priority": 1,
        },
        {
            "name": "CPU",
            "type": "number",
            "format": "float",
            "description": "p95 of host CPU utilisation over the window",
            "jsonPath": ".status.readings.host.signals.cpu.p95",
        },
        {
            "name": "Mem",
            "type": "number",
            "format": "float",
            "description": "p95 of memory working set over the effective limit",
            "jsonPath": ".status.readings.host.signals.memory.p95",
        },
        {
            "name": "GPU",
            "type": "number",
            "format": "float",
            "description": "p95 of GPU load",
            "jsonPath": ".status.readings.gpu.load.p95",
        },
        {
            "name": "Headroom",
            "type": "number",
            "format": "float",
            "description": "host headroom: min(1 - allocated, 1 - p95 load)",
            "jsonPath": ".status.gates.host.headroom",
        },
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
    "CapacityBallot": [
        {"name": "Node", "type": "string", "jsonPath": ".spec.nodeName"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
}


SELECTABLE_FIELDS: dict[str, list[JSONSchema]] = {
    # an agent hosting one node watches only the claims whose proposal names it
    "CapacityClaim": [{"jsonPath": f".{ASKED_PATH}.{name}"} for name in ASKED_FIELDS],
}


def crd(model: type[Resource]) -> JSONSchema:
    """The full CustomResourceDefinition of a resource model."""
    version: JSONSchema = {
        "name": VERSION,
        "served": True,
        "storage": True,
        "schema": {"openAPIV3Schema": object_schema(model)},
        "subresources": {"status": {}},
        "additionalPrinterColumns": PRINTER_COLUMNS[model.kind],
    }
    if model.kind in SELECTABLE_FIELDS:
        version["selectableFields"] = SELECTABLE_FIELDS[model.kind]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{model.plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": model.kind,
                "listKind": f"{model.kind}List",
                "plural": model.plural,
                "singular": model.singular,
                "shortNames": list(model.short_names),
                "categories": ["capacity"],
            },
            "scope": "Namespaced" if model.namespaced else "Cluster",
            "versions": [version],
        },
    }


def kopf_peering_crd() -> JSONSchema:
    """kopf's cluster-wide peering resource: how a second operator copy learns to stay idle."""
    free = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "clusterkopfpeerings.kopf.dev"},
        "spec": {
            "group": "kopf.dev",
            "names": {
                "kind": "ClusterKopfPeering",
                "listKind": "ClusterKopfPeeringList",
                "plural": "clusterkopfpeerings",
                "singular": "clusterkopfpeering",
            },
            "scope": "Cluster",
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "Operators of one peering name and their priorities "
                            "(kopf writes status: one key per running operator).",
                            "properties": {"spec": free, "status": free},
                        }
                    },
                }
            ],
        },
    }


MODELS: tuple[type[Resource], ...] = (CapacityClaim, CapacityNode, CapacityBallot)
HEADER = "# Generated by `make crds` (python -m capacity_api.crdgen) from capacity_api.models.\n"
HEADER += "# Do not edit by hand: change the models and regenerate.\n"


def render() -> dict[str, str]:
    """File name -> YAML text for every CRD."""
    files: dict[str, str] = {}
    for model in MODELS:
        body = yaml.safe_dump(crd(model), sort_keys=False, width=100, allow_unicode=True)
        files[f"{GROUP}_{model.plural}.yaml"] = HEADER + body
    peering = yaml.safe_dump(kopf_peering_crd(), sort_keys=False, width=100)
    files["kopf.dev_clusterkopfpeerings.yaml"] = (
        HEADER.replace("from capacity_api.models", "(kopf's peering resource)") + peering
    )
    return files


CHART_HEADER = (
    "{{- /* Generated by `make crds` (python -m capacity_api.crdgen --chart): "
    "do not edit by hand. */}}\n"
)
KEEP = {"helm.sh/resource-policy": "keep"}


def _dump(body: JSONSchema) -> str:
    # wide lines: a Helm template expression must never be folded across lines
    return yaml.safe_dump(body, sort_keys=False, width=100_000, allow_unicode=True)


def render_chart() -> dict[str, str]:
    """Chart path (relative to the chart) -> template text: the CRDs (rendered when
    ``crds.install``; kept on uninstall) and the node-restriction policy with its binding."""
    files: dict[str, str] = {}
    for model in MODELS:
        body = crd(model)
        body["metadata"]["annotations"] = dict(KEEP)
        text = "{{- if .Values.crds.install }}\n" + _dump(body) + "{{- end }}\n"
        files[f"templates/crds/{GROUP}_{model.plural}.yaml"] = CHART_HEADER + text
    peering = kopf_peering_crd()
    peering["metadata"]["annotations"] = dict(KEEP)
    files["templates/crds/kopf.dev_clusterkopfpeerings.yaml"] = (
        CHART_HEADER + "{{- if .Values.crds.install }}\n" + _dump(peering) + "{{- end }}\n"
    )
    name = '{{ include "capacity-platform.fullname" . }}-node-restriction'
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"]},
    }
    files["templates/node-restriction.yaml"] = (
        CHART_HEADER + "{{- /* Agents write only their own node's CapacityNode and ballot "
        "(capacity_api.policy). */}}\n"
        + "{{- if .Values.nodeRestriction.enabled }}\n"
        + _dump(policy.node_restriction_policy(name))
        + "---\n"
        + _dump(binding)
        + "{{- end }}\n"
    )
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("directory", type=Path, help="where the CRD YAML files live")
    parser.add_argument("--chart", type=Path, help="also the chart's generated templates")
    parser.add_argument("--check", action="store_true", help="fail if the files are out of date")
    args = parser.parse_args(argv)
    stale: list[str] = []
    outputs = [(args.directory / name, text) for name, text in render().items()]
    if args.chart is not None:
        outputs += [(args.chart / name, text) for name, text in render_chart().items()]
    for path, text in outputs:
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print("out of date, run `make crds`: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
