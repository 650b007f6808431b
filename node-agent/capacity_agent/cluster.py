"""How the agent finds its cluster, as kubectl does (DESIGN section 8).

:func:`capacity_api.cluster_access.choose_cluster` decides between ``--kubeconfig``,
``$KUBECONFIG``, the in-cluster service account and ``~/.kube/config``; :func:`load` gathers the
facts, asks, and loads the choice into a Kubernetes client ``Configuration``;
:func:`check_reachable` turns an absent or unreachable API server into one line at start. (The
operator has its own copy of this loader: the agent and the operator never import each other, and
``capacity_api`` holds no Kubernetes client.)
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    """The agent's Kubernetes client on ``access``, its connection pool at least ``pool``
    connections large (the worker thread pool's size)."""
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


__all__ = ["ClusterAccess", "ClusterAccessError", "api_client", "check_reachable", "load"]
