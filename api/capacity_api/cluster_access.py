"""Which cluster a program talks to, decided the way kubectl finds it (DESIGN section 8).

Every program (``capacity-operator``, ``capacity-agent``, ``capctl``) looks, in this order, at:

1. ``--kubeconfig FILE`` (or the program's ``CAPACITY_*_KUBECONFIG`` setting): that file and only
   that file; a missing file is an error, never a fallback;
2. ``$KUBECONFIG``: a colon-separated list of files; those that exist are merged (a name defined
   in several files is taken from the first, and so is ``current-context``) and the missing ones
   are skipped; when none exists it is an error;
3. in-cluster: ``$KUBERNETES_SERVICE_HOST`` and ``$KUBERNETES_SERVICE_PORT`` set and the pod's
   service account token mounted;
4. ``~/.kube/config``.

:func:`choose_cluster` makes that decision from facts handed to it (:class:`ClusterFacts`), so
it is I/O-free and table-tested; each program's loader gathers the facts
(:meth:`ClusterFacts.gather`, with the real environment and ``os.path.isfile``), asks, and
loads the chosen source with the Kubernetes client. A failure is reported as one line,
``<program>: no cluster: <ClusterChoice.error>``, with :data:`EXIT_NO_CLUSTER`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
SERVICE_ACCOUNT_TOKEN = f"{SERVICE_ACCOUNT_DIR}/token"
"""The pod's service account token (in-cluster configuration)."""
SERVICE_ACCOUNT_NAMESPACE = f"{SERVICE_ACCOUNT_DIR}/namespace"
"""The pod's namespace, next to its token."""
HOME_KUBECONFIG = "~/.kube/config"
KUBECONFIG_SEPARATOR = os.pathsep
"""Separator of the files listed in ``$KUBECONFIG`` (``:``; ``;`` on Windows), as for kubectl."""

EXIT_NO_CLUSTER = 2
"""Exit code of every program when no cluster is configured or it cannot be reached."""


class ClusterSource(StrEnum):
    """Where the cluster's address and credentials come from."""

    FLAG = "--kubeconfig"
    ENV = "$KUBECONFIG"
    IN_CLUSTER = "in-cluster"
    HOME = "~/.kube/config"


@dataclass(frozen=True, slots=True)
class ClusterFacts:
    """What the choice depends on; every field as the process sees it."""

    flag: str | None = None
    """``--kubeconfig`` (or the program's kubeconfig setting); None or empty: not given."""
    kubeconfig_env: str | None = None
    """``$KUBECONFIG`` as set; None or empty: unset."""
    service_host: str | None = None
    """``$KUBERNETES_SERVICE_HOST``."""
    service_port: str | None = None
    """``$KUBERNETES_SERVICE_PORT``."""
    home_config: str | None = None
    """The path ``~/.kube/config`` expands to (None: no home directory)."""
    token_path: str = SERVICE_ACCOUNT_TOKEN
    """Where the service account token would be mounted."""
    existing: frozenset[str] = frozenset()
    """Which of :meth:`files` are regular files."""

    def files(self) -> tuple[str, ...]:
        """Every file whose existence the choice depends on (what a loader has to look at)."""
        paths = [self.flag or "", *kubeconfig_paths(self.kubeconfig_env)]
        paths += [self.token_path, self.home_config or ""]
        return tuple(dict.fromkeys(p for p in paths if p))

    @classmethod
    def gather(
        cls,
        flag: str | None,
        environ: Mapping[str, str],
        *,
        home: str | None,
        is_file: Callable[[str], bool],
        token_path: str = SERVICE_ACCOUNT_TOKEN,
    ) -> ClusterFacts:
        """The facts from an environment, a home directory and a file test (the loaders pass
        ``os.environ``, the user's home and ``os.path.isfile``)."""
        facts = cls(
            flag=flag or None,
            kubeconfig_env=environ.get("KUBECONFIG") or None,
            service_host=environ.get("KUBERNETES_SERVICE_HOST") or None,
            service_port=environ.get("KUBERNETES_SERVICE_PORT") or None,
            home_config=str(Path(home) / ".kube" / "config") if home else None,
            token_path=token_path,
        )
        return replace(facts, existing=frozenset(p for p in facts.files() if is_file(p)))


@dataclass(frozen=True, slots=True)
class ClusterChoice:
    """The source to load, or why there is none."""

    source: ClusterSource | None
    """None when nothing is configured at all."""
    kubeconfig: tuple[str, ...] = ()
    """The kubeconfig files to load, merged in this order (empty in-cluster)."""
    error: str | None = None
    """Why no cluster can be used (then the program stops); None when the choice is usable."""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def config_file(self) -> str | None:
        """The files as one ``config_file`` argument of the Kubernetes client (it merges a
        ``:``-separated list); None in-cluster."""
        return KUBECONFIG_SEPARATOR.join(self.kubeconfig) if self.kubeconfig else None

    def describe(self) -> str:
        """Where the configuration comes from, for messages: ``--kubeconfig k.yaml``,
        ``$KUBECONFIG a:b``, ``in-cluster service account``, ``/home/u/.kube/config``."""
        if self.source is ClusterSource.IN_CLUSTER:
            return "in-cluster service account"
        if self.source is ClusterSource.HOME:
            return self.config_file or HOME_KUBECONFIG
        if self.source is None:
            return "no configuration"
        return f"{self.source.value} {self.config_file or ''}".rstrip()


