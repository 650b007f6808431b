"""The operator's Kubernetes I/O: reads, and writes guarded by compare-and-swap.

kopf's own handler patches carry no resourceVersion precondition, so every protocol write goes
through :meth:`Kube.patch_status_cas`: a merge patch that includes ``metadata.resourceVersion``,
which the API server turns into an optimistic-concurrency check (409 Conflict when the object
moved on). A conflict raises :class:`ConflictError`; callers re-read and re-decide.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from datetime import UTC, datetime
from functools import partial
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from capacity_api import GROUP, VERSION
from capacity_api.lease import LeaseInfo, parse_lease
from capacity_api.models import CapacityClaim, CapacityNode

log = logging.getLogger(__name__)

COMPONENT = "capacity-operator"
"""Who posts the operator's Events (their source and reporting component)."""
CLAIMS = "capacityclaims"
NODES = "capacitynodes"
BALLOTS = "capacityballots"
JSON = dict[str, Any]


class ConflictError(RuntimeError):
    """The object changed since it was read (HTTP 409)."""


class NotFoundError(RuntimeError):
    """The object does not exist (HTTP 404)."""


def _raise_for(exc: ApiException) -> None:
    if exc.status == 409:
        raise ConflictError(str(exc.reason)) from exc
    if exc.status == 404:
        raise NotFoundError(str(exc.reason)) from exc
    raise exc


def _patch_not_applicable(exc: ApiException) -> bool:
    """A 422 from a JSON patch that could not be applied (a failed ``test``, a ``remove`` of
    what is not there): the API server names no field, unlike a validation failure."""
    try:
        details = json.loads(exc.body or "{}").get("details") or {}
    except (ValueError, AttributeError):
        return False
    return not details.get("causes") and not details.get("name")


