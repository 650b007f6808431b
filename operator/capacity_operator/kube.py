"""The operator's Kubernetes I/O: reads, and writes guarded by compare-and-swap.

kopf's own handler patches carry no resourceVersion precondition, so every protocol write goes
through :class:`Kube`: a merge patch that includes ``metadata.resourceVersion``, which the API
server turns into an optimistic-concurrency check (409 Conflict when the object moved on), or a
JSON patch whose leading ``test`` operations are the guard. A conflict raises
:class:`ConflictError`; callers re-read and re-decide.

The requests go out on the event loop through aiohttp (:func:`capacity_operator.cluster.
http_session`), with the JSON the API server takes and gives: no worker threads, no client
models (docs/admission.md, "The engine's requests").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import urllib.request
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from capacity_api import GROUP, VERSION, __version__
from capacity_api.lease import LeaseInfo, parse_lease
from capacity_api.models import CapacityClaim, CapacityNode
from capacity_operator.cluster import ClusterAccess, authorization, http_session

log = logging.getLogger(__name__)

COMPONENT = "capacity-operator"
"""Who posts the operator's Events (their source and reporting component)."""
CLAIMS = "capacityclaims"
NODES = "capacitynodes"
BALLOTS = "capacityballots"
JSON = dict[str, Any]

USER_AGENT = f"{COMPONENT}/{__version__}"
"""Who the API server's audit log and metrics name; ``fieldManager`` of every write too, so
that ``managedFields`` name this operator as the owner of what it writes."""
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"

_CUSTOM = f"/apis/{GROUP}/{VERSION}"
_LEASES = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"


class ApiError(RuntimeError):
    """The API server answered with an error status."""

    def __init__(self, status: int, reason: str, body: str) -> None:
        self.status = status
        self.reason = reason
        self.body = body
        super().__init__(f"({status}) {reason}: {_message(body)}")


class ConflictError(ApiError):
    """The object changed since it was read (HTTP 409)."""

    def __init__(self, reason: str = "Conflict", body: str = "") -> None:
        super().__init__(409, reason, body)


class NotFoundError(ApiError):
    """The object does not exist (HTTP 404)."""

    def __init__(self, reason: str = "Not Found", body: str = "") -> None:
        super().__init__(404, reason, body)


def api_error(status: int, reason: str, body: str) -> ApiError:
    """The error for an answer of ``status``: 409 and 404 get their own types."""
    if status == 409:
        return ConflictError(reason, body)
    if status == 404:
        return NotFoundError(reason, body)
    return ApiError(status, reason, body)


def _message(body: str) -> str:
    """The message of a ``Status`` answer, else the body itself (cut)."""
    try:
        message = json.loads(body).get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message) if message else body[:512]


def patch_not_applicable(body: str) -> bool:
    """A 422 from a JSON patch that could not be applied (a failed ``test``, a ``remove`` of
    what is not there): the API server names no field, unlike a validation failure."""
    try:
        details = json.loads(body or "{}").get("details") or {}
    except (ValueError, AttributeError):
        return False
    return not details.get("causes") and not details.get("name")


