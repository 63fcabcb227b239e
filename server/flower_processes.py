"""Flower's own processes and CLI, run offline with a private FLWR_HOME.

Shared by the simulation runner and the operator CLI: the environment every Flower
process gets (DESIGN.md runtime notes), where the executables are, a SuperLink's
lifecycle (started, healthy, stopped), a run's state from `flwr ls` (the only reliable
verdict: `flwr run --stream` exits 0 on a failed run), stopping a run, and the readable
tail of a log.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedinterest.common.errors import FedinterestError

# DESIGN.md, runtime notes: no dependency installs, no telemetry, no update check.
OFFLINE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}
# The only end state of a Flower run that counts as success (`flwr ls` status text).
COMPLETED = "finished:completed"
LOG_TAIL_LINES = 40
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)):\s?(.*)$")


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of a Flower process: private FLWR_HOME, offline flags, this venv first on PATH."""
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    env["PYTHONUNBUFFERED"] = "1"
    # The SuperLink starts `flower-superexec` and `flwr-serverapp` by name: the venv first.
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def executable(name: str) -> str:
    """A Flower console script of this interpreter's environment (else found on PATH)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    return name


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SuperLinkNotReady(FedinterestError, RuntimeError):
    """The SuperLink exited, or did not answer its health check in time."""


def is_healthy(url: str, context: ssl.SSLContext | None = None, timeout: float = 2.0) -> bool:
    """Whether a SuperLink answers GET `url` (its /health endpoint) with 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class SuperLinkProcess:
    """A `flower-superlink` started in the background, healthy on entry, stopped on exit.

    The simulation runner starts one per run (plain HTTP on a free loopback port);
    `health_url` (with `context` for TLS) is its /health endpoint.
    """

    def __init__(
        self, command: Sequence[str], *, health_url: str, log_path: Path, env: Mapping[str, str], cwd: Path,
        context: ssl.SSLContext | None = None, startup_seconds: float = 60.0,
    ) -> None:
        self.command, self.health_url, self.context = list(command), health_url, context
        self.log_path, self.env, self.cwd, self.startup_seconds = log_path, dict(env), cwd, startup_seconds
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SuperLinkProcess:
        return self if self.process is not None else self.start()

    def start(self) -> SuperLinkProcess:
        """Start it and wait until healthy; SuperLinkNotReady (after stopping it) otherwise."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)
        deadline = time.monotonic() + self.startup_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SuperLinkNotReady(f"flower-superlink exited with code {self.process.returncode} before it was ready")
            if is_healthy(self.health_url, self.context, timeout=1):
                return self
            time.sleep(0.2)
        self.stop()
        raise SuperLinkNotReady(f"flower-superlink was not ready after {self.startup_seconds:.0f} s")

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM (it stops its SuperExec and ServerApp), then SIGKILL if it lingers."""
        if self.process is not None:
            terminate(self.process, grace=15)


def terminate(process: subprocess.Popen[bytes], *, grace: float) -> int:
    """SIGTERM a Flower process (it stops its children), SIGKILL it if it lingers `grace` seconds; its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=grace)
    return process.returncode


def flwr_json(args: list[str], env: Mapping[str, str], *, timeout: float = 120) -> dict[str, Any]:
    """Run `flwr ARGS --format json` and return its JSON document; RuntimeError with flwr's words otherwise."""
    done = subprocess.run([executable("flwr"), *args, "--format", "json"], check=False, capture_output=True, text=True, env=dict(env), timeout=timeout)
    text = done.stdout
    start = text.find("{")
    payload: dict[str, Any] | None = None
    if start >= 0:
        try:
            payload = json.loads(text[start:])
        except json.JSONDecodeError:
            payload = None
    if done.returncode != 0 or payload is None or payload.get("success") is False:
        message = (payload or {}).get("error-message") if payload else None
        detail = message or ANSI.sub("", (done.stdout + done.stderr)).strip()[-800:]
        raise RuntimeError(f"flwr {' '.join(args)} failed (exit {done.returncode}): {detail}")
    return payload


def run_status(run_id: int, env: Mapping[str, str]) -> dict[str, Any]:
    """The run's entry of `flwr ls --run-id ID --format json` (keys "status", "status-details", ...)."""
    payload = flwr_json(["ls", "--run-id", str(run_id)], env)
    runs = payload.get("runs") or []
    if not runs:
        raise RuntimeError(f"flwr ls --run-id {run_id}: no such run ({payload})")
    return runs[0]


def stop_run(run_id: int, env: Mapping[str, str]) -> None:
    """Ask the SuperLink to stop a run (best effort)."""
    subprocess.run([executable("flwr"), "stop", str(run_id)], capture_output=True, env=dict(env), timeout=60, check=False)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log, colour codes removed."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(ANSI.sub("", text).rstrip().splitlines()[-lines:])


def last_exception(path: Path) -> str | None:
    """The last `SomeError: message` line of a log (the root cause of a traceback), if any.

    Lines without a message are skipped: Flower re-raises a ClientApp's error as an empty
    `ClientAppException:` after the original one.
    """
    found = None
    for line in log_tail(path, lines=10_000).splitlines():
        match = _EXCEPTION_LINE.match(line.strip())
        if match and match.group(2).strip():
            found = line.strip()
    return found
