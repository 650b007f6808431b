"""Finding the cluster as kubectl does: the pure choice (--kubeconfig, $KUBECONFIG, in-cluster,
~/.kube/config), merged kubeconfig contexts, and one-line reasons for failures."""

from __future__ import annotations

import errno
import socket
import ssl
from dataclasses import dataclass

import pytest
import yaml

from capacity_api.cluster_access import (
    SERVICE_ACCOUNT_TOKEN,
    ClusterChoice,
    ClusterFacts,
    ClusterSource,
    choose_cluster,
    connection_failure,
    kubeconfig_paths,
    load_failure,
    merged_context,
)

HOME = "/home/u/.kube/config"
TOKEN = SERVICE_ACCOUNT_TOKEN
POD = {"service_host": "10.96.0.1", "service_port": "443"}


@dataclass(frozen=True)
class Case:
    name: str
    facts: ClusterFacts
    source: ClusterSource | None
    kubeconfig: tuple[str, ...] = ()
    error: str | None = None


def facts(*existing: str, **kwargs: str) -> ClusterFacts:
    return ClusterFacts(home_config=HOME, existing=frozenset(existing), **kwargs)


NOTHING = "no --kubeconfig, $KUBECONFIG unset"
NOT_IN_POD = "not in a pod ($KUBERNETES_SERVICE_HOST unset)"
FLAG, ENV, IN_CLUSTER = ClusterSource.FLAG, ClusterSource.ENV, ClusterSource.IN_CLUSTER
AT_HOME = (ClusterSource.HOME, (HOME,))
EVERYTHING = ("/f", "/e", TOKEN, HOME)

