"""Can this device reach the operator's SuperLink? One TLS request, verified with the operator's CA.

Flower's SuperNode, given a wrong address, retries forever with "Connection attempt
failed" and never names the address or the reason; given a file that is not a
certificate it dies in a thread with an `ssl.SSLError` traceback and never exits
(issue 16). `device start` therefore checks both first: the CA file must hold a PEM
certificate, and `GET https://HOST:PORT/health` (the SuperLink's health endpoint, the
one `server start` waits on) must answer through TLS verified against that CA.
A failure says which of three things went wrong: the name does not resolve, nothing
answers (not started yet, wrong port: worth retrying), or TLS verification failed
(wrong CA, or a name the server certificate does not carry: retrying will not help).
"""

from __future__ import annotations

import socket
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from fedinterest.common.errors import FedinterestError


class CaFileError(FedinterestError, ValueError):
    """The --ca file is missing or holds no PEM certificate."""


def check_ca_file(ca: Path) -> int:
    """The number of PEM certificates in `ca`; CaFileError naming the file otherwise."""
    if not ca.is_file():
        raise CaFileError(f"--ca {ca}: no such file (the operator's tls/ca.crt)")
    data = ca.read_bytes()
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as err:
        hint = " (this looks like a private key: the CA *certificate* is tls/ca.crt)" if b"PRIVATE KEY" in data else ""
        raise CaFileError(f"--ca {ca}: not a PEM certificate ({err}){hint}; give the operator's tls/ca.crt") from None
    return len(certificates)


@dataclass(frozen=True)
class Probe:
    """The outcome of one attempt to reach the SuperLink."""

    ok: bool
    reason: str = ""
    retryable: bool = False  # nothing answered yet; a later attempt may succeed


def split_address(server: str) -> tuple[str, int]:
    """(host, port) of HOST:PORT or [IPv6]:PORT; ValueError naming the value otherwise."""
    host, _, port = server.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"--server must be HOST:PORT (the operator's SuperLink), got {server!r}")
    return host, int(port)


def probe(server: str, ca: Path, timeout: float = 5.0) -> Probe:
    """Try `https://server/health` once, trusting only `ca`."""
    host, port = split_address(server)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        return Probe(False, f"the name {host!r} does not resolve ({err.strerror or err})")
    context = ssl.create_default_context(cafile=str(ca))
    url = f"https://{'[' + host + ']' if ':' in host else host}:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return Probe(True) if response.status == 200 else Probe(False, f"{url} answered HTTP {response.status}", retryable=True)
    except urllib.error.HTTPError as err:
        return Probe(False, f"{url} answered HTTP {err.code}: not a Flower SuperLink?", retryable=True)
    except urllib.error.URLError as err:
        return _classify(err.reason, ca)
    except (OSError, ssl.SSLError) as err:
        return _classify(err, ca)


def _classify(reason: object, ca: Path) -> Probe:
    if isinstance(reason, ssl.SSLCertVerificationError):
        return Probe(False, f"TLS verification failed ({reason.verify_message}): the server's certificate is not signed by {ca}, "
                     "or does not carry the name or address dialled (the operator's `server init --san`)")
    if isinstance(reason, ssl.SSLError):
        return Probe(False, f"TLS handshake failed ({reason}): is this the SuperLink's HTTPS port?")
    if isinstance(reason, ConnectionRefusedError):
        return Probe(False, "connection refused (the SuperLink is not running there, or the port is wrong)", retryable=True)
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return Probe(False, "no answer within the timeout (a firewall, or the wrong address)", retryable=True)
    return Probe(False, str(reason), retryable=True)
