"""The deployment's X.509 material: a private CA and a server certificate it signs.

The CA certificate is what devices (and the operator's own `flwr` commands) trust; the
server certificate names every address devices use to reach the SuperLink as a subject
alternative name, because TLS clients check the name they dialled against the SANs only.
Keys are EC P-384 (what Flower uses for node keys too), private keys written 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedinterest.common.errors import FedinterestError

CA_DAYS = 3650
SERVER_DAYS = 825  # the longest lifetime common TLS clients accept for a leaf certificate
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class CertificateError(FedinterestError, ValueError):
    """A SAN or a certificate file that cannot be used (the message names it)."""


@dataclass(frozen=True)
class San:
    """One subject alternative name: an IP address or a DNS name."""

    value: str
    is_ip: bool

    def to_x509(self) -> x509.GeneralName:
        """The cryptography GeneralName of this SAN."""
        return x509.IPAddress(ipaddress.ip_address(self.value)) if self.is_ip else x509.DNSName(self.value)


def parse_san(text: str) -> San:
    """An IP address or DNS name as a SAN; raises CertificateError naming a bad one."""
    value = text.strip()
    try:
        return San(str(ipaddress.ip_address(value)), True)
    except ValueError:
        pass
    name = value.removesuffix(".")  # a fully qualified name may end with a dot
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_DNS_LABEL.match(label) for label in labels) or labels[-1].isdigit():
        raise CertificateError(f"--san {text!r}: not an IP address or a DNS name (e.g. 127.0.0.1, localhost, fl.example.org)")
    return San(name.lower(), False)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def create_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew between machines
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def issue_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, sans: list[San]
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for `sans`, signed by the CA."""
    if not sans:
        raise CertificateError("a server certificate needs at least one SAN")
    key = _new_key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0].value)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName([s.to_x509() for s in sans]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=False, crl_sign=False, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """PEM (PKCS#8, unencrypted: the SuperLink reads it unattended), created 0600 from the start."""
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def write_certificate(path: Path, cert: x509.Certificate) -> None:
    """PEM certificate (public; 0644)."""
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.chmod(0o644)


def load_certificate(path: Path) -> x509.Certificate:
    """A PEM certificate; raises CertificateError naming the file."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError as err:
        raise CertificateError(f"{path}: certificate file missing") from err
    except ValueError as err:
        raise CertificateError(f"{path}: not a PEM certificate ({err})") from err


def certificate_sans(cert: x509.Certificate) -> list[str]:
    """The DNS and IP SANs of a certificate, as text."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*ext.get_values_for_type(x509.DNSName), *(str(ip) for ip in ext.get_values_for_type(x509.IPAddress))]


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint, colon-separated hex (what operators compare out of band)."""
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))
