"""How the operator finds its cluster, as kubectl does (DESIGN section 8).

:func:`capacity_api.cluster_access.choose_cluster` decides between ``--kubeconfig``,
``$KUBECONFIG``, the in-cluster service account and ``~/.kube/config``; :func:`load` gathers the
facts, asks, and loads the choice into a Kubernetes client ``Configuration``. The admission
engine's connection (:func:`http_session`, :func:`authorization`), the pod webhook's client
(:func:`api_client`) and kopf's connection (:func:`connection_info`, returned by the
``@kopf.on.login`` handler) are all built from that one configuration, so they always talk to
the same cluster with the same credentials. :func:`check_reachable` turns an absent or
unreachable API server into one line before kopf starts.
"""

from __future__ import annotations

import copy
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
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

CONNECT_TIMEOUT = 10.0
"""Seconds the admission engine's connection waits to connect to the API server."""
READ_TIMEOUT = 60.0
"""Seconds it waits for the next bytes of an answer: a stalled request fails instead of holding
its claim's step for ever, while a long list that keeps arriving is not cut short."""
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


def _token_header(c: Any) -> str | None:
    """The configuration's token as an ``Authorization`` value ("Bearer ..."), read anew: it
    calls the refresh hook, so a rotated service account token or an exec plugin's new token
    is what is read."""
    header: str | None = c.get_api_key_with_prefix("BearerToken") or c.get_api_key_with_prefix(
        "authorization"
    )
    return header or None


def authorization(access: ClusterAccess) -> str | None:
    """The ``Authorization`` header of ``access``, read anew on every call (see
    :func:`_token_header`), or basic credentials; None with neither (client certificates)."""
    c = access.configuration
    if header := _token_header(c):
        return header
    if c.username or c.password:
        basic: str = c.get_basic_auth_token()
        return basic
    return None


def ssl_context(access: ClusterAccess) -> ssl.SSLContext:
    """TLS towards the API server as the configuration says: its CA (or the system's), the
    client certificate when there is one, verification off only when the kubeconfig says
    ``insecure-skip-tls-verify``."""
    c = access.configuration
    context = ssl.create_default_context(cafile=c.ssl_ca_cert or None)
    if not c.verify_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if c.cert_file:
        context.load_cert_chain(c.cert_file, c.key_file or None)
    return context


def http_session(access: ClusterAccess, *, pool: int) -> aiohttp.ClientSession:
    """The admission engine's connection to the API server: aiohttp on the event loop, at most
    ``pool`` connections. Call it in a coroutine; the caller closes it.

    Not the Kubernetes client of :func:`api_client`: that one runs each call in a worker thread
    and builds and parses its request through its models, and measured on the local control
    plane it cost about 1.15 ms of CPU per request where aiohttp costs about 0.5 ms
    (docs/admission.md, "The engine's requests")."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ssl_context(access), limit=pool),
        timeout=aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT),
    )


def connection_info(access: ClusterAccess, *, trust_env: bool = False) -> kopf.ConnectionInfo:
    """kopf's credentials from the client configuration (what ``kopf.login_via_client`` does
    with the client's global default configuration, here with ours)."""
    c = access.configuration
    header = _token_header(c)
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
    "authorization",
    "check_reachable",
    "connection_info",
    "http_session",
    "load",
    "ssl_context",
]
