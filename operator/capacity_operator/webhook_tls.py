"""Certificates of the pod webhook in ``--self-signed`` mode: a private CA and a serving
certificate, kept in a ``kubernetes.io/tls`` Secret so that every replica serves the same CA.

No I/O here: the server (:mod:`capacity_operator.webhook`) reads and writes the Secret and hands
its data to :func:`ensure`, which reuses it when it is still good for the names asked for, renews
only the serving certificate under the same CA when that is enough (the ``caBundle`` the API
server trusts then stays the same, so replicas that still serve the old certificate keep
working), and makes a new CA otherwise.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_LIFETIME = timedelta(days=3650)
SERVING_LIFETIME = timedelta(days=365)
RENEW_BEFORE = timedelta(days=30)
"""A serving certificate with less than this left is renewed."""
BACKDATE = timedelta(minutes=5)
"""``notBefore`` lies this far in the past, for clocks a little behind ours."""

CA_CERT_KEY = "ca.crt"
CA_KEY_KEY = "ca.key"
CERT_KEY = "tls.crt"
KEY_KEY = "tls.key"
SECRET_KEYS = (CA_CERT_KEY, CA_KEY_KEY, CERT_KEY, KEY_KEY)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """PEM-encoded CA and serving certificate with their keys."""

    ca_cert: bytes
    ca_key: bytes
    cert: bytes
    key: bytes

    def secret_data(self) -> dict[str, str]:
        """The Secret's ``data`` (base64 of each PEM)."""
        values = (self.ca_cert, self.ca_key, self.cert, self.key)
        return {k: base64.b64encode(v).decode() for k, v in zip(SECRET_KEYS, values, strict=True)}

    @property
    def ca_bundle(self) -> str:
        """The ``caBundle`` of a webhook configuration: base64 of the CA certificate PEM."""
        return base64.b64encode(self.ca_cert).decode()

    @classmethod
    def from_secret_data(cls, data: Mapping[str, str] | None) -> TlsMaterial | None:
        """The material in a Secret's ``data``; None when a key is missing or not base64."""
        if not data or any(not data.get(k) for k in SECRET_KEYS):
            return None
        try:
            values = [base64.b64decode(data[k], validate=True) for k in SECRET_KEYS]
        except ValueError:
            return None
        return cls(*values)


def parse_ip(value: str) -> IPAddress:
    """An IP address given on the command line; ValueError naming it when it is not one."""
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None


def problem(
    material: TlsMaterial, dns_names: Sequence[str], ips: Sequence[str], now: datetime
) -> str | None:
    """Why ``material`` cannot serve ``dns_names`` and ``ips`` now, or None when it can."""
    return _ca_problem(material, now) or _serving_problem(material, dns_names, ips, now)


def _serving_problem(
    material: TlsMaterial, dns_names: Sequence[str], ips: Sequence[str], now: datetime
) -> str | None:
    try:
        ca = x509.load_pem_x509_certificate(material.ca_cert)
        cert = x509.load_pem_x509_certificate(material.cert)
        key = serialization.load_pem_private_key(material.key, password=None)
    except ValueError as exc:
        return f"serving certificate or key does not load: {exc}"
    if cert.public_key().public_bytes(*_SPKI) != key.public_key().public_bytes(*_SPKI):
        return "serving key does not match the serving certificate"
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "serving certificate is not issued by the CA"
    return _validity_problem(cert, dns_names, ips, now)


def _validity_problem(
    cert: x509.Certificate, dns_names: Sequence[str], ips: Sequence[str], now: datetime
) -> str | None:
    if cert.not_valid_after_utc - now < RENEW_BEFORE:
        return f"serving certificate expires {cert.not_valid_after_utc:%Y-%m-%d}"
    if cert.not_valid_before_utc > now:
        return f"serving certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d}"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "serving certificate has no subject alternative names"
    have_dns = set(san.get_values_for_type(x509.DNSName))
    have_ips = set(san.get_values_for_type(x509.IPAddress))
    missing = [n for n in dns_names if n not in have_dns]
    missing += [i for i in ips if parse_ip(i) not in have_ips]
    if missing:
        return f"serving certificate does not name {', '.join(missing)}"
    return None


def ensure(
    existing: TlsMaterial | None, dns_names: Sequence[str], ips: Sequence[str], now: datetime
) -> tuple[TlsMaterial, str | None]:
    """The material to serve with, and why it is new (None: ``existing`` is reused)."""
    if existing is not None:
        why = problem(existing, dns_names, ips, now)
        if why is None:
            return existing, None
        if _ca_problem(existing, now) is None:
            ca_cert = x509.load_pem_x509_certificate(existing.ca_cert)
            ca_key = serialization.load_pem_private_key(existing.ca_key, password=None)
            if isinstance(ca_key, ec.EllipticCurvePrivateKey):
                fresh = _issue(
                    ca_cert, ca_key, existing.ca_key, dns_names=dns_names, ips=ips, now=now
                )
                return fresh, f"{why}: new serving certificate under the same CA"
        return generate(dns_names, ips, now), f"{why}: new CA and serving certificate"
    return generate(dns_names, ips, now), "no certificate yet: new CA and serving certificate"


def generate(dns_names: Sequence[str], ips: Sequence[str], now: datetime) -> TlsMaterial:
    """A new CA and a serving certificate for ``dns_names`` and ``ips`` signed by it."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "capacity-webhook-ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return _issue(ca_cert, ca_key, _key_pem(ca_key), dns_names=dns_names, ips=ips, now=now)


def _issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_key_pem: bytes,
    *,
    dns_names: Sequence[str],
    ips: Sequence[str],
    now: datetime,
) -> TlsMaterial:
    """A serving certificate for ``dns_names`` and ``ips`` signed by the CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    names += [x509.IPAddress(parse_ip(i)) for i in ips]
    common = ([*dns_names, *ips] or ["capacity-webhook"])[0]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + SERVING_LIFETIME, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return TlsMaterial(
        ca_cert=ca_cert.public_bytes(serialization.Encoding.PEM),
        ca_key=ca_key_pem,
        cert=cert.public_bytes(serialization.Encoding.PEM),
        key=_key_pem(key),
    )


def _ca_problem(material: TlsMaterial, now: datetime) -> str | None:
    try:
        ca = x509.load_pem_x509_certificate(material.ca_cert)
        ca_key = serialization.load_pem_private_key(material.ca_key, password=None)
    except ValueError as exc:
        return f"CA certificate or key does not load: {exc}"
    if ca.public_key().public_bytes(*_SPKI) != ca_key.public_key().public_bytes(*_SPKI):
        return "CA key does not match the CA certificate"
    if ca.not_valid_after_utc - now < SERVING_LIFETIME:
        return f"CA expires {ca.not_valid_after_utc:%Y-%m-%d}"
    return None


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

__all__ = [
    "CA_LIFETIME",
    "RENEW_BEFORE",
    "SERVING_LIFETIME",
    "TlsMaterial",
    "ensure",
    "generate",
    "parse_ip",
    "problem",
]
