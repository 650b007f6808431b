"""How the operator finds its cluster, as kubectl does (DESIGN section 8).

:func:`capacity_api.cluster_access.choose_cluster` decides between ``--kubeconfig``,
``$KUBECONFIG``, the in-cluster service account and ``~/.kube/config``; :func:`load` gathers the
facts, asks, and loads the choice into a Kubernetes client ``Configuration``. The operator's own
client (:func:`api_client`) and kopf's connection (:func:`connection_info`, returned by the
``@kopf.on.login`` handler) are both built from that one configuration, so they always talk to
the same cluster with the same credentials. :func:`check_reachable` turns an absent or
unreachable API server into one line before kopf starts.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf
import urllib3
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

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

PROBE_TIMEOUT = (5.0, 10.0)
"""Seconds to connect to and then to hear from the API server when checking it at start."""


class ClusterAccessError(Exception):
    """No cluster configured, or its API server does not answer: one line for stderr."""


@dataclass(frozen=True, slots=True)
class ClusterAccess:
    """A loaded cluster configuration and where it came from."""

    choice: ClusterChoice
    configuration: Any
    """A ``kubernetes.client.Configuration``."""
    namespace: str | None
    """The kubeconfig context's namespace, or the pod's namespace in-cluster."""


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
    configuration = client.Configuration()
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
        raise ClusterAccessError(f"no cluster: {choice.describe()}: {load_failure(exc)}") from exc
    return ClusterAccess(choice, configuration, namespace)


def api_client(access: ClusterAccess, *, pool: int = 0) -> client.ApiClient:
    """The operator's Kubernetes client on ``access``, its connection pool at least ``pool``
    connections large: the worker threads share it, and a pool smaller than them throws
    connections away ("Connection pool is full, discarding connection") and redoes their TLS
    handshakes."""
    configuration = access.configuration
    configuration.connection_pool_maxsize = max(configuration.connection_pool_maxsize or 0, pool)
    return client.ApiClient(configuration)


def check_reachable(access: ClusterAccess) -> None:
    """Ask the API server for its version once; :class:`ClusterAccessError` when it cannot be
    reached or refuses the credentials."""
    probe = copy.deepcopy(access.configuration)
    probe.retries = 0  # one attempt, and no urllib3 "Retrying" warning in the log
    host = probe.host
    with client.ApiClient(probe) as api:
        try:
            # the raw response: whatever the body holds, an answer is all that is asked for
            client.VersionApi(api).get_code(
                _request_timeout=PROBE_TIMEOUT, _preload_content=False
            ).release_conn()
        except ApiException as exc:
            if exc.status == 401:
                raise ClusterAccessError(
                    f"the Kubernetes API server at {host} refused the credentials of "
                    f"{access.choice.describe()}: 401 Unauthorized"
                ) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ClusterAccessError(
                f"cannot reach the Kubernetes API server at {host}: {connection_failure(exc)}"
            ) from exc


def connection_info(access: ClusterAccess, *, trust_env: bool = False) -> kopf.ConnectionInfo:
    """kopf's credentials from the client configuration (what ``kopf.login_via_client`` does
    with the client's global default configuration, here with ours)."""
    c = access.configuration
    # calls the refresh hook: a rotated service account token or an exec plugin's new token
    header: str | None = c.get_api_key_with_prefix("BearerToken") or c.get_api_key_with_prefix(
        "authorization"
    )
    parts = header.split(" ", 1) if header else []
    scheme, token = (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else parts
    return kopf.ConnectionInfo(
        server=c.host,
        ca_path=c.ssl_ca_cert,
        insecure=not c.verify_ssl,
        username=c.username or None,
        password=c.password or None,
        scheme=scheme,
        token=token,
        certificate_path=c.cert_file,
        private_key_path=c.key_file,
        default_namespace=access.namespace,
        proxy_url=c.proxy or None,
        trust_env=trust_env,
    )


__all__ = [
    "ClusterAccess",
    "ClusterAccessError",
    "api_client",
    "check_reachable",
    "connection_info",
    "load",
]
