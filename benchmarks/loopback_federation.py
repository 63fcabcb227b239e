"""A TLS federation on loopback started with the product's own commands, for the deployment benchmarks.

`server init` (a CA, a certificate for 127.0.0.1), `server start` (Flower's SuperLink, TLS,
SuperNode authentication), per device `device init`, `device ingest` (30 interactions of
its own user), `server enroll` and `device start` (Flower's SuperNode): what a person runs.
Each device's output is read line by line and timestamped on arrival, so a benchmark can
time the messages it answered from Flower's own log lines.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fedinterest.server.flower_processes import OFFLINE_ENV, free_port

FEDINTEREST = str(Path(sys.executable).parent / "fedinterest")
CATALOGUE = 200
HISTORY = 30
_RECEIVING = re.compile(r"Receiving: (\w+) message")


def env_for(home: Path) -> dict[str, str]:
    """A child's environment: offline flags, its own FLWR_HOME, unbuffered output (read as it comes)."""
    return {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(home), "PYTHONUNBUFFERED": "1"}


def cli(args: list[str], env: dict[str, str]) -> dict:
    """`fedinterest ARGS --json`, its JSON answer (an error with its stderr if it fails)."""
    done = subprocess.run([FEDINTEREST, *args, "--json"], capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"fedinterest {' '.join(args)} exited {done.returncode}: {done.stderr[-1500:]}")
    return json.loads(done.stdout)


class Device:
    """One `device start` child whose output lines are timestamped as they arrive."""

    def __init__(self, name: str, directory: Path, command: list[str], env: dict[str, str]) -> None:
        self.name, self.directory = name, directory
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self.lines.append((time.monotonic(), raw.decode(errors="replace")))

    def messages(self) -> list[tuple[str, float, float]]:
        """(message type, monotonic time received, time its reply was sent) of every message this device answered."""
        found, pending = [], None
        for stamp, line in list(self.lines):
            match = _RECEIVING.search(line)
            if match:
                pending = (match.group(1), stamp)
            elif "Sent successfully" in line and pending is not None:
                found.append((pending[0], pending[1], stamp))
                pending = None
        return found

    def message_seconds(self) -> list[tuple[str, float]]:
        """(message type, seconds from receiving to sent) of every message this device answered."""
        return [(kind, sent - received) for kind, received, sent in self.messages()]

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=30)
                return
            except subprocess.TimeoutExpired:
                continue


@dataclass
class Federation:
    """A running federation: the operator's directory, the CLI's environment, the SuperLink and the devices."""

    server_dir: Path
    env: dict[str, str]
    superlink: subprocess.Popen[bytes]
    devices: list[Device]
    online_seconds: float
    port: int

    def run(self, settings: list[str]) -> tuple[dict, float]:
        """`server run --set ... --wait`: the run's final state and its wall seconds."""
        sets = [a for s in settings for a in ("--set", s)]
        began = time.monotonic()
        done = subprocess.run([FEDINTEREST, "server", "run", "--dir", str(self.server_dir), *sets, "--wait", "--json"],
                              capture_output=True, text=True, env=self.env, timeout=7200)
        seconds = time.monotonic() - began
        if not done.stdout.strip():
            raise RuntimeError(f"server run printed nothing (exit {done.returncode}): {done.stderr[-2000:]}")
        return json.loads(done.stdout)["state"], seconds


def _history(path: Path, k: int) -> Path:
    rows = [f"u{k},{(k * 37 + i * 7) % CATALOGUE + 1},{1_700_000_000 + 60 * i}" for i in range(1, HISTORY + 1)]
    path.write_text("user,item,timestamp\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def _wait_online(server_dir: Path, names: set[str], env: dict[str, str], timeout: float) -> float:
    started = time.monotonic()
    while True:
        rows = cli(["server", "devices", "--dir", str(server_dir)], env)["devices"]
        if names <= {row["name"] for row in rows if row["status"] == "online"}:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"devices not online after {timeout:.0f} s: {[(r['name'], r['status']) for r in rows]}")
        time.sleep(2)


@contextmanager
def federation(
    devices: int, work: Path, device_args: list[str] | None = None, address: Callable[[str, int], str] | None = None,
) -> Iterator[Federation]:
    """Start the SuperLink and `devices` enrolled devices (online) in `work`; stop them all on exit.

    `address(device name, fleet port)` is where a device connects (default 127.0.0.1:port):
    a benchmark may put a relay in between, which TLS allows as long as the host is 127.0.0.1."""
    env = env_for(work / "cli-home")
    catalogue = work / "catalogue.txt"
    catalogue.write_text("".join(f"{i}\n" for i in range(1, CATALOGUE + 1)), encoding="utf-8")
    port = free_port()
    server_dir = work / "server"
    cli(["server", "init", str(server_dir), "--catalogue", str(catalogue), "--port", str(port)], env)
    with open(work / "superlink.log", "wb") as log:
        superlink = subprocess.Popen([FEDINTEREST, "server", "start", "--dir", str(server_dir)], stdout=log, stderr=subprocess.STDOUT,
                                     env=env_for(work / "superlink-home"), start_new_session=True)
    started: list[Device] = []
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([FEDINTEREST, "server", "devices", "--dir", str(server_dir)], capture_output=True, env=env).stderr.find(b"does not answer") >= 0:
            if time.monotonic() > deadline:
                raise RuntimeError("the SuperLink did not start")
            time.sleep(1)
        for k in range(1, devices + 1):
            name, directory = f"device-{k}", work / f"device-{k}"
            cli(["device", "init", str(directory), "--catalogue", str(catalogue)], env)
            cli(["device", "ingest", str(_history(work / f"history-{k}.csv", k)), "--dir", str(directory)], env)
            cli(["server", "enroll", str(directory / "keys/device_key.pub"), "--name", name, "--dir", str(server_dir)], env)
            where = address(name, port) if address else f"127.0.0.1:{port}"
            command = [FEDINTEREST, "device", "start", "--dir", str(directory), "--server", where, "--ca", str(server_dir / "tls/ca.crt")]
            started.append(Device(name, directory, command + (device_args or []), env_for(directory / "home")))
        online = _wait_online(server_dir, {d.name for d in started}, env, timeout=300 + 20 * devices)
        yield Federation(server_dir, env, superlink, started, online, port)
    finally:
        for device in started:
            device.stop()
        try:
            os.killpg(superlink.pid, signal.SIGTERM)
            superlink.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(superlink.pid, signal.SIGKILL)