def kubeconfig_paths(value: str | None) -> tuple[str, ...]:
    """The files listed in ``$KUBECONFIG``, in order, without empty entries or repeats."""
    if not value:
        return ()
    return tuple(dict.fromkeys(p for p in value.split(KUBECONFIG_SEPARATOR) if p))


def choose_cluster(facts: ClusterFacts) -> ClusterChoice:
    """The cluster a program uses, from ``facts`` (see the module docstring for the order)."""
    if facts.flag:
        error = (
            None if facts.flag in facts.existing else f"--kubeconfig {facts.flag}: file not found"
        )
        return ClusterChoice(ClusterSource.FLAG, (facts.flag,), error)
    listed = kubeconfig_paths(facts.kubeconfig_env)
    if listed:
        return _from_env(listed, facts.existing)
    host, port = facts.service_host, facts.service_port
    token = facts.token_path in facts.existing
    if host and port and token:
        return ClusterChoice(ClusterSource.IN_CLUSTER)
    if facts.home_config and facts.home_config in facts.existing:
        return ClusterChoice(ClusterSource.HOME, (facts.home_config,))
    if host and not token:
        detail = f"$KUBERNETES_SERVICE_HOST is set but {facts.token_path} is missing"
    elif host:
        detail = "$KUBERNETES_SERVICE_HOST is set but $KUBERNETES_SERVICE_PORT is not"
    else:
        detail = "not in a pod ($KUBERNETES_SERVICE_HOST unset)"
    home = facts.home_config or HOME_KUBECONFIG
    return ClusterChoice(
        None, (), f"no --kubeconfig, $KUBECONFIG unset, {detail}, and {home} not found"
    )


def _from_env(listed: tuple[str, ...], existing: frozenset[str]) -> ClusterChoice:
    present = tuple(p for p in listed if p in existing)
    if present:
        return ClusterChoice(ClusterSource.ENV, present)
    what = "file not found" if len(listed) == 1 else "none of these files exists"
    names = KUBECONFIG_SEPARATOR.join(listed)
    return ClusterChoice(ClusterSource.ENV, listed, f"$KUBECONFIG {names}: {what}")


def merged_context(documents: Sequence[object]) -> tuple[str | None, str | None]:
    """``(current-context, its namespace)`` of kubeconfig files merged in order, as kubectl
    merges them: the first file that sets ``current-context`` names it, and the first file that
    defines a context of that name defines it. The Kubernetes Python client would take the last
    ``current-context``, so loaders pass this name to it explicitly. Documents that are not
    mappings (an empty file) are skipped; ``(None, None)`` when no file names a context."""
    maps = [d for d in documents if isinstance(d, Mapping)]
    name = next((str(d["current-context"]) for d in maps if d.get("current-context")), None)
    if name is None:
        return None, None
    for document in maps:
        for item in document.get("contexts") or []:
            if isinstance(item, Mapping) and item.get("name") == name:
                context = item.get("context")
                namespace = context.get("namespace") if isinstance(context, Mapping) else None
                return name, str(namespace) if namespace else None
    return name, None


def load_failure(exc: BaseException) -> str:
    """One line for a configuration that did not load: a YAML error by its line and problem
    (duck-typed on PyYAML's ``problem`` and ``problem_mark``), anything else by its text."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    line = getattr(mark, "line", None)
    if isinstance(problem, str) and isinstance(line, int):
        return f"invalid YAML at line {line + 1}: {problem}"
    return " ".join(str(exc).split()) or type(exc).__name__


def connection_failure(exc: BaseException) -> str:
    """A short reason for a failed connection, such as ``connection refused``, ``name or
    service not known`` or ``timed out``, from the exception the HTTP client raised (urllib3
    wraps the socket's OSError in ``reason`` attributes and in the exception chain); the
    innermost wrapped exception's own text otherwise."""
    chain: list[BaseException] = []
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop(0)
        if any(current is seen for seen in chain):
            continue
        chain.append(current)
        reason = getattr(current, "reason", None)
        linked = [reason, current.__cause__, current.__context__]
        pending.extend(e for e in linked if isinstance(e, BaseException))
    for current in chain:
        verify = getattr(current, "verify_message", None)  # ssl.SSLCertVerificationError
        if isinstance(verify, str) and verify:
            return f"TLS certificate verify failed: {verify}"
        if isinstance(current, OSError) and current.strerror:
            return current.strerror[:1].lower() + current.strerror[1:]
    if any(isinstance(e, TimeoutError) or "Timeout" in type(e).__name__ for e in chain):
        return "timed out"
    innermost = next((e for e in reversed(chain) if str(e)), exc)
    return " ".join(str(innermost).split()) or type(exc).__name__


__all__ = [
    "EXIT_NO_CLUSTER",
    "HOME_KUBECONFIG",
    "KUBECONFIG_SEPARATOR",
    "SERVICE_ACCOUNT_NAMESPACE",
    "SERVICE_ACCOUNT_TOKEN",
    "ClusterChoice",
    "ClusterFacts",
    "ClusterSource",
    "choose_cluster",
    "connection_failure",
    "kubeconfig_paths",
    "load_failure",
    "merged_context",
]