class Kube:
    """The operator's Kubernetes requests, made on the event loop (one aiohttp session of at
    most ``pool`` connections, opened on the first request; :meth:`close` closes it)."""

    def __init__(self, access: ClusterAccess, *, pool: int, instance: str | None = None) -> None:
        self.access = access
        self.pool = pool
        self.instance = instance
        """reportingInstance of the Events this copy posts."""
        c = access.configuration
        self.host = str(c.host).rstrip("/")
        self.server_hostname: str | None = c.tls_server_name or None
        # the proxy the Kubernetes client would use: the kubeconfig's proxy-url or
        # $HTTPS_PROXY, unless $NO_PROXY names the API server (the check is the stdlib's; its
        # stub leaves it out)
        hostname = urlsplit(self.host).hostname or ""
        bypass = urllib.request.proxy_bypass_environment(  # type: ignore[attr-defined]
            hostname, {"no": c.no_proxy or ""}
        )
        self.proxy: str | None = c.proxy if c.proxy and not bypass else None
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._background: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        """Close the connections; a request after this (a late background Event) fails."""
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: JSON | list[JSON] | None = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> JSON:
        """One request; the answer's JSON, or :class:`ApiError` (404 and 409 as
        :class:`NotFoundError` and :class:`ConflictError`)."""
        if self._session is None:
            if self._closed:
                raise RuntimeError("the operator's API connection is closed")
            self._session = http_session(self.access, pool=self.pool)
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if method in ("POST", "PUT", "PATCH"):
            params = {**(params or {}), "fieldManager": COMPONENT}
        if (auth := authorization(self.access)) is not None:
            headers["Authorization"] = auth
        data = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":"))
            headers["Content-Type"] = content_type
        async with self._session.request(
            method,
            self.host + path,
            data=data,
            headers=headers,
            params=params,
            proxy=self.proxy,
            server_hostname=self.server_hostname,
        ) as answer:
            raw = await answer.read()
            if answer.status >= 400:
                raise api_error(answer.status, answer.reason or "", raw.decode(errors="replace"))
        out: JSON = json.loads(raw)
        return out

    async def _items(self, path: str, params: Mapping[str, str] | None = None) -> list[JSON]:
        """The items of one list request."""
        out = await self.request("GET", path, params=params)
        return list(out.get("items", []))

    # -- claims ------------------------------------------------------------------------------

    async def get_claim(self, namespace: str, name: str) -> JSON:
        return await self.request("GET", f"{_CUSTOM}/namespaces/{namespace}/{CLAIMS}/{name}")

    async def list_claims(self) -> list[JSON]:
        return await self._items(f"{_CUSTOM}/{CLAIMS}")

    async def patch_claim_status_cas(
        self, namespace: str, name: str, resource_version: str, status: JSON
    ) -> JSON:
        body = {"metadata": {"resourceVersion": resource_version}, "status": status}
        return await self.request(
            "PATCH",
            f"{_CUSTOM}/namespaces/{namespace}/{CLAIMS}/{name}/status",
            body=body,
            content_type=MERGE_PATCH,
        )

    async def patch_claim_status_guarded(self, namespace: str, name: str, ops: list[JSON]) -> JSON:
        """A JSON patch of the claim's status whose leading ``test`` operations are the guard:
        when one fails (the guarded fields moved on), :class:`ConflictError`. Unlike the
        resourceVersion check, an agent's vote landing meanwhile does not fail it."""
        try:
            return await self.request(
                "PATCH",
                f"{_CUSTOM}/namespaces/{namespace}/{CLAIMS}/{name}/status",
                body=ops,
                content_type=JSON_PATCH,
            )
        except ApiError as exc:
            if exc.status == 422 and patch_not_applicable(exc.body):
                raise ConflictError(
                    f"{namespace}/{name}: guarded status moved on", exc.body
                ) from exc
            raise

    # -- nodes -------------------------------------------------------------------------------

    async def get_node(self, name: str) -> JSON:
        return await self.request("GET", f"{_CUSTOM}/{NODES}/{name}")

    async def list_nodes(self) -> list[JSON]:
        return await self._items(f"{_CUSTOM}/{NODES}")

    async def delete_ballot(self, name: str) -> None:
        """Delete a node's CapacityBallot (its CapacityNode is gone); a missing one is fine."""
        with contextlib.suppress(NotFoundError):
            await self.request("DELETE", f"{_CUSTOM}/{BALLOTS}/{name}")

    async def patch_node_status_cas(self, name: str, resource_version: str, status: JSON) -> JSON:
        body = {"metadata": {"resourceVersion": resource_version}, "status": status}
        return await self._patch_node_status(name, body)

    async def patch_node_status(self, name: str, status: JSON) -> JSON:
        """Merge ``status`` into the node's without a resourceVersion check (the ledger's
        report: fields no one else writes, derived again from the claims on every change)."""
        return await self._patch_node_status(name, {"status": status})

    async def _patch_node_status(self, name: str, body: JSON) -> JSON:
        return await self.request(
            "PATCH", f"{_CUSTOM}/{NODES}/{name}/status", body=body, content_type=MERGE_PATCH
        )

    # -- leases, config ----------------------------------------------------------------------

    async def list_leases(self, namespace: str) -> list[LeaseInfo]:
        return [
            parse_lease(item) for item in await self._items(_LEASES.format(namespace=namespace))
        ]

    async def get_lease(self, namespace: str, name: str) -> LeaseInfo | None:
        """A live read of one Lease (never the watch cache): expiry is confirmed with it."""
        try:
            out = await self.request("GET", f"{_LEASES.format(namespace=namespace)}/{name}")
        except NotFoundError:
            return None
        return parse_lease(out)

    # -- fencing: the Kubernetes Node and the claim's pods -------------------------------------

    async def node_taints(self, name: str) -> tuple[str, list[JSON]] | None:
        """The Kubernetes Node's resourceVersion and taints (one read), None when there is no
        such Node."""
        try:
            body = await self.request("GET", f"/api/v1/nodes/{name}")
        except NotFoundError:
            return None
        taints = list((body.get("spec") or {}).get("taints") or [])
        return str(body["metadata"]["resourceVersion"]), taints

    async def nodes_tainted(self, key: str) -> list[str]:
        """Names of the Kubernetes Nodes carrying a taint with this key (one list)."""
        return [
            item["metadata"]["name"]
            for item in await self._items("/api/v1/nodes")
            if any(t.get("key") == key for t in (item.get("spec") or {}).get("taints") or [])
        ]

    async def set_node_taints(self, name: str, taints: list[JSON], resource_version: str) -> None:
        body = {"metadata": {"resourceVersion": resource_version}, "spec": {"taints": taints}}
        await self.request(
            "PATCH", f"/api/v1/nodes/{name}", body=body, content_type=STRATEGIC_MERGE_PATCH
        )

    async def list_pods(self, namespace: str, label_selector: str) -> list[JSON]:
        return await self._items(
            f"/api/v1/namespaces/{namespace}/pods", {"labelSelector": label_selector}
        )

    async def force_delete_pod(self, namespace: str, name: str) -> None:
        """Delete at once (grace 0): the node is fenced, its kubelet will never confirm."""
        with contextlib.suppress(NotFoundError):
            await self.request(
                "DELETE",
                f"/api/v1/namespaces/{namespace}/pods/{name}",
                params={"gracePeriodSeconds": "0"},
            )

    # -- kopf's peering ----------------------------------------------------------------------

    async def ensure_peering_object(self, name: str) -> None:
        """kopf reads peers from a ClusterKopfPeering object it does not create itself;
        without it, copies cannot see each other and would all act."""
        body = {
            "apiVersion": "kopf.dev/v1",
            "kind": "ClusterKopfPeering",
            "metadata": {"name": name},
        }
        with contextlib.suppress(ConflictError):  # it exists
            await self.request("POST", "/apis/kopf.dev/v1/clusterkopfpeerings", body=body)

    async def peering_status(self, name: str) -> JSON | None:
        try:
            out = await self.request("GET", f"/apis/kopf.dev/v1/clusterkopfpeerings/{name}")
        except NotFoundError:
            return None
        return dict(out.get("status") or {})

    # -- Events ------------------------------------------------------------------------------

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
                await self.request("POST", f"/api/v1/namespaces/{namespace}/events", body=event)
            except Exception as exc:
                log.warning("could not post Event %s on %s: %s", reason, meta.get("name"), exc)

        task = asyncio.get_running_loop().create_task(post())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- ConfigMaps --------------------------------------------------------------------------

    async def get_configmap_data(self, namespace: str, name: str) -> dict[str, str] | None:
        found = await self.get_configmap(namespace, name)
        return None if found is None else found[1]

    async def get_configmap(self, namespace: str, name: str) -> tuple[str, dict[str, str]] | None:
        """(resourceVersion, data) of a ConfigMap, or None when there is none."""
        try:
            cm = await self.request("GET", f"/api/v1/namespaces/{namespace}/configmaps/{name}")
        except NotFoundError:
            return None
        return str(cm["metadata"]["resourceVersion"]), dict(cm.get("data") or {})

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
        create when ``resource_version`` is None. ConflictError when it moved meanwhile (or,
        for a create, when another copy created it first)."""
        path = f"/api/v1/namespaces/{namespace}/configmaps"
        if resource_version is None:
            body: JSON = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": name},
                "data": data,
            }
            await self.request("POST", path, body=body)
            return
        changes: dict[str, str | None] = {k: None for k in previous or {} if k not in data}
        changes.update(data)
        patch = {"metadata": {"resourceVersion": resource_version}, "data": changes}
        await self.request("PATCH", f"{path}/{name}", body=patch, content_type=MERGE_PATCH)


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


__all__ = [
    "ApiError",
    "ConflictError",
    "Kube",
    "LeaseInfo",
    "NotFoundError",
    "api_error",
    "parse_claim",
    "parse_node",
    "patch_not_applicable",
]
