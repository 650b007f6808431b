"""The webhook's self-signed certificates (reuse, renewal, what a client trusts) and its flags.

TLS handshakes run over in-memory BIOs: no sockets.
"""

from __future__ import annotations

import base64
import ssl
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from capacity_operator.webhook import ServingCert, WebhookSettings, parse_args
from capacity_operator.webhook_tls import (
    CA_LIFETIME,
    SERVING_LIFETIME,
    TlsMaterial,
    ensure,
    generate,
    problem,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
DNS = ("capacity-webhook.capacity-system.svc",)
IPS = ("127.0.0.1",)


@pytest.fixture(scope="module")
def material() -> TlsMaterial:
    return generate(DNS, IPS, NOW)


@pytest.fixture(scope="module")
def live() -> TlsMaterial:
    """Material valid now: the ssl module checks validity against the real clock."""
    return generate(DNS, IPS, datetime.now(UTC))


def serve(material: TlsMaterial, directory: Path) -> ServingCert:
    """The webhook's TLS context on ``material`` written to ``directory``."""
    write(material, directory)
    serving = ServingCert(directory / "tls.crt", directory / "tls.key")
    assert serving.reload()
    return serving


def write(material: TlsMaterial, directory: Path) -> None:
    """Replace the files as the kubelet updates a mounted Secret: new files, renamed over."""
    for name, data in (("tls.crt", material.cert), ("tls.key", material.key)):
        (directory / f".{name}").write_bytes(data)
        (directory / f".{name}").replace(directory / name)


def handshake(serving: ServingCert, ca: bytes, server_hostname: str) -> None:
    """A TLS handshake with the webhook's context from a client trusting only ``ca``, as the
    API server does with caBundle."""
    trust = ssl.create_default_context(cadata=ca.decode())
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = trust.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = serving.context.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, end in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


@pytest.mark.parametrize("name", [*DNS, *IPS])
def test_a_client_trusting_the_ca_accepts_the_serving_certificate(
    live: TlsMaterial, name: str, tmp_path: Path
) -> None:
    handshake(serve(live, tmp_path), live.ca_cert, name)


def test_a_name_the_certificate_does_not_carry_is_refused(
    live: TlsMaterial, tmp_path: Path
) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(serve(live, tmp_path), live.ca_cert, "other.capacity-system.svc")


def test_rotated_files_are_served_after_a_reload(live: TlsMaterial, tmp_path: Path) -> None:
    """cert-manager renews the Secret, the kubelet swaps the mounted files: new connections
    get the new certificate, without a restart."""
    serving = serve(live, tmp_path)
    assert not serving.reload()  # unchanged files are not loaded again
    rotated = generate(DNS, IPS, datetime.now(UTC))
    write(rotated, tmp_path)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(serving, rotated.ca_cert, IPS[0])
    assert serving.reload()
    handshake(serving, rotated.ca_cert, IPS[0])


def test_a_valid_secret_is_reused_so_that_replicas_agree(material: TlsMaterial) -> None:
    again = TlsMaterial.from_secret_data(material.secret_data())
    assert again == material
    reused, why = ensure(again, DNS, IPS, NOW + timedelta(days=100))
    assert reused is again
    assert why is None


def test_a_serving_certificate_near_expiry_is_renewed_under_the_same_ca(
    material: TlsMaterial,
) -> None:
    later = NOW + SERVING_LIFETIME - timedelta(days=10)
    renewed, why = ensure(material, DNS, IPS, later)
    assert why is not None
    assert "expires" in why
    assert "same CA" in why
    assert renewed.ca_cert == material.ca_cert  # caBundle unchanged: old replicas keep working
    assert renewed.cert != material.cert
    assert problem(renewed, DNS, IPS, later) is None


def test_a_new_name_gets_a_new_serving_certificate_under_the_same_ca(
    material: TlsMaterial,
) -> None:
    names = (*DNS, "capacity-webhook.capacity-system.svc.cluster.local")
    renewed, why = ensure(material, names, IPS, NOW)
    assert why is not None
    assert "does not name capacity-webhook.capacity-system.svc.cluster.local" in why
    assert renewed.ca_cert == material.ca_cert
    assert problem(renewed, names, IPS, NOW) is None


def test_a_ca_near_expiry_is_replaced(material: TlsMaterial) -> None:
    later = NOW + CA_LIFETIME - timedelta(days=30)
    renewed, why = ensure(material, DNS, IPS, later)
    assert why is not None
    assert "new CA" in why
    assert renewed.ca_cert != material.ca_cert
    assert problem(renewed, DNS, IPS, later) is None


@pytest.mark.parametrize(
    ("case", "data"),
    [
        ("no Secret", None),
        ("a key missing", {"tls.crt": "eA==", "tls.key": "eA=="}),
        ("not base64", {"ca.crt": "!", "ca.key": "!", "tls.crt": "!", "tls.key": "!"}),
    ],
)
def test_unusable_secret_data_means_new_material(case: str, data: dict[str, str] | None) -> None:
    existing = TlsMaterial.from_secret_data(data)
    assert existing is None, case
    fresh, why = ensure(existing, DNS, IPS, NOW)
    assert why is not None, case
    assert problem(fresh, DNS, IPS, NOW) is None, case


def test_mismatched_or_garbage_pem_is_replaced(material: TlsMaterial) -> None:
    other = generate(DNS, IPS, NOW)
    foreign_key = replace(material, key=other.key)
    assert (
        problem(foreign_key, DNS, IPS, NOW) == "serving key does not match the serving certificate"
    )
    foreign_cert = replace(material, cert=other.cert, key=other.key)
    assert problem(foreign_cert, DNS, IPS, NOW) == "serving certificate is not issued by the CA"
    garbage = replace(material, ca_cert=b"-----BEGIN CERTIFICATE-----\nxx\n")
    assert problem(garbage, DNS, IPS, NOW) is not None
    renewed, _ = ensure(garbage, DNS, IPS, NOW)
    assert problem(renewed, DNS, IPS, NOW) is None


def test_ca_bundle_is_base64_of_the_ca_pem(material: TlsMaterial) -> None:
    assert base64.b64decode(material.ca_bundle) == material.ca_cert
    assert material.secret_data()["ca.crt"] == material.ca_bundle


# -- flags --------------------------------------------------------------------------------------


def test_defaults_and_self_signed_flags() -> None:
    settings = parse_args(
        ["--self-signed", "--ip", "127.0.0.1", "--dns-name", "Webhook.NS.svc.", "--ip", "::1"]
    )
    assert settings == WebhookSettings(
        self_signed=True, dns_names=("webhook.ns.svc",), ips=("127.0.0.1", "::1")
    )
    assert settings.port == 9443
    assert settings.bind == "0.0.0.0"  # noqa: S104 - the default under test
    assert settings.cert_files() is None


def test_cert_manager_mode_serves_the_mounted_files() -> None:
    assert parse_args(["--cert-dir", "/certs"]).cert_files() == (
        Path("/certs/tls.crt"),
        Path("/certs/tls.key"),
    )
    explicit = parse_args(["--tls-cert", "/a.pem", "--tls-key", "/b.pem", "--port", "8443"])
    assert explicit.cert_files() == (Path("/a.pem"), Path("/b.pem"))
    assert explicit.port == 8443


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "no certificate: give --tls-cert and --tls-key, --cert-dir, or --self-signed"),
        (["--tls-cert", "a.pem"], "--tls-cert and --tls-key go together"),
        (["--self-signed"], "--self-signed needs the names the API server calls the webhook by"),
        (["--self-signed", "--ip", "localhost"], "argument --ip: 'localhost' is not an IP address"),
        (["--self-signed", "--dns-name", "a_b"], "argument --dns-name: 'a_b' is not a DNS name"),
        (
            ["--self-signed", "--ip", "::1", "--tls-cert", "a", "--tls-key", "b"],
            "--self-signed makes its own certificate",
        ),
        (
            ["--cert-dir", "/c", "--webhook-config-name", "x"],
            "--dns-name, --ip and --webhook-config-name only apply with --self-signed",
        ),
        (["--cert-dir", "/c", "--port", "0"], "argument --port: 0 is not a port number (1-65535)"),
        (["--cert-dir", "/c", "--port", "https"], "argument --port: 'https' is not a port number"),
        (["--cert-dir", "/c", "--resync-seconds", "-1"], "is not a positive number of seconds"),
    ],
)
def test_bad_flags_are_one_line_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("capacity-webhook: error: ")
    assert message in err
    assert err.count("\n") == 1