class Kube:
    """Blocking Kubernetes client calls, run in worker threads so the event loop never waits."""

    def __init__(self, api: client.ApiClient, instance: str | None = None) -> None:
        self.api = api
        self.instance = instance
        """reportingInstance of the Events this copy posts."""
        self.custom = client.CustomObjectsApi(api)
        self.coordination = client.CoordinationV1Api(api)
        self.core = client.CoreV1Api(api)
        self._background: set[asyncio.Task[None]] = set()

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

    async def patch_claim_status_guarded(self, namespace: str, name: str, ops: list[JSON]) -> JSON:
        """A JSON patch of the claim's status whose leading ``test`` operations are the guard:
        when one fails (the guarded fields moved on), :class:`ConflictError`. Unlike the
        resourceVersion check, an agent's vote landing meanwhile does not fail it."""
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{CLAIMS}/{name}/status"
        try:
            out: JSON = await asyncio.to_thread(
                self.api.call_api,
                path,
                "PATCH",
                header_params={
                    "Content-Type": "application/json-patch+json",
                    "Accept": "application/json",
                },
                body=ops,
                response_type="object",
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
            )
        except ApiException as exc:
            if exc.status == 422 and _patch_not_applicable(exc):
                raise ConflictError(f"{namespace}/{name}: guarded status moved on") from exc
            _raise_for(exc)
            raise  # pragma: no cover - _raise_for always raises
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

    async def delete_ballot(self, name: str) -> None:
        """Delete a node's CapacityBallot (its CapacityNode is gone); a missing one is fine."""
        with contextlib.suppress(NotFoundError):
            await self._call(
                self.custom.delete_cluster_custom_object, GROUP, VERSION, BALLOTS, name
            )

    async def patch_node_status_cas(self, name: str, resource_version: str, status: JSON) -> JSON:
        body = {"metadata": {"resourceVersion": resource_version}, "status": status}
        return await self._patch_node_status(name, body)

    async def patch_node_status(self, name: str, status: JSON) -> JSON:
        """Merge ``status`` into the node's without a resourceVersion check (the ledger's
        report: fields no one else writes, derived again from the claims on every change)."""
        return await self._patch_node_status(name, {"status": status})

    async def _patch_node_status(self, name: str, body: JSON) -> JSON:
        out: JSON = await self._call(
            self.custom.patch_cluster_custom_object_status, GROUP, VERSION, NODES, name, body
        )
        return out

    # -- leases, config ----------------------------------------------------------------------

    async def list_leases(self, namespace: str) -> list[LeaseInfo]:
        out = await self._call(
            partial(self.coordination.list_namespaced_lease, _preload_content=False), namespace
        )
        return [parse_lease(item) for item in json.loads(out.data).get("items", [])]

    async def get_lease(self, namespace: str, name: str) -> LeaseInfo | None:
        """A live read of one Lease (never the watch cache): expiry is confirmed with it."""
        try:
            out = await self._call(
                partial(self.coordination.read_namespaced_lease, _preload_content=False),
                name,
                namespace,
            )
        except NotFoundError:
            return None
        return parse_lease(json.loads(out.data))

    # -- fencing: the Kubernetes Node and the claim's pods -------------------------------------

    async def node_taints(self, name: str) -> tuple[str, list[JSON]] | None:
        """The Kubernetes Node's resourceVersion and taints (one read), None when there is no
        such Node."""
        try:
            out = await self._call(partial(self.core.read_node, _preload_content=False), name)
        except NotFoundError:
            return None
        body = json.loads(out.data)
        taints = list((body.get("spec") or {}).get("taints") or [])
        return str(body["metadata"]["resourceVersion"]), taints

    async def nodes_tainted(self, key: str) -> list[str]:
        """Names of the Kubernetes Nodes carrying a taint with this key (one list)."""
        out = await self._call(partial(self.core.list_node, _preload_content=False))
        return [
            item["metadata"]["name"]
            for item in json.loads(out.data).get("items", [])
            if any(t.get("key") == key for t in (item.get("spec") or {}).get("taints") or [])
        ]

    async def set_node_taints(self, name: str, taints: list[JSON], resource_version: str) -> None:
        body = {"metadata": {"resourceVersion": resource_version}, "spec": {"taints": taints}}
        await self._call(self.core.patch_node, name, body)

    async def list_pods(self, namespace: str, label_selector: str) -> list[JSON]:
        out = await self._call(
            partial(
                self.core.list_namespaced_pod,
                label_selector=label_selector,
                _preload_content=False,
            ),
            namespace,
        )
        return list(json.loads(out.data).get("items", []))

    async def force_delete_pod(self, namespace: str, name: str) -> None:
        """Delete at once (grace 0): the node is fenced, its kubelet will never confirm."""
        try:
            await self._call(
                partial(self.core.delete_namespaced_pod, grace_period_seconds=0), name, namespace
            )
        except NotFoundError:
            return

    async def peering_status(self, name: str) -> JSON | None:
        try:
            out: JSON = await self._call(
                self.custom.get_cluster_custom_object,
                "kopf.dev",
                "v1",
                "clusterkopfpeerings",
                name,
            )
        except NotFoundError:
            return None
        return dict(out.get("status") or {})

    def post_event_soon(self, body: JSON, type_: str, reason: str, message: str) -> None:
        """Post an Event about ``body`` from outside kopf's handlers (kopf.event works only in
        them), in the background; a failure is logged, never raised."""
        meta = body.get("metadata") or {}
        namespace = meta.get("namespace") or "default"
        event = event_body(
            body, type_, reason, message, instance=self.instance, now=datetime.now(UTC)
        )

        async def post() -> None:
            try:
                await self._call(self._create_event, namespace, event)
            except Exception as exc:
                log.warning("could not post Event %s on %s: %s", reason, meta.get("name"), exc)

        task = asyncio.get_running_loop().create_task(post())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _create_event(self, namespace: str, event: JSON) -> None:
        """Create the Event from its JSON and without parsing the answer into models (building
        and parsing the client's models was most of the call's CPU, once per decision): read
        the answer to its end, so its connection returns to the pool."""
        answer = self.core.create_namespaced_event(namespace, event, _preload_content=False)
        answer.read()
        answer.release_conn()

    async def get_configmap_data(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            cm = await self._call(self.core.read_namespaced_config_map, name, namespace)
        except NotFoundError:
            return None
        return dict(cm.data or {})

    async def get_configmap(self, namespace: str, name: str) -> tuple[str, dict[str, str]] | None:
        """(resourceVersion, data) of a ConfigMap, or None when there is none."""
        try:
            cm = await self._call(self.core.read_namespaced_config_map, name, namespace)
        except NotFoundError:
            return None
        return str(cm.metadata.resource_version), dict(cm.data or {})

    async def write_configmap(
        self,
        namespace: str,
        name: str,
        resource_version: str | None,
        data: dict[str, str],
        previous: dict[str, str] | None = None,
    ) -> None:
        """Compare-and-swap write of a ConfigMap's data: a patch at ``resource_version`` (its
        labels and annotations stay; keys of ``previous`` not in ``data`` are removed), or a
        create when ``resource_version`` is None. ConflictError when it moved meanwhile."""
        if resource_version is None:
            body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name), data=data)
            await self._call(self.core.create_namespaced_config_map, namespace, body)
            return
        changes: dict[str, str | None] = {k: None for k in previous or {} if k not in data}
        changes.update(data)
        patch = {"metadata": {"resourceVersion": resource_version}, "data": changes}
        await self._call(self.core.patch_namespaced_config_map, name, namespace, patch)

    async def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except ApiException as exc:
            _raise_for(exc)
            raise  # pragma: no cover - _raise_for always raises


def event_body(
    body: JSON, type_: str, reason: str, message: str, *, instance: str | None, now: datetime
) -> JSON:
    """A core/v1 Event about the object ``body``, posted by this operator copy (``instance``),
    as the JSON the API server takes; the message cut at 1024 characters."""
    meta = body.get("metadata") or {}
    stamp = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta.get('name', 'object')}."},
        "involvedObject": {
            "apiVersion": body.get("apiVersion"),
            "kind": body.get("kind"),
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
        },
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": instance,
    }


def parse_claim(body: JSON) -> CapacityClaim:
    return CapacityClaim.model_validate(body)


def parse_node(body: JSON) -> CapacityNode:
    return CapacityNode.model_validate(body)


__all__ = ["ConflictError", "Kube", "LeaseInfo", "NotFoundError", "parse_claim", "parse_node"]
