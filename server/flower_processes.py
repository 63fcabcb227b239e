"""Flower's own processes and CLI, run offline with a private FLWR_HOME.

Shared by the simulation runner and the operator CLI: the environment every Flower
process gets (DESIGN.md runtime notes), where the executables are, a run's state from
`flwr ls` (the only reliable verdict: `flwr run --stream` exits 0 on a failed run),
stopping a run, and the readable tail of a log.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
