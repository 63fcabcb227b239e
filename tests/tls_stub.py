"""A loopback HTTPS server that answers only /health, with a certificate from a test CA.

It stands in for a SuperLink where a test needs `device start` to get past its
reachability check (client/superlink_probe.py) without a real federation.
"""

from __future__ import annotations

import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from fedinterest.server import certificates as certs


def write_ca_and_server(directory: Path, sans: tuple[str, ...] = ("127.0.0.1",)) -> tuple[Path, Path, Path]:
    """(ca.crt, server.crt, server.key) of a fresh CA and a server certificate for `sans`."""
    ca_key, ca_cert = certs.create_ca("test CA")
    key, cert = certs.issue_server_certificate(ca_key, ca_cert, [certs.parse_san(s) for s in sans])
    paths = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    certs.write_certificate(paths[0], ca_cert)
    certs.write_certificate(paths[1], cert)
    certs.write_private_key(paths[2], key)
    return paths


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


class HealthServer:
    """`with HealthServer(cert, key) as port:` serves on 127.0.0.1:port until the block ends."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> int:
        self.thread.start()
        return int(self.server.server_address[1])

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