CASES = [
    # name, facts, expected source, kubeconfig files, error
    Case("flag wins", facts(*EVERYTHING, flag="/f", kubeconfig_env="/e", **POD), FLAG, ("/f",)),
    Case(
        "a missing flag file is an error, not a fallback",
        facts("/e", TOKEN, HOME, flag="/f", kubeconfig_env="/e", **POD),
        FLAG,
        ("/f",),
        "--kubeconfig /f: file not found",
    ),
    Case(
        "env over in-cluster and home", facts(*EVERYTHING, kubeconfig_env="/e", **POD), ENV, ("/e",)
    ),
    Case(
        "env lists files: the existing ones, in order, once",
        facts("/c", "/a", kubeconfig_env="/a:/b::/c:/a"),
        ENV,
        ("/a", "/c"),
    ),
    Case(
        "env naming a missing file is an error",
        facts(TOKEN, HOME, kubeconfig_env="/e", **POD),
        ENV,
        ("/e",),
        "$KUBECONFIG /e: file not found",
    ),
    Case(
        "env naming only missing files is an error",
        facts(HOME, kubeconfig_env="/a:/b"),
        ENV,
        ("/a", "/b"),
        "$KUBECONFIG /a:/b: none of these files exists",
    ),
    Case("an empty env is unset", facts(HOME, kubeconfig_env=""), *AT_HOME),
    Case("an empty flag is not given", facts(HOME, flag=""), *AT_HOME),
    Case("in-cluster over ~/.kube/config", facts(TOKEN, HOME, **POD), IN_CLUSTER),
    Case("in a pod without a token: home", facts(HOME, **POD), *AT_HOME),
    Case("a host without a port is not in-cluster", facts(TOKEN, HOME, service_host="h"), *AT_HOME),
    Case("a token outside a pod is not in-cluster", facts(TOKEN, HOME), *AT_HOME),
    Case("~/.kube/config last", facts(HOME), *AT_HOME),
    Case("nothing", facts(), None, (), f"{NOTHING}, {NOT_IN_POD}, and {HOME} not found"),
    Case(
        "in a pod whose token is not mounted",
        facts(**POD),
        None,
        (),
        f"{NOTHING}, $KUBERNETES_SERVICE_HOST is set but {TOKEN} is missing, and {HOME} not found",
    ),
    Case(
        "a service host without a port, nothing else",
        facts(TOKEN, service_host="h"),
        None,
        (),
        f"{NOTHING}, $KUBERNETES_SERVICE_HOST is set but $KUBERNETES_SERVICE_PORT is not, "
        f"and {HOME} not found",
    ),
    Case(
        "no home directory",
        ClusterFacts(),
        None,
        (),
        f"{NOTHING}, {NOT_IN_POD}, and ~/.kube/config not found",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_choose_cluster(case: Case) -> None:
    choice = choose_cluster(case.facts)
    assert choice == ClusterChoice(case.source, case.kubeconfig, case.error)
    assert choice.ok is (case.error is None)


def test_gather_reads_the_environment_and_tests_only_the_files_that_matter() -> None:
    asked: list[str] = []

    def is_file(path: str) -> bool:
        asked.append(path)
        return path in {"/b", "/home/u/.kube/config"}

    environ = {"KUBECONFIG": "/a:/b", "KUBERNETES_SERVICE_HOST": "h", "KUBERNETES_SERVICE_PORT": ""}
    got = ClusterFacts.gather(None, environ, home="/home/u", is_file=is_file)
    assert got == ClusterFacts(
        kubeconfig_env="/a:/b",
        service_host="h",
        home_config="/home/u/.kube/config",
        existing=frozenset({"/b", "/home/u/.kube/config"}),
    )
    assert asked == ["/a", "/b", TOKEN, "/home/u/.kube/config"]
    assert choose_cluster(got) == ClusterChoice(ClusterSource.ENV, ("/b",))


def test_describe_and_config_file() -> None:
    assert ClusterChoice(ClusterSource.FLAG, ("k.yaml",)).describe() == "--kubeconfig k.yaml"
    env = ClusterChoice(ClusterSource.ENV, ("/a", "/b"))
    assert env.describe() == "$KUBECONFIG /a:/b"
    assert env.config_file == "/a:/b"
    assert ClusterChoice(ClusterSource.IN_CLUSTER).describe() == "in-cluster service account"
    assert ClusterChoice(ClusterSource.IN_CLUSTER).config_file is None
    assert ClusterChoice(ClusterSource.HOME, (HOME,)).describe() == HOME


def test_kubeconfig_paths() -> None:
    assert kubeconfig_paths(None) == ()
    assert kubeconfig_paths("") == ()
    assert kubeconfig_paths(":/a::/b:/a:") == ("/a", "/b")


def kubeconfig(current: str | None, *contexts: tuple[str, str | None]) -> object:
    doc: dict[str, object] = {
        "contexts": [
            {"name": name, "context": {"cluster": "c", "user": "u", "namespace": ns}}
            for name, ns in contexts
        ]
    }
    if current is not None:
        doc["current-context"] = current
    return doc


def test_merged_context_takes_the_first_current_context_and_the_first_definition() -> None:
    first = kubeconfig(None, ("b", "from-first"))
    second = kubeconfig("b", ("b", "from-second"), ("a", "x"))
    third = kubeconfig("a")
    assert merged_context([first, second, third]) == ("b", "from-first")
    assert merged_context([third, second]) == ("a", "x")
    assert merged_context([kubeconfig("a", ("a", None))]) == ("a", None)
    assert merged_context([kubeconfig("gone")]) == ("gone", None)
    assert merged_context([None, "text", first]) == (None, None)
    assert merged_context([]) == (None, None)


def test_connection_failure_finds_the_socket_error() -> None:
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    class NewConnectionError(Exception):  # urllib3's shape: a ConnectTimeoutError subclass
        pass

    class MaxRetryError(Exception):
        def __init__(self, reason: BaseException) -> None:
            super().__init__(f"Max retries exceeded (Caused by {reason!r})")
            self.reason = reason

    wrapped = NewConnectionError("HTTPSConnection(host='127.0.0.1', port=1): Failed to ...")
    wrapped.__context__ = refused
    assert connection_failure(MaxRetryError(wrapped)) == "connection refused"

    unknown = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert connection_failure(MaxRetryError(unknown)) == "name or service not known"


def test_connection_failure_timeouts_tls_and_other_errors() -> None:
    class ConnectTimeoutError(Exception):
        pass

    timeout = ConnectTimeoutError("Connection to 10.0.0.1 timed out. (connect timeout=5)")
    timeout.__context__ = TimeoutError("timed out")
    assert connection_failure(timeout) == "timed out"

    verify = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] ...")
    verify.verify_message = "self-signed certificate in certificate chain"
    assert connection_failure(verify) == (
        "TLS certificate verify failed: self-signed certificate in certificate chain"
    )
    assert connection_failure(ValueError("bad\n  thing")) == "bad thing"
    assert connection_failure(ValueError()) == "ValueError"


def test_load_failure_is_one_line() -> None:
    with pytest.raises(yaml.YAMLError) as info:
        yaml.safe_load("clusters:\n- name: [\n")
    assert load_failure(info.value).startswith("invalid YAML at line 3: ")
    assert "\n" not in load_failure(info.value)
    assert load_failure(KeyError("users")) == "'users'"
    assert (
        load_failure(OSError(errno.EACCES, "Permission denied")) == "[Errno 13] Permission denied"
    )
