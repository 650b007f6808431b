"""Each program's loader finds its cluster as kubectl does, and a missing cluster is one line.

The loaders of the operator, the agent and capctl are separate (the three packages never import
each other); the same cases run against each. Nothing here opens a connection: kubeconfig files
and a fake service account live under tmp_path, and the programs started as processes stop at
the missing kubeconfig before any request.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml
from kubernetes.config import incluster_config
from lightkube import Client
from lightkube.config import client_adapter

import capacity_agent.cluster
import capacity_cli.cluster
import capacity_operator.cluster
from capacity_cli.errors import CapctlError
from tests.loopback import http_server


@dataclass(frozen=True)
class Loaded:
    """What a loader found, the same way for every client."""

    host: str
    authorization: str | None
    """The Authorization header the client sends."""
    namespace: str | None


Loader = Callable[[str | None], Loaded]
"""flag -> what was loaded; raises with the one-line message."""


def from_configuration(configuration: Any, namespace: str | None) -> Loaded:
    """From a ``kubernetes.client.Configuration`` (the operator's and capctl's client)."""
    return Loaded(configuration.host, configuration.api_key.get("authorization"), namespace)


def operator_load(flag: str | None) -> Loaded:
    access = capacity_operator.cluster.load(flag)
    return from_configuration(access.configuration, access.namespace)


def agent_load(flag: str | None) -> Loaded:
    """The agent's lightkube configuration; the header its authentication flow would send."""
    access = capacity_agent.cluster.load(flag)
    assert access.config.user is not None
    auth = client_adapter.user_auth(access.config.user)
    header = None
    if auth is not None:
        sent = next(auth.sync_auth_flow(httpx2.Request("GET", access.server)))
        header = sent.headers.get("Authorization")
    return Loaded(access.server, header, access.namespace)


def cli_load(flag: str | None) -> Loaded:
    api, namespace = capacity_cli.cluster.load_client(flag)
    return from_configuration(api.configuration, namespace)


LOADERS = {"operator": operator_load, "agent": agent_load, "capctl": cli_load}
ERRORS = (
    capacity_operator.cluster.ClusterAccessError,
    capacity_agent.cluster.ClusterAccessError,
    CapctlError,
)


@pytest.fixture(params=sorted(LOADERS))
def load(request: pytest.FixtureRequest) -> Loader:
    return LOADERS[request.param]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No $KUBECONFIG, not in a pod, a home without ~/.kube/config, no service account."""
    home = tmp_path / "home"
    home.mkdir()
    for name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    sa = tmp_path / "serviceaccount"
    for module in (capacity_operator.cluster, capacity_agent.cluster, capacity_cli.cluster):
        monkeypatch.setattr(module, "SERVICE_ACCOUNT_TOKEN", str(sa / "token"))
        monkeypatch.setattr(module, "SERVICE_ACCOUNT_NAMESPACE", str(sa / "namespace"))
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(sa / "token"))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(sa / "ca.crt"))
    return home


def write_kubeconfig(
    path: Path, server: str, *, context: str | None = "ctx", namespace: str | None = "team-a"
) -> Path:
    ctx: dict[str, Any] = {"cluster": f"c-{path.stem}", "user": f"u-{path.stem}"}
    if namespace:
        ctx["namespace"] = namespace
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": f"c-{path.stem}",
                "cluster": {"server": server, "insecure-skip-tls-verify": True},
            }
        ],
        "users": [{"name": f"u-{path.stem}", "user": {"token": f"token-{path.stem}"}}],
        "contexts": [{"name": context or "ctx", "context": ctx}],
    }
    if context:
        body["current-context"] = context
    path.write_text(yaml.safe_dump(body))
    return path


def service_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text("sa-token")
    (sa / "namespace").write_text("capacity-system\n")
    (sa / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")


def message(load: Loader, flag: str | None) -> str:
    with pytest.raises(ERRORS) as info:
        load(flag)
    text = str(info.value)
    assert "\n" not in text
    if isinstance(info.value, CapctlError):
        assert info.value.code == 2
    return text


def test_flag(load: Loader, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flag = write_kubeconfig(tmp_path / "flag.yaml", "https://flag.example:6443")
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "env.yaml", "https://env")))
    service_account(tmp_path, monkeypatch)
    loaded = load(str(flag))
    assert loaded.host == "https://flag.example:6443"
    assert loaded.authorization == "Bearer token-flag"
    assert loaded.namespace == "team-a"


def test_kubeconfig_env_is_honoured(
    load: Loader, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    (clean_env / ".kube").mkdir()
    write_kubeconfig(clean_env / ".kube" / "config", "https://home")
    service_account(tmp_path, monkeypatch)
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "env.yaml", "https://env")))
    assert load(None).host == "https://env"


def test_kubeconfig_env_merges_files_as_kubectl(
    load: Loader, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first file that sets current-context names it (the Python client alone would take
    the last); missing files in the list are skipped."""
    first = write_kubeconfig(tmp_path / "first.yaml", "https://first", context="one")
    second = write_kubeconfig(tmp_path / "second.yaml", "https://second", context="two")
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'missing.yaml'}:{first}:{second}")
    loaded = load(None)
    assert loaded.host == "https://first"
    assert loaded.authorization == "Bearer token-first"
    assert loaded.namespace == "team-a"


