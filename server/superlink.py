"""The deployment's SuperLink: Flower's `flower-superlink` with TLS, node authentication and its database in DIR.

One HTTPS port serves the Fleet API (devices), the Control API (the operator's `flwr`
commands) and the Runtime API (the ServerApp process the SuperLink starts), all with
the server certificate; `--enable-supernode-auth` admits only SuperNodes whose public
key was registered (`fedinterest server enroll`).
"""

from __future__ import annotations

import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from fedinterest.server.deployment import Deployment, write_flower_connection
from fedinterest.server.flower_processes import SuperLinkNotReady, flower_env, is_healthy


def superlink_command(deployment: Deployment) -> list[str]:
    """The `flower-superlink` command line of this deployment (Flower 1.41 flags)."""
    return [
        # Flower's flower-superlink, with a longer SQLite busy timeout (server/superlink_main.py).
        sys.executable, "-m", "fedinterest.server.superlink_main",
        "--ssl-ca-certfile", str(deployment.ca_cert),
        "--ssl-certfile", str(deployment.server_cert),
        "--ssl-keyfile", str(deployment.server_key),
        "--enable-supernode-auth",
        "--database", str(deployment.database),
        "--host", deployment.server.host,
        "--port", str(deployment.server.port),
        "--isolation", "subprocess",
        # Offline-safe: the ServerApp runs from this environment, nothing is installed.
        "--disable-runtime-dependency-installation",
    ]


def superlink_env(deployment: Deployment) -> dict[str, str]:
    """The environment of the SuperLink and of the operator's `flwr` commands (FLWR_HOME in DIR)."""
    write_flower_connection(deployment)  # the CA path is absolute: rewrite it in case DIR moved
    return flower_env(deployment.flwr_home)


def run_superlink(deployment: Deployment) -> int:
    """Run the SuperLink in the foreground until it exits or is interrupted; its exit code."""
    deployment.database.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(superlink_command(deployment), env=superlink_env(deployment), cwd=deployment.root)

    def forward(signum: int, _frame: FrameType | None) -> None:
        # Let the SuperLink shut down its ServerApp process itself rather than orphaning it.
        if process.poll() is None:
            process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if process.poll() is None:
            process.kill()
            process.wait()


def tls_context(ca_cert: Path) -> ssl.SSLContext:
    """A client TLS context that trusts the deployment's CA only."""
    return ssl.create_default_context(cafile=str(ca_cert))


def is_ready(deployment: Deployment, timeout: float = 2.0) -> bool:
    """Whether the SuperLink answers its health check over TLS, verified against the CA."""
    return is_healthy(f"https://{deployment.server.local_address}/health", tls_context(deployment.ca_cert), timeout)


def require_ready(deployment: Deployment) -> None:
    """Fail fast, naming the address, when the SuperLink is not up (a `flwr` command would hang in retries)."""
    if not is_ready(deployment):
        raise SuperLinkNotReady(
            f"the SuperLink of {deployment.root} does not answer at https://{deployment.server.local_address} "
            "(start it with `fedinterest server start`)"
        )


def wait_ready(deployment: Deployment, timeout: float = 60.0) -> None:
    """Block until the SuperLink is healthy; SuperLinkNotReady after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_ready(deployment):
            return
        time.sleep(0.3)
    raise SuperLinkNotReady(f"the SuperLink of {deployment.root} did not answer https://{deployment.server.local_address}/health within {timeout:.0f} s")
