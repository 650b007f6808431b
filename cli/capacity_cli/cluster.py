"""capctl's cluster access: finding the cluster as kubectl does, and reading claims, the
voters' CapacityBallots, events, CapacityNodes, node Leases and the calibration ConfigMap.

:func:`load_client` asks :func:`capacity_api.cluster_access.choose_cluster` which source to use
(``--kubeconfig``, ``$KUBECONFIG``, in-cluster, ``~/.kube/config``) and loads it. Every read
returns parsed models for the pure renderers, or raises :class:`CapctlError` with one line.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from capacity_api import GROUP, VERSION
from capacity_api.cluster_access import (
    SERVICE_ACCOUNT_NAMESPACE,
    SERVICE_ACCOUNT_TOKEN,
    ClusterFacts,
    ClusterSource,
    choose_cluster,
    connection_failure,
    load_failure,
    merged_context,
)
from capacity_api.gates import CALIBRATION_CONFIGMAP
from capacity_api.lease import LeaseInfo, parse_lease
from capacity_api.models import CapacityBallot, CapacityClaim, CapacityNode
from capacity_cli.errors import EXIT_UNREACHABLE, CapctlError
from capacity_cli.explain import Calibration, EventInfo
from capacity_cli.output import aware

PLATFORM_NAMESPACE = "capacity-system"
"""Where the calibration ConfigMap and the node Leases live (the operator's default)."""
REQUEST_TIMEOUT = (5.0, 30.0)
"""Seconds to connect to and then to hear from the API server before capctl gives up."""


def _warn(message: str) -> None:
    print(f"capctl: warning: {message}", file=sys.stderr)


def _api_reason(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    return f"{exc.status} {exc.reason}" + (f": {message}" if message else "")


def _missing_kind(exc: ApiException) -> bool:
    """A 404 for the resource type itself (CRD not installed), not for one object."""
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        return True
    details = body.get("details") if isinstance(body, dict) else None
    return not (isinstance(details, dict) and details.get("name"))


def event_info(event: Any) -> EventInfo:
    """An :class:`EventInfo` from a ``kubernetes.client.CoreV1Event``."""
    meta = event.metadata
    when = (
        event.last_timestamp
        or event.event_time
        or event.first_timestamp
        or (meta.creation_timestamp if meta is not None else None)
    )
    source = ""
    if event.source is not None and event.source.component:
        source = str(event.source.component)
    elif event.reporting_component:
        source = str(event.reporting_component)
    return EventInfo(
        type=str(event.type or ""),
        reason=str(event.reason or ""),
        message=str(event.message or ""),
        time=aware(when) if isinstance(when, datetime) else None,
        count=int(event.count or 1),
        source=source,
    )


def load_client(kubeconfig: str | None) -> tuple[client.ApiClient, str | None]:
    """An API client and the namespace of the current context (the pod's namespace in-cluster;
    None when it names none).

    The cluster is found as kubectl finds it: ``--kubeconfig``, else ``$KUBECONFIG``, else the
    in-cluster service account, else ``~/.kube/config``
    (:func:`capacity_api.cluster_access.choose_cluster`).
    """
    home = os.path.expanduser("~")
    facts = ClusterFacts.gather(
        kubeconfig,
        os.environ,
        home=None if home == "~" else home,
        is_file=os.path.isfile,
        token_path=SERVICE_ACCOUNT_TOKEN,
    )
    choice = choose_cluster(facts)
    if not choice.ok:
        raise CapctlError(f"no cluster: {choice.error}", EXIT_UNREACHABLE)
    configuration = client.Configuration()
    namespace: str | None
    try:
        if choice.source is ClusterSource.IN_CLUSTER:
            config.load_incluster_config(client_configuration=configuration)
            ns_file = Path(SERVICE_ACCOUNT_NAMESPACE)
            namespace = (ns_file.read_text().strip() if ns_file.is_file() else "") or None
        else:
            documents = [yaml.safe_load(Path(p).read_text()) for p in choice.kubeconfig]
            context, namespace = merged_context(documents)
            config.load_kube_config(
                config_file=choice.config_file,
                context=context,
                client_configuration=configuration,
                persist_config=False,
            )
    except Exception as exc:  # any failure to load is the user's configuration: one line
        raise CapctlError(
            f"no cluster: {choice.describe()}: {load_failure(exc)}", EXIT_UNREACHABLE
        ) from exc
    configuration.retries = 1
    return client.ApiClient(configuration), namespace


def unreachable(api: client.ApiClient, exc: BaseException) -> CapctlError:
    """The one-line error for an API server that could not be reached."""
    host = api.configuration.host
    return CapctlError(
        f"cannot reach the Kubernetes API server at {host}: {connection_failure(exc)}",
        EXIT_UNREACHABLE,
    )


def read_claim(api: client.ApiClient, namespace: str, name: str) -> CapacityClaim:
    """The claim ``namespace/name``; :class:`CapctlError` when it is missing or does not parse."""
    custom = client.CustomObjectsApi(api)
    try:
        body = custom.get_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            CapacityClaim.plural,
            name,
            _request_timeout=REQUEST_TIMEOUT,
        )
    except ApiException as exc:
        if exc.status == 404:
            if _missing_kind(exc):
                raise CapctlError(
                    f"the CapacityClaim API ({CapacityClaim.plural}.{GROUP}) is not installed "
                    "on this cluster; apply the CRDs first"
                ) from exc
            raise CapctlError(f"capacityclaim {namespace}/{name} not found") from exc
        raise CapctlError(
            f"cannot read capacityclaim {namespace}/{name}: {_api_reason(exc)}"
        ) from exc
    try:
        return CapacityClaim.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CapctlError(
            f"capacityclaim {namespace}/{name} does not parse: {where}: {first['msg']}"
        ) from exc


def read_ballots(api: client.ApiClient, nodes: Iterable[str]) -> dict[str, CapacityBallot] | None:
    """The CapacityBallots of ``nodes`` that exist, by node (a missing one: that node has not
    voted); None when the CapacityBallot API is not installed (a platform that keeps votes in
    the claim). A ballot that cannot be read or parsed is left out with a warning."""
    custom = client.CustomObjectsApi(api)
    ballots: dict[str, CapacityBallot] = {}
    for node in dict.fromkeys(nodes):
        try:
            body = custom.get_cluster_custom_object(
                GROUP, VERSION, CapacityBallot.plural, node, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as exc:
            if exc.status == 404:
                if _missing_kind(exc):
                    return None
                continue
            _warn(f"cannot read capacityballot {node}: {_api_reason(exc)}; its vote is not shown")
            continue
        try:
            ballots[node] = CapacityBallot.model_validate(body)
        except ValidationError as exc:
            _warn(
                f"capacityballot {node} does not parse ({exc.error_count()} errors); "
                "its vote is not shown"
            )
    return ballots


def read_calibration(api: client.ApiClient, namespace: str) -> Calibration:
    """The thresholds of the calibration ConfigMap, or the defaults saying why."""
    core = client.CoreV1Api(api)
    where = f"{namespace}/{CALIBRATION_CONFIGMAP}"
    try:
        cm = core.read_namespaced_config_map(
            CALIBRATION_CONFIGMAP, namespace, _request_timeout=REQUEST_TIMEOUT
        )
    except ApiException as exc:
        if exc.status == 404:
            return Calibration.from_configmap(None, f"defaults: ConfigMap {where} not found")
        _warn(f"cannot read ConfigMap {where}: {_api_reason(exc)}; using default thresholds")
        return Calibration.from_configmap(None, f"defaults: ConfigMap {where} not readable")
    return Calibration.from_configmap(dict(cm.data or {}), f"ConfigMap {where}")


def read_events(api: client.ApiClient, claim: CapacityClaim) -> list[EventInfo]:
    """The claim's Events (none, with a warning, when they cannot be listed)."""
    uid = claim.metadata.uid
    if not uid:
        return []
    core = client.CoreV1Api(api)
    try:
        out = core.list_namespaced_event(
            claim.metadata.namespace or "default",
            field_selector=f"involvedObject.uid={uid}",
            _request_timeout=REQUEST_TIMEOUT,
        )
    except ApiException as exc:
        _warn(f"cannot list events: {_api_reason(exc)}")
        return []
    return [event_info(item) for item in out.items]


def read_nodes(api: client.ApiClient) -> list[CapacityNode]:
    """Every CapacityNode that parses (the others are skipped with a warning)."""
    custom = client.CustomObjectsApi(api)
    try:
        out = custom.list_cluster_custom_object(
            GROUP, VERSION, CapacityNode.plural, _request_timeout=REQUEST_TIMEOUT
        )
    except ApiException as exc:
        if exc.status == 404:
            raise CapctlError(
                f"the CapacityNode API ({CapacityNode.plural}.{GROUP}) is not installed on this "
                "cluster; apply the CRDs first"
            ) from exc
        raise CapctlError(f"cannot list capacitynodes: {_api_reason(exc)}") from exc
    nodes = []
    for item in out.get("items", []):
        try:
            nodes.append(CapacityNode.model_validate(item))
        except ValidationError as exc:
            name = (item.get("metadata") or {}).get("name", "?")
            _warn(f"skipping capacitynode {name}: it does not parse ({exc.error_count()} errors)")
    return nodes


def read_leases(api: client.ApiClient, namespace: str) -> dict[str, LeaseInfo]:
    """The Leases of ``namespace`` by name (none, with a warning, when they cannot be listed)."""
    coordination = client.CoordinationV1Api(api)
    try:
        out = coordination.list_namespaced_lease(
            namespace, _request_timeout=REQUEST_TIMEOUT, _preload_content=False
        )
    except ApiException as exc:
        _warn(f"cannot list leases in {namespace}: {_api_reason(exc)}")
        return {}
    leases = [parse_lease(item) for item in json.loads(out.data).get("items", [])]
    return {lease.name: lease for lease in leases}


__all__ = [
    "PLATFORM_NAMESPACE",
    "REQUEST_TIMEOUT",
    "event_info",
    "load_client",
    "read_ballots",
    "read_calibration",
    "read_claim",
    "read_events",
    "read_leases",
    "read_nodes",
    "unreachable",
]