def test_in_cluster_over_home(
    load: Loader, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    (clean_env / ".kube").mkdir()
    write_kubeconfig(clean_env / ".kube" / "config", "https://home")
    service_account(tmp_path, monkeypatch)
    loaded = load(None)
    assert loaded.host == "https://10.96.0.1:443"
    assert (loaded.authorization or "").lower() == "bearer sa-token"  # the scheme's case is free
    assert loaded.namespace == "capacity-system"


def test_home_last(load: Loader, clean_env: Path) -> None:
    (clean_env / ".kube").mkdir()
    write_kubeconfig(clean_env / ".kube" / "config", "https://home", namespace=None)
    loaded = load(None)
    assert loaded.host == "https://home"
    assert loaded.namespace is None


def test_no_cluster_is_one_line(load: Loader, tmp_path: Path, clean_env: Path) -> None:
    assert message(load, "/nonexistent") == "no cluster: --kubeconfig /nonexistent: file not found"
    assert message(load, None) == (
        "no cluster: no --kubeconfig, $KUBECONFIG unset, not in a pod "
        f"($KUBERNETES_SERVICE_HOST unset), and {clean_env}/.kube/config not found"
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text("clusters: [\n")
    assert message(load, str(broken)).startswith(
        f"no cluster: --kubeconfig {broken}: invalid YAML at line 2: "
    )
    nameless = write_kubeconfig(tmp_path / "nameless.yaml", "https://x", context=None)
    assert message(load, str(nameless)).startswith(f"no cluster: --kubeconfig {nameless}: ")


def test_operator_gives_kopf_the_same_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flag = write_kubeconfig(tmp_path / "k.yaml", "https://api.example:6443")
    info = capacity_operator.cluster.connection_info(
        capacity_operator.cluster.load(str(flag)), trust_env=True
    )
    assert (info.server, info.scheme, info.token) == (
        "https://api.example:6443",
        "Bearer",
        "token-k",
    )
    assert info.insecure is True
    assert info.default_namespace == "team-a"
    assert info.trust_env is True
    # the admission engine's own connection (aiohttp): the same token and the same TLS choice
    access = capacity_operator.cluster.load(str(flag))
    assert capacity_operator.cluster.authorization(access) == "Bearer token-k"
    assert capacity_operator.cluster.ssl_context(access).verify_mode == ssl.CERT_NONE

    service_account(tmp_path, monkeypatch)
    info = capacity_operator.cluster.connection_info(capacity_operator.cluster.load(None))
    assert (info.server, info.scheme, info.token) == ("https://10.96.0.1:443", "bearer", "sa-token")
    assert info.ca_path == str(tmp_path / "serviceaccount" / "ca.crt")
    assert info.default_namespace == "capacity-system"
    assert not info.insecure


def test_operator_gives_kopf_client_certificates(tmp_path: Path) -> None:
    """A kubeconfig with certificate data (as the local cluster's admin kubeconfig): kopf gets the
    files the Kubernetes client wrote, and builds its TLS context from them."""
    crypto = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415

    def pem_pair(name: str, issuer: tuple[Any, Any] | None = None) -> tuple[Any, Any, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = crypto.Name([crypto.NameAttribute(crypto.NameOID.COMMON_NAME, name)])
        signer_name, signer_key = issuer or (subject, key)
        now = dt.datetime.now(dt.UTC)
        cert = (
            crypto.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(signer_name)
            .public_key(key.public_key())
            .serial_number(crypto.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(crypto.BasicConstraints(ca=issuer is None, path_length=None), True)
            .sign(signer_key, hashes.SHA256())
        )
        pem_key = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cert, key, pem_key

    ca, ca_key, _ = pem_pair("ca")
    cert, _, key_pem = pem_pair("admin", (ca.subject, ca_key))

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    body = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "c",
                "cluster": {
                    "server": "https://127.0.0.1:6443",
                    "certificate-authority-data": b64(ca.public_bytes(serialization.Encoding.PEM)),
                },
            }
        ],
        "users": [
            {
                "name": "admin",
                "user": {
                    "client-certificate-data": b64(cert.public_bytes(serialization.Encoding.PEM)),
                    "client-key-data": b64(key_pem),
                },
            }
        ],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "admin"}}],
        "current-context": "x",
    }
    path = tmp_path / "admin.kubeconfig"
    path.write_text(yaml.safe_dump(body))
    info = capacity_operator.cluster.connection_info(capacity_operator.cluster.load(str(path)))
    assert info.token is None
    assert info.certificate_path
    assert info.private_key_path
    assert info.ca_path
    assert not info.insecure
    info.as_ssl_context()  # loads the CA and the client certificate and key
    access = capacity_operator.cluster.load(str(path))
    assert capacity_operator.cluster.authorization(access) is None
    context = capacity_operator.cluster.ssl_context(access)  # the engine's: the same files
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert len(context.get_ca_certs()) == 1


