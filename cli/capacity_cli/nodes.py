"""``capctl nodes``: each node's Ready and Stale conditions, lease age and, per substrate, p95
load, headroom, allocation and gate readings (pure renderers of parsed models)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime

from capacity_api import reasons
from capacity_api.admission import allocated_share
from capacity_api.lease import LeaseInfo
from capacity_api.models import CapacityNode, Substrate
from capacity_cli.output import JSON, aware, human_duration, iso, num, table


def _condition(node: CapacityNode, type_: str) -> str | None:
    for c in (node.status.conditions or []) if node.status else []:
        if c.type == type_:
            return c.status.value
    return None


def liveness(node: CapacityNode, lease: LeaseInfo | None, now: datetime) -> str:
    """Alive, Suspect (lease expired), Failed (fenced by the operator) or Returning (renews its
    lease again, not used until it filled its window), as the operator's node lifecycle says in
    the Ready and Fenced conditions; a lease expired that the operator has not marked yet is
    Suspect too."""
    conditions = (node.status.conditions or []) if node.status else []
    for c in conditions:
        if c.type == reasons.READY and c.reason == reasons.NODE_FAILED:
            return "Failed"
        if c.type == reasons.READY and c.reason in (reasons.LEASE_EXPIRED, reasons.WITNESSED_ALIVE):
            return "Suspect"
    if lease is not None and not lease.live(now):
        return "Suspect"
    for c in conditions:
        if c.type == reasons.FENCED and c.status.value == "True":
            return "Returning" if c.reason == reasons.RETURNING else "Failed"
    return "Alive"


def _substrates(node: CapacityNode) -> list[str]:
    status = node.status
    seen = [s.value for s in node.spec.substrates]
    extra: set[str] = set()
    if status is not None:
        for part in (status.readings, status.gates, status.allocated):
            extra.update(part or {})
    return seen + sorted(extra - set(seen))


def lease_json(lease: LeaseInfo | None, now: datetime) -> JSON | None:
    """A node's Lease in ``capctl nodes -o json`` (None: the node has none)."""
    if lease is None:
        return None
    age = (now - lease.renew_time).total_seconds() if lease.renew_time else None
    return {
        "name": lease.name,
        "renewTime": iso(lease.renew_time),
        "durationSeconds": lease.duration_seconds,
        "ageSeconds": None if age is None else round(age, 3),
        "expired": not lease.live(now),
    }


def _lease_cell(lease: LeaseInfo | None, now: datetime) -> str:
    if lease is None:
        return "none"
    if lease.renew_time is None:
        return "never renewed"
    age = human_duration((now - lease.renew_time).total_seconds())
    return age if lease.live(now) else f"expired ({age})"


def node_json(node: CapacityNode, lease: LeaseInfo | None, now: datetime) -> JSON:
    """One node's entry of ``capctl nodes -o json``."""
    status = node.status
    substrates = []
    for name in _substrates(node):
        reading = (status.readings or {}).get(name) if status else None
        gates = (status.gates or {}).get(name) if status else None
        alloc = (status.allocated or {}).get(name) if status else None
        try:
            share = allocated_share(node, Substrate(name))
        except ValueError:
            share = sum(h.share for h in alloc.holders) if alloc else 0.0
        substrates.append(
            {
                "substrate": name,
                "samples": reading.samples if reading else None,
                "observedAt": iso(reading.observed_at) if reading else None,
                "readingsAgeSeconds": round((now - aware(reading.observed_at)).total_seconds(), 3)
                if reading
                else None,
                "p95": reading.load.p95 if reading else None,
                "headroom": gates.headroom if gates else None,
                "allocated": share,
                "claims": (len(alloc.holders) or alloc.claims) if alloc else 0,
                "holders": [h.wire() for h in alloc.holders] if alloc else [],
                "gluingDelta": gates.gluing_delta if gates else None,
                "lambda1": gates.lambda1 if gates else None,
                "lambdaInt": gates.lambda_int if gates else None,
                "entropy": gates.entropy if gates else None,
            }
        )
    return {
        "name": node.metadata.name or node.spec.node_name,
        "nodeName": node.spec.node_name,
        "ready": _condition(node, reasons.READY),
        "liveness": liveness(node, lease, now),
        "stale": _condition(node, reasons.STALE),
        "conditions": [c.wire() for c in (status.conditions or [])] if status else [],
        "lease": lease_json(lease, now),
        "substrates": substrates,
    }


def _sorted_nodes(nodes: Iterable[CapacityNode]) -> list[CapacityNode]:
    return sorted(nodes, key=lambda n: n.metadata.name or n.spec.node_name)


def nodes_json(
    nodes: Iterable[CapacityNode], leases: Mapping[str, LeaseInfo], *, now: datetime
) -> list[JSON]:
    """``capctl nodes -o json``: one dict per node, sorted by name (pure)."""
    out = []
    for node in _sorted_nodes(nodes):
        name = node.metadata.name or node.spec.node_name
        out.append(node_json(node, leases.get(name), now))
    return out


NODE_HEADERS = (
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
)


def nodes_text(
    nodes: Iterable[CapacityNode], leases: Mapping[str, LeaseInfo], *, now: datetime
) -> str:
    """``capctl nodes``: an aligned table, one line per node and substrate (pure)."""
    rows: list[list[str]] = []
    for node in _sorted_nodes(nodes):
        name = node.metadata.name or node.spec.node_name
        data = node_json(node, leases.get(name), now)
        lead = [
            name,
            data["liveness"],
            data["ready"] or "-",
            data["stale"] or "-",
            _lease_cell(leases.get(name), now),
        ]
        if not data["substrates"]:
            rows.append([*lead, *["-"] * (len(NODE_HEADERS) - len(lead))])
        for i, s in enumerate(data["substrates"]):
            age = s["readingsAgeSeconds"]
            rows.append(
                [
                    *(lead if i == 0 else [""] * len(lead)),
                    s["substrate"],
                    "-" if age is None else human_duration(age),
                    num(s["p95"], 2),
                    num(s["headroom"], 2),
                    num(s["allocated"], 2),
                    str(s["claims"]),
                    num(s["gluingDelta"], 3),
                    num(s["lambdaInt"], 3),
                    num(s["entropy"], 3),
                ]
            )
    if not rows:
        return "No CapacityNodes found.\n"
    return table(NODE_HEADERS, rows, indent=0) + "\n"


__all__ = ["NODE_HEADERS", "lease_json", "liveness", "node_json", "nodes_json", "nodes_text"]
