"""How the agent finds its cluster, as kubectl does (DESIGN section 8), and its Kubernetes client.

:func:`capacity_api.cluster_access.choose_cluster` decides between ``--kubeconfig``,
``$KUBECONFIG``, the in-cluster service account and ``~/.kube/config``; :func:`load` gathers the
facts, asks, and loads the choice into a lightkube ``SingleConfig``; :func:`check_reachable`
turns an absent or unreachable API server into one line at start; :func:`api_client` builds the
one client the agent's threads share. (The operator has its own loader, for the ``kubernetes``
client: the agent and the operator never import each other, and ``capacity_api`` holds no
Kubernetes client.)

The agent talks to the API server through ``lightkube`` rather than the official ``kubernetes``
client: importing the latter costs about 35 MiB of the agent's resident memory, lightkube about
5 MiB (docs/agent.md has the measurements). This module also holds what the agent's API callers
share: the CapacityNode and CapacityClaim resources, and how a failed request is told apart
(:func:`http_status`) and described in one line (:func:`describe_failure`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import yaml
from lightkube import ApiError, Client, ConfigError, KubeConfig, SingleConfig
from lightkube.config import client_adapter
from lightkube.config.models import Cluster, User
from lightkube.generic_resource import create_global_resource, create_namespaced_resource
from lightkube.resources.coordination_v1 import Lease
from lightkube.types import OnErrorAction, OnErrorResult

from capacity_api import GROUP, VERSION
from capacity_api.cluster_access import (
    SERVICE_ACCOUNT_NAMESPACE,
    SERVICE_ACCOUNT_TOKEN,
    ClusterChoice,
    ClusterFacts,
    ClusterSource,
    choose_cluster,
    connection_failure,
    load_failure,
    merged_context,
)
from capacity_api.lease import LeaseInfo, parse_lease
from capacity_api.models import ASKED_FIELDS, CapacityBallot, CapacityClaim, CapacityNode

PROBE_TIMEOUT = httpx2.Timeout(10.0, connect=5.0)
"""Seconds to connect to and then to hear from the API server when checking it at start."""
CLAIM_WATCHES = len(ASKED_FIELDS)
"""The most claims watches an agent process keeps open (one per selectable field)."""

CapacityNodes = create_global_resource(GROUP, VERSION, CapacityNode.kind, CapacityNode.plural)
"""The CapacityNode resource for lightkube (objects come back as dicts)."""
CapacityBallots = create_global_resource(GROUP, VERSION, CapacityBallot.kind, CapacityBallot.plural)
"""The CapacityBallot resource for lightkube (objects come back as dicts)."""
CapacityClaims = create_namespaced_resource(
    GROUP, VERSION, CapacityClaim.kind, CapacityClaim.plural
)
"""The CapacityClaim resource for lightkube (objects come back as dicts)."""

PATH_FIELDS = {
    "clusters": ("certificate-authority",),
    "users": ("client-certificate", "client-key", "tokenFile"),
    "contexts": (),
}
"""Fields of kubeconfig entries that name files, relative to the file that defines the entry."""
ENTRY_KEYS = {"clusters": "cluster", "users": "user", "contexts": "context"}


class ClusterAccessError(Exception):
    """No cluster configured, or its API server does not answer: one line for stderr."""


@dataclass(frozen=True, slots=True)
class ClusterAccess:
    """A loaded cluster configuration and where it came from."""

    choice: ClusterChoice
    config: SingleConfig
    """The cluster, the user and the context as lightkube takes them."""
    namespace: str | None
    """The kubeconfig context's namespace, or the pod's namespace in-cluster."""

    @property
    def server(self) -> str:
        return self.config.cluster.server


def load(kubeconfig: str | None) -> ClusterAccess:
    """The cluster configuration ``--kubeconfig`` (None: not given) and the environment
    select; :class:`ClusterAccessError` when there is none or it does not load."""
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
        raise ClusterAccessError(f"no cluster: {choice.error}")
    try:
        if choice.source is ClusterSource.IN_CLUSTER:
            config, namespace = _in_cluster()
        else:
            documents = [yaml.safe_load(Path(p).read_text()) for p in choice.kubeconfig]
            context, namespace = merged_context(documents)
            files = [Path(p) for p in choice.kubeconfig]
            config = _select(KubeConfig.from_dict(merge_kubeconfigs(files, documents)), context)
    except Exception as exc:  # any failure to load is the user's configuration: one line
        raise ClusterAccessError(f"no cluster: {choice.describe()}: {load_failure(exc)}") from exc
    if config.user is None:  # a context without a user: no credentials, as kubectl sends none
        config = config._replace(user=User())
    return ClusterAccess(choice, config, namespace)


def _in_cluster() -> tuple[SingleConfig, str | None]:
    """The pod's service account: the token is read from its file, and read again when the API
    server refuses it (the kubelet rotates it); the CA next to it."""
    token = Path(SERVICE_ACCOUNT_TOKEN)
    ns_file = Path(SERVICE_ACCOUNT_NAMESPACE)
    namespace = (ns_file.read_text().strip() if ns_file.is_file() else "") or None
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    port = os.environ["KUBERNETES_SERVICE_PORT"]
    host = f"[{host}]" if ":" in host else host
    ca = str(token.parent / "ca.crt")
    cluster = Cluster(server=f"https://{host}:{port}", certificate_auth=ca)
    kube = KubeConfig.from_one(cluster=cluster, user=User(token_file=str(token)))
    return _select(kube, None), namespace


def _select(kube: KubeConfig, context: str | None) -> SingleConfig:
    """The context ``context`` (None: the current one) of ``kube``, with its cluster and user."""
    try:
        config = kube.get(context)
    except KeyError as exc:  # lightkube looks the context's cluster and user up without a check
        raise ConfigError(f"context {context!r} refers to {exc.args[0]!r}, not defined") from exc
    if config is None:  # only with a default, which is never given
        raise ConfigError("no current context")
    return config


def merge_kubeconfigs(files: Sequence[Path], documents: Sequence[object]) -> dict[str, Any]:
    """Kubeconfig ``documents`` (read from ``files``) merged as kubectl merges them: a cluster,
    user or context defined in several files is taken from the first, and so is
    ``current-context``; a relative file name in an entry is taken relative to the file that
    defines the entry. Documents that are not mappings (an empty file) are skipped."""
    merged: dict[str, Any] = {key: [] for key in ENTRY_KEYS}
    seen: dict[str, set[str]] = {key: set() for key in ENTRY_KEYS}
    for path, document in zip(files, documents, strict=True):
        if not isinstance(document, Mapping):
            continue
        if "current-context" not in merged and document.get("current-context"):
            merged["current-context"] = str(document["current-context"])
        for key, inner in ENTRY_KEYS.items():
            for item in document.get(key) or []:
                if not isinstance(item, Mapping) or "name" not in item:
                    continue
                name = str(item["name"])
                if name in seen[key]:
                    continue
                seen[key].add(name)
                entry = dict(item.get(inner) or {})
                for field in PATH_FIELDS[key]:
                    value = entry.get(field)
                    if value and not Path(str(value)).is_absolute():
                        entry[field] = str(path.parent / str(value))
                merged[key].append({"name": name, inner: entry})
    return merged


def check_reachable(access: ClusterAccess) -> None:
    """Ask the API server for its version once; :class:`ClusterAccessError` when it cannot be
    reached or refuses the credentials."""
    server = access.server
    try:
        http = client_adapter.Client(
            access.config,
            client_adapter.ConnectionParams(timeout=PROBE_TIMEOUT, trust_env=False),
        )
    except Exception as exc:  # unreadable CA or client certificate, unsupported auth: one line
        raise ClusterAccessError(
            f"no cluster: {access.choice.describe()}: {load_failure(exc)}"
        ) from exc
    with http:
        try:
            # whatever the body holds, an answer is all that is asked for
            status = http.get("/version").status_code
        except httpx2.HTTPError as exc:
            raise ClusterAccessError(
                f"cannot reach the Kubernetes API server at {server}: {connection_failure(exc)}"
            ) from exc
        except (ConfigError, OSError) as exc:  # an exec credential plugin that failed
            raise ClusterAccessError(
                f"no cluster: {access.choice.describe()}: {load_failure(exc)}"
            ) from exc
    if status == 401:
        raise ClusterAccessError(
            f"the Kubernetes API server at {server} refused the credentials of "
            f"{access.choice.describe()}: 401 Unauthorized"
        )


def connection_limits(pool: int) -> httpx2.Limits:
    """httpx's default limits (100 connections, 20 kept open when idle), raised so that every
    worker thread and the claims watches keep a connection of their own: a smaller pool closes
    connections after use and redoes their TLS handshakes."""
    wanted = pool + CLAIM_WATCHES
    return httpx2.Limits(
        max_connections=max(100, wanted), max_keepalive_connections=max(20, wanted)
    )


def api_client(access: ClusterAccess, *, pool: int = 0, timeout: float = 10.0) -> Client:
    """The agent's Kubernetes client on ``access``, shared by its threads: at least ``pool``
    pooled connections (the worker thread pool's size); every request but a watch fails after
    ``timeout`` seconds without an answer (5 s at most to connect). Proxy variables of the
    environment are ignored, as the ``kubernetes`` client ignored them."""
    config = access.config
    assert config.user is not None  # load() puts an empty user in a context without one
    verify = client_adapter.verify_cluster(
        config.cluster, config.user, config.abs_file, trust_env=False
    )
    transport = httpx2.HTTPTransport(verify=verify, limits=connection_limits(pool))
    return Client(
        config,
        timeout=httpx2.Timeout(timeout, connect=min(5.0, timeout)),
        trust_env=False,
        transport=transport,
    )


# ---------------------------------------------------------------------------------------------
# What the agent's API callers share


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of a failed request (404, 409, 410, 422, ...); None when the request
    got no answer (refused, timed out) or the failure is not a request's."""
    if isinstance(exc, ApiError):
        code = exc.status.code
        if code is None and exc.response is not None:
            return exc.response.status_code
        return code
    if isinstance(exc, httpx2.HTTPStatusError):  # an error answer that is not a Status object
        return exc.response.status_code
    return None


def describe_failure(exc: BaseException) -> str:
    """A failed request in a few words: ``409 Conflict``, ``ConnectError: connection refused``,
    ``ReadTimeout: timed out``; anything else by its type and first line."""
    code = http_status(exc)
    if code is not None:
        reason = exc.status.reason if isinstance(exc, ApiError) else None
        if not reason and isinstance(exc, httpx2.HTTPStatusError) and exc.response is not None:
            reason = exc.response.reason_phrase
        return f"{code} {reason or ''}".rstrip()
    if isinstance(exc, httpx2.TransportError):
        return f"{type(exc).__name__}: {connection_failure(exc)}"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def raise_releasing(exc: Exception, count: int) -> OnErrorResult:
    """A watch's error handler (lightkube's ``on_error``): raise, after closing an error answer
    the watch did not read, which would otherwise keep its pooled connection busy."""
    del count  # lightkube passes the number of consecutive errors
    if isinstance(exc, httpx2.HTTPStatusError) and exc.response is not None:
        exc.response.close()
    return OnErrorResult(OnErrorAction.RAISE)


def lease_info(lease: Lease) -> LeaseInfo:
    """A Lease as lightkube decodes it, read by the platform's one rule for Leases."""
    return parse_lease(lease.to_dict())


__all__ = [
    "CapacityBallots",
    "CapacityClaims",
    "CapacityNodes",
    "ClusterAccess",
    "ClusterAccessError",
    "api_client",
    "check_reachable",
    "connection_limits",
    "describe_failure",
    "http_status",
    "lease_info",
    "load",
    "merge_kubeconfigs",
    "raise_releasing",
]
