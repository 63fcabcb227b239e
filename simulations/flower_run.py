"""One simulation's Flower processes: a private SuperLink, `flwr run --stream`, and the run's verdict.

Why the runner starts its own SuperLink: in flwr 1.41 the default `:local:` connection
lazily starts a detached SuperLink on the fixed port 39091 that outlives the command and
is shared by every FLWR_HOME on the machine, so two concurrent runs would submit to the
same SuperLink. Here each run gets a private FLWR_HOME, a SuperLink on a free loopback
port that the runner stops at the end, and the offline flags of DESIGN.md
(server/flower_processes.py, shared with the operator's deployment).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedinterest.common.errors import JobFailed
from fedinterest.common.run_files import FINAL_FILE, FLOWER_RUN_JSON, FLWR_LOG, SUPERLINK_LOG, MetricsFollower, RoundRow
from fedinterest.common.run_overrides import flat_toml
from fedinterest.common.serialization import atomic_write_text
from fedinterest.server.flower_processes import (
    ANSI,
    COMPLETED,
    SuperLinkNotReady,
    SuperLinkProcess,
    executable,
    flower_env,
    free_port,
    log_tail,
    run_status,
    stop_run,
)
from fedinterest.simulations.run_directory import PreparedRun
from fedinterest.simulations.runs import write_json
from fedinterest.simulations.simulation_config import project_dir

SUPERLINK_CONNECTION = "simulate"
SUPERLINK_STARTUP_SECONDS = 60.0
STATUS_SETTLE_SECONDS = 30.0
_RUN_ID = re.compile(r"Successfully started run (\d+)")


class SimulationFailed(JobFailed, RuntimeError):
    """The Flower run did not complete; `reason` says why and `log_tail` shows flwr's last lines."""

    def __init__(self, reason: str, run_dir: Path, log_tail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.run_dir = run_dir
        self.log_tail = log_tail


def write_flower_config(flwr_home: Path, port: int) -> Path:
    """`$FLWR_HOME/config.toml` with one default connection: this run's SuperLink."""
    path = flwr_home / "config.toml"
    atomic_write_text(
        path,
        "# Written by `fedinterest simulate`: the run's private SuperLink (simulation runtime).\n"
        f'[superlink]\ndefault = "{SUPERLINK_CONNECTION}"\n\n'
        f'[superlink.{SUPERLINK_CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n',
    )
    return path


def simulation_superlink(flwr_home: Path, port: int, log_path: Path, env: Mapping[str, str]) -> SuperLinkProcess:
    """A `flower-superlink --simulation` on loopback `port`, its database in FLWR_HOME."""
    command = [
        executable("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
        "--host", "127.0.0.1", "--port", str(port),
        "--database", str(flwr_home / "superlink.db"),
        "--disable-runtime-dependency-installation",
    ]
    return SuperLinkProcess(
        command, health_url=f"http://127.0.0.1:{port}/health", log_path=log_path, env=env, cwd=flwr_home,
        startup_seconds=SUPERLINK_STARTUP_SECONDS,
    )


def run_flower(
    prepared: PreparedRun,
    *,
    app_dir: Path | None = None,
    on_round: Callable[[RoundRow], None] | None = None,
    on_started: Callable[[int], None] | None = None,
    timeout: float | None = None,
    poll_seconds: float = 0.5,
) -> tuple[int, dict[str, Any]]:
    """Run the prepared simulation with `flwr run --stream`; (run id, `flwr ls` entry) when it completed.

    Raises SimulationFailed when flwr fails, the run ends in any state but
    finished:completed, the ServerApp wrote no final.json, or `timeout` seconds pass.
    """
    run_dir, flwr_home, config = prepared.run_dir, prepared.flwr_home, prepared.config
    app_dir = project_dir() if app_dir is None else Path(app_dir)
    env = flower_env(flwr_home)
    run_config_file = flwr_home / "run-config.toml"
    atomic_write_text(run_config_file, flat_toml(config.run.to_flower()))
    flwr_log = run_dir / FLWR_LOG
    follower = MetricsFollower(run_dir)
    run_id: int | None = None
    status: dict[str, Any] = {}
    failure: str | None = None

    def fail(reason: str) -> SimulationFailed:
        record = {"run_id": run_id, "status": status.get("status"), "status_details": status.get("status-details"), "failure": reason}
        write_json(run_dir / FLOWER_RUN_JSON, record)
        return SimulationFailed(reason, run_dir, log_tail(flwr_log))

    port = free_port()
    superlink = simulation_superlink(flwr_home, port, run_dir / SUPERLINK_LOG, env)
    try:
        superlink.start()
    except SuperLinkNotReady as err:
        raise SimulationFailed(str(err), run_dir, log_tail(run_dir / SUPERLINK_LOG)) from err
    with superlink:
        write_flower_config(flwr_home, port)
        command = [
            executable("flwr"), "run", str(app_dir), "--stream",
            "--federation-config", config.federation.flower_args(),
            "--run-config", str(run_config_file),
        ]
        deadline = None if timeout is None else time.monotonic() + timeout
        with open(flwr_log, "ab") as log:
            log_start = log.tell()  # where this attempt's output starts (after an interrupted one, on --resume)
            log.write(("$ " + " ".join(command) + "\n").encode())
            log.flush()
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=run_dir)
            try:
                while process.poll() is None:
                    run_id = run_id if run_id is not None else _find_run_id(flwr_log, on_started, log_start)
                    for row in follower.poll():
                        if on_round is not None:
                            on_round(row)
                    if deadline is not None and time.monotonic() > deadline:
                        failure = f"timed out after {timeout:.0f} s; the run was stopped"
                        if run_id is not None:
                            stop_run(run_id, env)
                        process.terminate()
                        process.wait(timeout=30)
                        break
                    time.sleep(poll_seconds)
            finally:
                if process.poll() is None:  # interrupted (Ctrl-C) or a callback raised
                    if run_id is not None:
                        stop_run(run_id, env)
                    process.terminate()
                    process.wait(timeout=30)
        for row in follower.poll():
            if on_round is not None:
                on_round(row)
        run_id = run_id if run_id is not None else _find_run_id(flwr_log, on_started, log_start)
        if failure is not None:
            raise fail(failure)
        if run_id is None:
            raise fail(f"flwr run exited with code {process.returncode} without starting a run")
        try:
            status = _settled_status(run_id, env)
        except (RuntimeError, subprocess.SubprocessError, json.JSONDecodeError) as err:
            raise fail(f"could not read the status of Flower run {run_id}: {err}") from err
    state = status.get("status", "unknown")
    if state != COMPLETED:
        details = status.get("status-details") or "no details"
        raise fail(f"Flower run {run_id} ended {state}: {details}")
    if process.returncode != 0:
        raise fail(f"flwr run exited with code {process.returncode}")
    if not (run_dir / FINAL_FILE).is_file():
        raise fail(f"Flower run {run_id} completed but the ServerApp wrote no {FINAL_FILE} in {run_dir}")
    write_json(run_dir / FLOWER_RUN_JSON, {"run_id": run_id, "status": state, "status_details": status.get("status-details"), "flwr_ls": status})
    return run_id, status


def _find_run_id(flwr_log: Path, on_started: Callable[[int], None] | None, log_start: int = 0) -> int | None:
    """The run id `flwr run` printed after byte `log_start` of its log (a resumed run appends to the log)."""
    try:
        with open(flwr_log, "rb") as handle:
            handle.seek(log_start)
            text = handle.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None
    match = _RUN_ID.search(ANSI.sub("", text))
    if match is None:
        return None
    run_id = int(match.group(1))
    if on_started is not None:
        on_started(run_id)
    return run_id


def _settled_status(run_id: int, env: Mapping[str, str]) -> dict[str, Any]:
    """The run's status once it is finished (the stream can end a moment before the state is written)."""
    deadline = time.monotonic() + STATUS_SETTLE_SECONDS
    while True:
        status = run_status(run_id, env)
        if str(status.get("status", "")).startswith("finished") or time.monotonic() > deadline:
            return status
        time.sleep(0.5)