@pytest.mark.parametrize(
    ("program", "args"),
    [
        ("capacity_operator", []),
        ("capacity_agent", ["--node-name", "n1"]),
        ("capacity_cli", ["nodes"]),
    ],
)
def test_the_programs_say_no_cluster_in_one_line(
    program: str, args: list[str], tmp_path: Path
) -> None:
    prog = {"capacity_cli": "capctl"}.get(program, program.replace("_", "-"))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"}
        and not k.endswith("_KUBECONFIG")
    }
    env["HOME"] = str(tmp_path)
    for flag, detail in (
        (["--kubeconfig", "/nonexistent"], "--kubeconfig /nonexistent: file not found"),
        ([], "no --kubeconfig, $KUBECONFIG unset, not in a pod"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", program, *flag, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert out.returncode == 2, out.stderr
        assert out.stdout == ""
        assert out.stderr.startswith(f"{prog}: no cluster: {detail}"), out.stderr
        assert out.stderr.count("\n") == 1, out.stderr


def test_the_operators_client_pool_holds_a_connection_per_worker_thread(tmp_path: Path) -> None:
    """The operator's worker threads share one client: a smaller pool throws connections away and
    redoes their TLS handshakes (the admission benchmark's operator log was full of "Connection
    pool is full")."""
    module = capacity_operator.cluster
    path = write_kubeconfig(tmp_path / "kc", "https://127.0.0.1:6443")
    api = module.api_client(module.load(str(path)), pool=64)
    assert api.configuration.connection_pool_maxsize == 64
    assert api.rest_client.pool_manager.connection_pool_kw["maxsize"] == 64


# ---------------------------------------------------------------------------------------------
# The agent's loader and client (lightkube)


def test_the_agents_pool_keeps_a_connection_per_worker_thread_and_the_watches(
    tmp_path: Path,
) -> None:
    assert capacity_agent.cluster.CLAIM_WATCHES == 4
    limits = capacity_agent.cluster.connection_limits(64)
    assert (limits.max_keepalive_connections, limits.max_connections) == (68, 100)
    defaults = capacity_agent.cluster.connection_limits(8)
    assert (defaults.max_keepalive_connections, defaults.max_connections) == (20, 100)
    path = write_kubeconfig(tmp_path / "kc", "https://127.0.0.1:6443")
    access = capacity_agent.cluster.load(str(path))
    with capacity_agent.cluster.api_client(access, pool=64, timeout=3.0) as api:
        assert isinstance(api, Client)
        assert api.config.cluster.server == "https://127.0.0.1:6443"
        assert api.namespace == "team-a"


def test_merged_kubeconfigs_take_relative_files_from_the_file_that_names_them(
    tmp_path: Path,
) -> None:
    first, second = tmp_path / "a" / "first.yaml", tmp_path / "b" / "second.yaml"
    documents = [
        {
            "current-context": "one",
            "clusters": [{"name": "c", "cluster": {"certificate-authority": "ca.crt"}}],
            "users": [{"name": "u", "user": {"client-certificate": "/abs/u.crt"}}],
            "contexts": [{"name": "one", "context": {"cluster": "c", "user": "u"}}],
        },
        None,  # an empty file
        {
            "current-context": "two",
            "clusters": [
                {"name": "c", "cluster": {"server": "https://ignored"}},
                {"name": "d", "cluster": {"certificate-authority": "certs/ca.crt"}},
            ],
            "users": [{"name": "v", "user": {"client-key": "v.key", "tokenFile": "t"}}],
            "contexts": [{"name": "one", "context": {"cluster": "d"}}],
        },
    ]
    merged = capacity_agent.cluster.merge_kubeconfigs(
        [first, tmp_path / "empty.yaml", second], documents
    )
    assert merged == {
        "current-context": "one",
        "clusters": [
            {"name": "c", "cluster": {"certificate-authority": str(first.parent / "ca.crt")}},
            {
                "name": "d",
                "cluster": {"certificate-authority": str(second.parent / "certs/ca.crt")},
            },
        ],
        "users": [
            {"name": "u", "user": {"client-certificate": "/abs/u.crt"}},
            {
                "name": "v",
                "user": {
                    "client-key": str(second.parent / "v.key"),
                    "tokenFile": str(second.parent / "t"),
                },
            },
        ],
        "contexts": [{"name": "one", "context": {"cluster": "c", "user": "u"}}],
    }


def test_a_context_naming_an_undefined_cluster_is_one_line(tmp_path: Path) -> None:
    path = write_kubeconfig(tmp_path / "kc.yaml", "https://x")
    body = yaml.safe_load(path.read_text())
    body["contexts"][0]["context"]["cluster"] = "elsewhere"
    path.write_text(yaml.safe_dump(body))
    text = message(agent_load, str(path))
    assert (
        text == f"no cluster: --kubeconfig {path}: context 'ctx' refers to 'elsewhere', not defined"
    )


class Answer(BaseHTTPRequestHandler):
    """An API server that answers /version with ``status`` (set on the class by the test)."""

    status = 200

    def do_GET(self) -> None:
        body = b'{"gitVersion": "v1.35.0"}'
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        del format, args  # no access log in the test output


@contextmanager
def api_server(status: int) -> Iterator[str]:
    """A plain-HTTP API server on loopback; yields its URL."""
    with http_server(type("Handler", (Answer,), {"status": status})) as url:
        yield url


def test_the_agent_checks_the_api_server_once_at_start(tmp_path: Path) -> None:
    with api_server(200) as url:
        path = write_kubeconfig(tmp_path / "kc.yaml", url)
        capacity_agent.cluster.check_reachable(capacity_agent.cluster.load(str(path)))
    with api_server(401) as url:
        path = write_kubeconfig(tmp_path / "kc.yaml", url)
        with pytest.raises(capacity_agent.cluster.ClusterAccessError) as info:
            capacity_agent.cluster.check_reachable(capacity_agent.cluster.load(str(path)))
        assert str(info.value) == (
            f"the Kubernetes API server at {url} refused the credentials of "
            f"--kubeconfig {path}: 401 Unauthorized"
        )
    # the server is gone now: nothing listens on its port
    with pytest.raises(capacity_agent.cluster.ClusterAccessError) as info:
        capacity_agent.cluster.check_reachable(capacity_agent.cluster.load(str(path)))
    assert str(info.value) == f"cannot reach the Kubernetes API server at {url}: connection refused"


def test_an_unreadable_certificate_authority_is_one_line(tmp_path: Path) -> None:
    path = write_kubeconfig(tmp_path / "kc.yaml", "https://127.0.0.1:1")
    body = yaml.safe_load(path.read_text())
    body["clusters"][0]["cluster"] = {
        "server": "https://127.0.0.1:1",
        "certificate-authority": str(tmp_path / "missing-ca.crt"),
    }
    path.write_text(yaml.safe_dump(body))
    access = capacity_agent.cluster.load(str(path))
    with pytest.raises(capacity_agent.cluster.ClusterAccessError) as info:
        capacity_agent.cluster.check_reachable(access)
    text = str(info.value)
    assert text.startswith(f"no cluster: --kubeconfig {path}: ")
    assert "\n" not in text
