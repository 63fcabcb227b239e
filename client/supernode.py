"""Starting Flower's SuperNode for a device: TLS, the device's key, its store as node config.

`flower-supernode` (Flower 1.41) connects to the SuperLink's Fleet API over HTTPS,
verifies it with `--root-certificates`, authenticates with the OpenSSH EC private key
given by `--auth-supernode-private-key`, and passes `--node-config` to the ClientApp,
whose `history-db` names the device store. The environment turns off Flower's runtime
dependency installation, telemetry and update check, so the device works offline apart
from the federation itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fedinterest.client.data_source import HISTORY_DB
from fedinterest.client.device_dir import DeviceDir

OFFLINE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}


@dataclass(frozen=True)
class SuperNodeLaunch:
    """The exact command line and environment a device's SuperNode runs with."""

    argv: list[str]
    env: dict[str, str]


def supernode_launch(
    device: DeviceDir, *, server: str, ca: Path, runtime_port: int | None = None,
    max_retries: int | None = None, max_wait_time: float | None = None,
) -> SuperNodeLaunch:
    """The `flower-supernode` invocation for `device`; ValueError for a bad address or missing CA file."""
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"--server must be HOST:PORT (the operator's SuperLink Fleet API), got {server!r}")
    if not ca.is_file():
        raise ValueError(f"{ca}: no CA certificate file here (the operator's ca.crt)")
    store = str(device.store_path.resolve())
    if "'" in store:
        raise ValueError(f"{store}: the store path may not contain a single quote (it is passed as a TOML literal string)")
    argv = [
        _flower_supernode(),
        "--superlink", server,
        "--root-certificates", str(ca.resolve()),
        "--auth-supernode-private-key", str(device.private_key.resolve()),
        "--node-config", f"{HISTORY_DB}='{store}'",
        "--isolation", "subprocess",
        "--host", "127.0.0.1",  # the SuperNode's own runtime API never leaves the device
        "--port", str(runtime_port or free_port()),
    ]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        argv += ["--max-wait-time", str(max_wait_time)]
    env = {**os.environ, **OFFLINE_ENV}
    # The SuperNode starts `flower-superexec` (and it `flwr-clientapp`) from PATH: the ones beside this interpreter.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(device.flwr_home.resolve())  # per device: two devices on one machine never share it
    return SuperNodeLaunch(argv, env)


def run_supernode(launch: SuperNodeLaunch) -> int:
    """Run the SuperNode in the foreground until it exits; its exit code.

    SIGTERM and SIGHUP are passed on to it (and Ctrl-C reaches it through the terminal's
    process group), so stopping this command never leaves an orphaned SuperNode behind.
    """
    process = subprocess.Popen(launch.argv, env=launch.env)

    def forward(signum: int, _frame: object) -> None:
        process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        while True:
            try:
                return process.wait()
            except KeyboardInterrupt:
                process.send_signal(signal.SIGINT)  # then wait for its graceful exit
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _flower_supernode() -> str:
    """`flower-supernode` beside this interpreter (a virtualenv's bin), else on PATH."""
    beside = Path(sys.executable).with_name("flower-supernode")
    found = str(beside) if beside.is_file() else shutil.which("flower-supernode")
    if found is None:
        raise FileNotFoundError("flower-supernode is not installed (it comes with the flwr package)")
    return found
