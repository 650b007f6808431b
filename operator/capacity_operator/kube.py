"""The operator's Kubernetes I/O: reads, and writes guarded by compare-and-swap.

kopf's own handler patches carry no resourceVersion precondition, so every protocol write goes
through :meth:`Kube.patch_status_cas`: a merge patch that includes ``metadata.resourceVersion``,
which the API server turns into an optimistic-concurrency check (409 Conflict when the object
moved on). A conflict raises :class:`ConflictError`; callers re-read and re-decide.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from capacity_api import GROUP, VERSION
from capacity_api.models import CapacityClaim, CapacityNode

CLAIMS = "capacityclaims"
NODES = "capacitynodes"
JSON = dict[str, Any]


class ConflictError(RuntimeError):
    """The object changed since it was read (HTTP 409)."""


class NotFoundError(RuntimeError):
    """The object does not exist (HTTP 404)."""


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    name: str
    renew_time: datetime | None
    duration_seconds: int

    def live(self, now: datetime) -> bool:
        if self.renew_time is None:
            return False
        return (now - self.renew_time).total_seconds() <= self.duration_seconds


def _raise_for(exc: ApiException) -> None:
    if exc.status == 409:
        raise ConflictError(str(exc.reason)) from exc
    if exc.status == 404:
        raise NotFoundError(str(exc.reason)) from exc
    raise exc


class Kube:
    """Blocking Kubernetes client calls, run in worker threads so the event loop never waits."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.custom = client.CustomObjectsApi(api)
        self.coordination = client.CoordinationV1Api(api)
        self.core = client.CoreV1Api(api)

    # -- claims ------------------------------------------------------------------------------

    async def get_claim(self, namespace: str, name: str) -> JSON:
        out: JSON = await self._call(
            self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, CLAIMS, name
        )
        return out

    async def list_claims(self) -> list[JSON]:
        out = await self._call(self.custom.list_cluster_custom_object, GROUP, VERSION, CLAIMS)
        return list(out.get("items", []))

    async def patch_claim_status_cas(
        self, namespace: str, name: str, resource_version: str, status: JSON
    ) -> JSON:
        body = {"metadata": {"resourceVersion": resource_version}, "status": status}
        out: JSON = await self._call(
            self.custom.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            namespace,
            CLAIMS,
            name,
            body,
        )
        return out

    # -- nodes -------------------------------------------------------------------------------

    async def get_node(self, name: str) -> JSON:
        out: JSON = await self._call(
            self.custom.get_cluster_custom_object, GROUP, VERSION, NODES, name
        )
        return out

    async def list_nodes(self) -> list[JSON]:
        out = await self._call(self.custom.list_cluster_custom_object, GROUP, VERSION, NODES)
        return list(out.get("items", []))

    async def patch_node_status_cas(self, name: str, resource_version: str, status: JSON) -> JSON:
        body = {"metadata": {"resourceVersion": resource_version}, "status": status}
        out: JSON = await self._call(
            self.custom.patch_cluster_custom_object_status, GROUP, VERSION, NODES, name, body
        )
        return out

    # -- leases, config ----------------------------------------------------------------------

    async def list_leases(self, namespace: str) -> list[LeaseInfo]:
        out = await self._call(self.coordination.list_namespaced_lease, namespace)
        return [lease_info(item) for item in out.items]

    async def get_configmap_data(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            cm = await self._call(self.core.read_namespaced_config_map, name, namespace)
        except NotFoundError:
            return None
        return dict(cm.data or {})

    async def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except ApiException as exc:
            _raise_for(exc)
            raise  # pragma: no cover - _raise_for always raises


def lease_info(lease: Any) -> LeaseInfo:
    spec = lease.spec
    renew = spec.renew_time if spec is not None else None
    if isinstance(renew, datetime) and renew.tzinfo is None:
        renew = renew.replace(tzinfo=UTC)
    return LeaseInfo(
        name=lease.metadata.name,
        renew_time=renew,
        duration_seconds=int((spec.lease_duration_seconds if spec else None) or 40),
    )


def lease_from_dict(raw: JSON) -> LeaseInfo:
    """A Lease as it arrives in a watch event (camelCase JSON)."""
    spec = raw.get("spec") or {}
    renew_raw = spec.get("renewTime")
    renew = datetime.fromisoformat(renew_raw.replace("Z", "+00:00")) if renew_raw else None
    return LeaseInfo(
        name=raw["metadata"]["name"],
        renew_time=renew,
        duration_seconds=int(spec.get("leaseDurationSeconds") or 40),
    )


def parse_claim(body: JSON) -> CapacityClaim:
    return CapacityClaim.model_validate(body)


def parse_node(body: JSON) -> CapacityNode:
    return CapacityNode.model_validate(body)
