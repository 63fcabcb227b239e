"""Starting Flower's SuperNode for a device: TLS, the device's key, its store as node config.

`flower-supernode` (Flower 1.41) connects to the SuperLink's Fleet API over HTTPS,
verifies it with `--root-certificates`, authenticates with the OpenSSH EC private key
given by `--auth-supernode-private-key`, and passes `--node-config` to the ClientApp,
whose `history-db` names the device store. The environment turns off Flower's runtime
dependency installation, telemetry and update check, so the device works offline apart
from the federation itself.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedinterest.client.data_source import HISTORY_DB
from fedinterest.client.device_dir import DeviceDir
from fedinterest.client.superlink_probe import check_ca_file, split_address

# What Flower 1.41's SuperNode prints when the SuperLink refuses to activate it (exit code 305).
ACTIVATION_REFUSED = "[code: 2004]"
# ... and what it prints once the SuperLink accepted it.
ACTIVATED = re.compile(rb"SuperNode ID: (\d+)")

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
    # The resident ClientApp process (client/warm_executor.py) run beside the SuperNode, or
    # None when the SuperNode starts a `flwr-clientapp` process per message itself.
    executor_argv: list[str] | None = None


def supernode_launch(
    device: DeviceDir, *, server: str, ca: Path, runtime_port: int | None = None,
    max_retries: int | None = None, max_wait_time: float | None = None, resident: bool = True,
) -> SuperNodeLaunch:
    """The `flower-supernode` invocation for `device`; ValueError for a bad address or a CA file that is no certificate."""
    split_address(server)
    check_ca_file(ca)
    store = str(device.store_path.resolve())
    if "'" in store:
        raise ValueError(f"{store}: the store path may not contain a single quote (it is passed as a TOML literal string)")
    runtime = f"127.0.0.1:{runtime_port or free_port()}"  # the SuperNode's own runtime API never leaves the device
    argv = [
        _flower_supernode(),
        "--superlink", server,
        "--root-certificates", str(ca.resolve()),
        "--auth-supernode-private-key", str(device.private_key.resolve()),
        "--node-config", f"{HISTORY_DB}='{store}'",
        # process: the ClientApp executor is ours (resident); subprocess: Flower starts one per message.
        "--isolation", "process" if resident else "subprocess",
        "--host", runtime.rpartition(":")[0],
        "--port", runtime.rpartition(":")[2],
    ]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        argv += ["--max-wait-time", str(max_wait_time)]
    env = {**os.environ, **OFFLINE_ENV}
    # The SuperNode starts `flower-superexec` (and it `flwr-clientapp`) from PATH: the ones beside this interpreter.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(device.flwr_home.resolve())  # per device: two devices on one machine never share it
    executor = [sys.executable, "-m", "fedinterest.client.warm_executor", "--runtime-api-address", runtime] if resident else None
    # Flower's SuperExec asks the SuperNode for a task once a second by default; a resident
    # executor is idle between messages, so it may ask more often (a loopback request).
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
    return SuperNodeLaunch(argv, env, executor)


@dataclass(frozen=True)
class SuperNodeExit:
    """How one SuperNode process ended."""

    code: int
    activation_refused: bool  # the SuperLink answered "[code: 2004] Failed to activate SuperNode."


def run_supernode(
    launch: SuperNodeLaunch, on_start: Callable[[int], None] | None = None, on_activated: Callable[[int], None] | None = None
) -> SuperNodeExit:
    """Run the SuperNode in the foreground until it exits; its exit code and whether activation was refused.

    Its output is passed through line by line (and read for the activation refusal).
    SIGTERM, SIGHUP and Ctrl-C (SIGINT) are passed on to it; if this process dies (even by SIGKILL) the kernel sends the SuperNode
    SIGTERM, so it exits instead of running on as an orphan. (It does not sign off: Flower 1.41's
    SuperNode serves its runtime API with uvicorn, whose own SIGTERM handler ends the process
    without the DeactivateNode call, so the SuperLink shows the node online until two 30-s
    heartbeats are missed; measured 57 s, tests/test_device_lifecycle.py.)
    """
    # Its own process group: once it has exited, what it started (its SuperExec, which would
    # keep retrying the dead SuperNode for minutes, holding the output pipe) is ended with it.
    process = subprocess.Popen(
        launch.argv, env=launch.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent, process_group=0,
    )
    if on_start is not None:
        on_start(process.pid)
    refused = threading.Event()
    pumps = [threading.Thread(target=_pass_through, args=(process, refused, on_activated), name="supernode-output", daemon=True)]
    if launch.executor_argv is not None:
        # In the SuperNode's process group (ended with it), and told when the SuperNode goes.
        executor = subprocess.Popen(
            [*launch.executor_argv, "--parent-pid", str(process.pid)], env=launch.env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, preexec_fn=_die_with_parent, process_group=process.pid,
        )
        pumps.append(threading.Thread(target=_pass_through, args=(executor, refused, None), name="executor-output", daemon=True))
    for pump in pumps:
        pump.start()

    def forward(signum: int, _frame: object) -> None:
        process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        while True:
            try:
                code = process.wait()
                break
            except KeyboardInterrupt:
                process.send_signal(signal.SIGINT)  # a new process group: Ctrl-C is passed on; then wait for its exit
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    for pump in pumps:
        pump.join(timeout=10)
    return SuperNodeExit(code, refused.is_set())


def _pass_through(process: subprocess.Popen[bytes], refused: threading.Event, on_activated: Callable[[int], None] | None) -> None:
    """Copy the SuperNode's output to our stderr, noting an activation refusal or acceptance."""
    assert process.stdout is not None
    for raw in process.stdout:
        if ACTIVATION_REFUSED.encode() in raw:
            refused.set()
        accepted = ACTIVATED.search(raw)
        if accepted and on_activated is not None:
            on_activated(int(accepted.group(1)))
        sys.stderr.buffer.write(raw)
        sys.stderr.buffer.flush()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the SuperNode then outlives a killed parent, as before


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
