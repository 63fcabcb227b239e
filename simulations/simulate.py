"""Run the federated apps in Flower's simulation engine and report on the run.

A simulation config is a TOML file with two tables:

    [run]          # RunConfig keys, kebab-case (common/run_config.py has the defaults)
    dataset = "ml-100k"
    data-path = "../../../shared/data/ml-100k/u.data"   # relative to this file
    [federation]
    num-supernodes = 943   # virtual devices; default: one per user of the dataset
    client-cpus = 1        # CPUs Ray reserves per virtual device

`resolve_config` parses it once (plus `--set key=value` overrides) into a checked
`SimulationConfig`; `run_simulation` prepares a run directory, runs Flower, follows
`metrics.jsonl`, checks how the run ended and writes the privacy report and plots.
`resume_config` reads an interrupted run directory back, and `run_simulation(...,
resume=True)` runs it again in place (the ServerApp resumes after its last checkpoint).

Why the runner starts its own SuperLink: in flwr 1.41 the default `:local:` connection
lazily starts a detached SuperLink on the fixed port 39091 that outlives the command and
is shared by every FLWR_HOME on the machine, so two concurrent runs would submit to the
same SuperLink. Here each run gets a private FLWR_HOME, a SuperLink on a free loopback
port that the runner stops at the end, and the offline flags of DESIGN.md.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import fedinterest.simulations
from fedinterest.common.datasets import SYNTHETIC, load_split
from fedinterest.common.errors import FedinterestError, JobFailed
from fedinterest.common.run_config import RESUME_OVERRIDABLE, RunConfig, keys_with
from fedinterest.common.serialization import atomic_write_text
from fedinterest.server.flower_processes import ANSI as _ANSI
from fedinterest.server.flower_processes import (  # noqa: F401
    COMPLETED,
    OFFLINE_ENV,
    flower_env,
    last_exception,
    log_tail,
    run_status,
    stop_run,
)
from fedinterest.server.flower_processes import executable as _executable
from fedinterest.server.flower_processes import free_port as _free_port
from fedinterest.server.rounds import (  # the files the ServerApp writes
    FINAL_FILE,
    METRICS_FILE,
)
from fedinterest.server.run_metrics import (  # noqa: F401
    MetricsFollower,
    RoundRow,
    parse_row,
    read_rows,
)
from fedinterest.server.run_metrics import as_number as _as_number
from fedinterest.server.run_overrides import flat_toml, parse_set_items, toml_value
from fedinterest.simulations.provenance import git_commit, machine
from fedinterest.simulations.runs import new_run_dir, write_json

# The Flower-process and metrics helpers live in server/ (shared with the operator CLI);
# OFFLINE_ENV and the metrics readers stay importable from here.

# Files the ServerApp writes into the run directory (the contract with server/app.py).
CHECKPOINT_DIR = "checkpoints"
DEVICES_DIR = "devices"
# Files this runner writes.
FLWR_LOG = "flwr.log"
SUPERLINK_LOG = "superlink.log"
FLWR_HOME_DIR = "flwr-home"
RESOLVED_TOML = "config.resolved.toml"
RESOLVED_JSON = "config.resolved.json"
FLOWER_RUN_JSON = "flower_run.json"
PRIVACY_JSON = "privacy_report.json"
PRIVACY_MD = "privacy_report.md"
NDCG_PNG = "ndcg.png"
EPSILON_PNG = "epsilon.png"

RUN_TABLE = "run"
# Run keys naming files: relative to the config file (in it) or to the current directory (--set).
PATH_KEYS = ("data-path", "item-attributes")
FEDERATION_TABLE = "federation"
NUM_SUPERNODES = "num-supernodes"
CLIENT_CPUS = "client-cpus"
FEDERATION_KEYS = (NUM_SUPERNODES, CLIENT_CPUS)

SUPERLINK_CONNECTION = "simulate"
SUPERLINK_STARTUP_SECONDS = 60.0
STATUS_SETTLE_SECONDS = 30.0
_RUN_ID = re.compile(r"Successfully started run (\d+)")

# What on-device DP-SGD protects (common/examples.py defines the training example).
UNIT_OF_PROTECTION = (
    "one training example of one device: a window of up to max-len consecutive "
    "(input item, next item) pairs of the user's training history, added or removed "
    "(layer 1, on-device DP-SGD; the window count stays on the device)"
)
SEEDED_NOISE_WARNING = (
    "research-noise-seed is set: every DP noise draw and the layer-2 sampling follow from it, so anyone "
    "who knows the seed can reproduce the noise; the privacy figures of this run do not hold"
)
USER_LEVEL_NOTE = (
    "not applied: this run has no server-side DP-FedAvg (layer 2), so a user's whole "
    "history is protected only through the per-example guarantee and its group privacy"
)


class SimulationConfigError(FedinterestError, ValueError):
    """A simulation config or override that cannot run (the message names the key)."""


class SimulationFailed(JobFailed, RuntimeError):
    """The Flower run did not complete; `reason` says why and `log_tail` shows flwr's last lines."""

    def __init__(self, reason: str, run_dir: Path, log_tail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.run_dir = run_dir
        self.log_tail = log_tail


@dataclass(frozen=True)
class FederationConfig:
    """The simulated federation: how many virtual devices and the CPUs each one holds."""

    num_supernodes: int | None = None  # None: one virtual device per user of the dataset
    client_cpus: int = 1

    def __post_init__(self) -> None:
        for key, value in ((NUM_SUPERNODES, self.num_supernodes), (CLIENT_CPUS, self.client_cpus)):
            if value is None and key == NUM_SUPERNODES:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SimulationConfigError(f"[federation] {key} must be an integer >= 1, got {value!r}")

    def flower_args(self) -> str:
        """The `--federation-config` string of `flwr run` (num-supernodes must be set)."""
        if self.num_supernodes is None:
            raise ValueError("num-supernodes is not resolved yet")
        return f"num-supernodes={self.num_supernodes} client-resources-num-cpus={self.client_cpus}"


@dataclass(frozen=True)
class SimulationConfig:
    """One simulation, resolved and checked: its name, the run config and the federation."""

    name: str
    run: RunConfig
    federation: FederationConfig
    source: str | None = None  # the config file it came from
    overrides: tuple[str, ...] = ()  # the --set items, as given


@dataclass
class SimulationResult:
    """What a completed simulation left behind."""

    run_dir: Path
    run_id: int
    config: SimulationConfig
    rows: list[RoundRow]
    final: dict[str, Any]
    privacy: dict[str, Any]
    wall_seconds: float
    summary: dict[str, Any]


# --------------------------------------------------------------------------- config


def parse_overrides(items: Sequence[str]) -> dict[str, object]:
    """`--set key=value` items as a mapping; values are TOML literals, or plain strings.

    A string field takes the text as it is (`dataset=ml-100k`, quotes optional); other
    fields need a TOML literal of their type (`noise-multiplier=0.5`, `seed=3`).
    """
    try:
        return parse_set_items(items, {NUM_SUPERNODES: int, CLIENT_CPUS: int})
    except ValueError as err:
        raise SimulationConfigError(str(err)) from err


def resolve_config(path: Path, overrides: Sequence[str] = (), *, cwd: Path | None = None) -> SimulationConfig:
    """Read a simulation TOML, apply `--set` overrides, check everything through RunConfig.

    A relative `data-path` in the file is relative to the file; one given with `--set`
    is relative to `cwd` (the current directory by default).
    """
    path = Path(path)
    cwd = Path.cwd() if cwd is None else Path(cwd)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise SimulationConfigError(f"{path}: no such config file") from err
    except tomllib.TOMLDecodeError as err:
        raise SimulationConfigError(f"{path}: not valid TOML ({err})") from err
    unknown = sorted(set(document) - {RUN_TABLE, FEDERATION_TABLE})
    if unknown:
        raise SimulationConfigError(f"{path}: unknown tables or keys {unknown}; a config has only [run] and [federation]")
    run_table = _table(document, RUN_TABLE, path)
    federation_table = _table(document, FEDERATION_TABLE, path)
    bad = sorted(set(federation_table) - set(FEDERATION_KEYS))
    if bad:
        raise SimulationConfigError(f"{path}: unknown [federation] keys {bad}; known: {list(FEDERATION_KEYS)}")

    run_values = dict(run_table)
    for key in PATH_KEYS:
        if run_values.get(key):
            run_values[key] = _resolve_path(run_values[key], path.resolve().parent)
    set_values = parse_overrides(overrides)
    for key, value in set_values.items():
        if key in FEDERATION_KEYS:
            federation_table[key] = value
        elif key in PATH_KEYS and value:
            run_values[key] = _resolve_path(value, cwd)
        else:
            run_values[key] = value
    if "run-dir" in run_values:
        raise SimulationConfigError("run-dir is set by the runner (the run directory under --out); leave it out")
    try:
        run = RunConfig.from_flower(run_values)
    except ValueError as err:
        raise SimulationConfigError(str(err)) from err
    federation = FederationConfig(
        num_supernodes=federation_table.get(NUM_SUPERNODES), client_cpus=federation_table.get(CLIENT_CPUS, 1)
    )
    return SimulationConfig(name=path.stem, run=run, federation=federation, source=str(path.resolve()), overrides=tuple(overrides))


def _table(document: Mapping[str, Any], name: str, path: Path) -> dict[str, Any]:
    table = document.get(name, {})
    if not isinstance(table, dict):
        raise SimulationConfigError(f"{path}: [{name}] must be a table")
    nested = sorted(k for k, v in table.items() if isinstance(v, dict))
    if nested:
        raise SimulationConfigError(f"{path}: [{name}] holds sub-tables {nested}; keys are flat (e.g. noise-multiplier = 1.0)")
    return dict(table)


def _resolve_path(value: object, base: Path) -> object:
    if not isinstance(value, str):
        return value  # RunConfig reports the wrong type
    candidate = Path(value).expanduser()
    return str(candidate if candidate.is_absolute() else (base / candidate).resolve())


def check_project(project_dir: Path) -> None:
    """Fail early when the Flower app's pyproject would make flwr reject the run config.

    flwr 1.41 refuses (`Invalid run configuration`) any `--run-config` key that is not
    in `[tool.flwr.app.config]`, and the runner passes every RunConfig key.
    """
    pyproject = project_dir / "pyproject.toml"
    try:
        document = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (FileNotFoundError, tomllib.TOMLDecodeError) as err:
        raise SimulationConfigError(f"{pyproject}: cannot read the Flower app config ({err})") from err
    app = document.get("tool", {}).get("flwr", {}).get("app", {})
    if "components" not in app:
        raise SimulationConfigError(f"{pyproject}: no [tool.flwr.app.components] (serverapp/clientapp)")
    declared = set(app.get("config", {}))
    missing = sorted(set(RunConfig().to_flower()) - declared)
    if missing:
        raise SimulationConfigError(
            f"{pyproject}: [tool.flwr.app.config] lacks run-config keys {missing}; flwr rejects a run that "
            "sets keys its app does not declare (every RunConfig key must be listed there)"
        )


def project_dir() -> Path:
    """The directory holding the Flower app's pyproject.toml (the repository root)."""
    return Path(fedinterest.simulations.__file__).resolve().parents[1]


def count_users(run: RunConfig) -> tuple[int, int]:
    """(users with a leave-one-out split, catalogue size) of the run's dataset."""
    split = load_split(run.dataset_spec())
    return len(split), split.num_items


# --------------------------------------------------------------------------- run directory


@dataclass(frozen=True)
class PreparedRun:
    """A run directory ready for Flower: the final config (run-dir set) and where things go."""

    run_dir: Path
    flwr_home: Path
    config: SimulationConfig
    dataset: dict[str, Any]
    commit: str | None


def prepare_run(config: SimulationConfig, out: Path, *, argv: Sequence[str] = ()) -> PreparedRun:
    """Resolve the federation size, create the run directory and write the resolved config.

    With num-supernodes unset the dataset is loaded to count its users (one device per
    user); with it set the data is left to the apps, which report their own errors.
    """
    commit = git_commit()
    dataset: dict[str, Any] = {"spec": config.run.dataset_spec().label}
    federation = config.federation
    if federation.num_supernodes is None:
        users, items = count_users(config.run)
        if users < 1:
            raise SimulationConfigError(f"dataset {dataset['spec']!r} has no user with at least 3 interactions")
        dataset.update(users=users, items=items)
        federation = replace(federation, num_supernodes=-(-users // config.run.users_per_node))
    elif config.run.dataset == SYNTHETIC:
        # Every synthetic user has a split (histories are at least 3 long), so this check is free.
        nodes = -(-config.run.synthetic_users // config.run.users_per_node)
        if federation.num_supernodes > nodes:
            raise SimulationConfigError(
                f"{NUM_SUPERNODES} = {federation.num_supernodes} exceeds the {config.run.synthetic_users} synthetic users "
                f"at users-per-node {config.run.users_per_node} ({nodes} node(s))"
            )
    run_dir = new_run_dir(Path(out), f"simulate-{config.name}").resolve()
    flwr_home = run_dir / FLWR_HOME_DIR
    flwr_home.mkdir()
    final = replace(config, run=replace(config.run, run_dir=str(run_dir)), federation=federation)
    resolved = {
        "command": ["fedinterest", "simulate", *argv] if argv else None,
        "source": config.source,
        "overrides": list(config.overrides),
        "commit": commit,
        "machine": machine(threads=1),
        "flwr": _flwr_version(),
        # Flower's simulation engine calls ray.init() without an address, so Ray's RAY_ADDRESS
        # decides which cluster runs the ClientApps (docs/simulations.md, "On a Ray cluster").
        "ray_address": os.environ.get("RAY_ADDRESS") or None,
        "dataset": dataset,
        RUN_TABLE: final.run.to_flower(),
        FEDERATION_TABLE: {NUM_SUPERNODES: federation.num_supernodes, CLIENT_CPUS: federation.client_cpus},
    }
    write_json(run_dir / RESOLVED_JSON, resolved)
    atomic_write_text(run_dir / RESOLVED_TOML, _resolved_toml(resolved))
    return PreparedRun(run_dir=run_dir, flwr_home=flwr_home, config=final, dataset=dataset, commit=commit)


# Keys `--set` may change when resuming: the checkpoint accepts no other change (server/checkpoint.py).
RESUME_KEYS = keys_with(RESUME_OVERRIDABLE)


def resume_config(run_dir: Path, overrides: Sequence[str] = ()) -> SimulationConfig:
    """The resolved config of an earlier run directory, to run again in place (`--resume`).

    Only num-server-rounds may be overridden (to train further): the ServerApp resumes
    from the last checkpoint only under the config it was written with.
    """
    run_dir = Path(run_dir).resolve()
    path = run_dir / RESOLVED_JSON
    try:
        resolved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise SimulationConfigError(f"{run_dir}: no {RESOLVED_JSON}; not a run directory of `fedinterest simulate`") from err
    except json.JSONDecodeError as err:
        raise SimulationConfigError(f"{path}: not valid JSON ({err})") from err
    set_values = parse_overrides(overrides)
    bad = sorted(set(set_values) - set(RESUME_KEYS))
    if bad:
        raise SimulationConfigError(f"--resume takes only {', '.join(RESUME_KEYS)} as --set; got {bad} (start a new run to change them)")
    # The directory may have moved since: the run writes where it is now (run-dir is not hashed).
    run_values = {**resolved.get(RUN_TABLE, {}), **set_values, "run-dir": str(run_dir)}
    federation_table = resolved.get(FEDERATION_TABLE, {})
    try:
        run = RunConfig.from_flower(run_values)
    except ValueError as err:
        raise SimulationConfigError(f"{path}: {err}") from err
    federation = FederationConfig(num_supernodes=federation_table.get(NUM_SUPERNODES), client_cpus=federation_table.get(CLIENT_CPUS, 1))
    if federation.num_supernodes is None:
        raise SimulationConfigError(f"{path}: [federation] {NUM_SUPERNODES} is missing")
    source = resolved.get("source")
    name = Path(source).stem if source else run_dir.name
    return SimulationConfig(name=name, run=run, federation=federation, source=source, overrides=tuple(resolved.get("overrides") or ()) + tuple(overrides))


def prepare_resume(config: SimulationConfig, *, argv: Sequence[str] = ()) -> PreparedRun:
    """The run directory of `config` ready for another Flower run: a fresh FLWR_HOME.

    The earlier FLWR_HOME (its SuperLink database holds the interrupted Flower run) is
    kept as `flwr-home.N`; checkpoints, metrics and device ledgers stay where they are,
    and the ServerApp resumes after the last checkpoint.
    """
    run_dir = Path(config.run.run_dir)
    flwr_home = run_dir / FLWR_HOME_DIR
    if flwr_home.exists():
        attempt = 1
        while (run_dir / f"{FLWR_HOME_DIR}.{attempt}").exists():
            attempt += 1
        flwr_home.rename(run_dir / f"{FLWR_HOME_DIR}.{attempt}")
    flwr_home.mkdir()
    resolved_path = run_dir / RESOLVED_JSON
    resolved = json.loads(resolved_path.read_text(encoding="utf-8"))
    resolved.setdefault("resumes", []).append({
        "command": ["fedinterest", "simulate", *argv] if argv else None,
        "commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    resolved[RUN_TABLE] = config.run.to_flower()
    write_json(resolved_path, resolved)
    dataset = dict(resolved.get("dataset") or {"spec": config.run.dataset_spec().label})
    return PreparedRun(run_dir=run_dir, flwr_home=flwr_home, config=config, dataset=dataset, commit=git_commit())


def _flwr_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("flwr")
    except Exception:  # noqa: BLE001 - provenance is best effort
        return None


def _resolved_toml(resolved: Mapping[str, Any]) -> str:
    """The resolved config as a TOML file `fedinterest simulate` can run again."""
    lines = [
        "# Resolved by `fedinterest simulate`: every RunConfig key, defaults included.",
        f"# source: {resolved['source']}",
        f"# overrides: {' '.join(resolved['overrides']) or '-'}",
        f"# commit: {resolved['commit']}   flwr: {resolved['flwr']}",
        "# run-dir is the directory of this run; leave it out to run this file again.",
        "",
    ]
    for table in (RUN_TABLE, FEDERATION_TABLE):
        lines.append(f"[{table}]")
        for key, value in resolved[table].items():
            prefix = "# " if key == "run-dir" else ""
            lines.append(f"{prefix}{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


_toml_value = toml_value
_flat_toml = flat_toml


# --------------------------------------------------------------------------- Flower


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


class SuperLink:
    """A `flower-superlink --simulation` on a free loopback port, stopped on exit."""

    def __init__(self, flwr_home: Path, log_path: Path, env: Mapping[str, str]) -> None:
        self.port = _free_port()
        self.log_path = log_path
        self.env = dict(env)
        self.flwr_home = flwr_home
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SuperLink:
        command = [
            _executable("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--database", str(self.flwr_home / "superlink.db"),
            "--disable-runtime-dependency-installation",
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.flwr_home)
        deadline = time.monotonic() + SUPERLINK_STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SimulationFailed(
                    f"flower-superlink exited with code {self.process.returncode} before it was ready",
                    self.flwr_home.parent, log_tail(self.log_path),
                )
            if self._healthy():
                return self
            time.sleep(0.2)
        self.stop()
        raise SimulationFailed(f"flower-superlink was not ready after {SUPERLINK_STARTUP_SECONDS:.0f} s", self.flwr_home.parent, log_tail(self.log_path))

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """SIGTERM (it stops its SuperExec), then SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)


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
    atomic_write_text(run_config_file, _flat_toml(config.run.to_flower()))
    flwr_log = run_dir / FLWR_LOG
    follower = MetricsFollower(run_dir / METRICS_FILE)
    run_id: int | None = None
    status: dict[str, Any] = {}
    failure: str | None = None

    def fail(reason: str) -> SimulationFailed:
        record = {"run_id": run_id, "status": status.get("status"), "status_details": status.get("status-details"), "failure": reason}
        write_json(run_dir / FLOWER_RUN_JSON, record)
        return SimulationFailed(reason, run_dir, log_tail(flwr_log))

    with SuperLink(flwr_home, run_dir / SUPERLINK_LOG, env) as superlink:
        write_flower_config(flwr_home, superlink.port)
        command = [
            _executable("flwr"), "run", str(app_dir), "--stream",
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
    match = _RUN_ID.search(_ANSI.sub("", text))
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


# --------------------------------------------------------------------------- report


def _json_number(value: float | None) -> float | str | None:
    """JSON has no infinity: write it as the string "inf"."""
    if value is None or math.isnan(value):
        return None
    return "inf" if math.isinf(value) else value


def _final_epsilon(final: Mapping[str, Any], rows: Sequence[RoundRow]) -> tuple[float | None, float | None]:
    """(max, mean) device epsilon at the end: final.json's privacy summary, else the last row that has one."""
    server = final.get("privacy") if isinstance(final.get("privacy"), dict) else {}
    eps_max, eps_mean = _as_number(server.get("device_epsilon_max")), _as_number(server.get("device_epsilon_mean"))
    if eps_max is not None or eps_mean is not None:
        return eps_max, eps_mean
    for row in reversed(rows):
        if row.number("epsilon_max") is not None:
            return row.number("epsilon_max"), row.number("epsilon_mean")
    return None, None


def _split_metrics(final: Mapping[str, Any], split: str) -> dict[str, float]:
    """final.json's metrics of one split ("valid" or "test")."""
    metrics = final.get(split)
    if not isinstance(metrics, dict):
        return {}
    return {k: float(v) for k, v in metrics.items() if _as_number(v) is not None}


def _best_valid(final: Mapping[str, Any]) -> dict[str, Any] | None:
    """The round with the best validation NDCG@10 and its test metrics (None when never evaluated)."""
    best = final.get("best_valid")
    if not isinstance(best, dict) or not isinstance(best.get("round"), int):
        return None
    return {"round": best["round"], "test": _split_metrics(best, "test")}


def ledger_epsilons(run_dir: Path, delta: float) -> dict[str, tuple[float, int]]:
    """Per user account in the node ledgers under `{run_dir}/devices/`: (epsilon at `delta`, rounds charged).

    The ledger is the devices' own accountant state, so this is the device-side figure,
    recomputed with Opacus's RDP accountant; the ServerApp's figure is what devices reported.
    Keys name the user by its index in the dataset.
    """
    from fedinterest.client.ledger import PrivacyLedger

    found: dict[str, tuple[float, int]] = {}
    for path in sorted((run_dir / DEVICES_DIR).glob("*.sqlite")):
        with PrivacyLedger(path) as node:
            for user in node.users():
                account = node.for_user(user)
                found[f"user-{user}"] = (account.epsilon(delta), len(account.entries()))
    return found


def privacy_report(
    config: SimulationConfig, rows: Sequence[RoundRow], final: Mapping[str, Any], ledgers: Mapping[str, tuple[float, int]] | None = None
) -> dict[str, Any]:
    """The privacy facts of a finished run, each with its unit and assumptions."""
    run = config.run
    eps_max, eps_mean = _final_epsilon(final, rows)
    counts = final.get("counts") if isinstance(final.get("counts"), dict) else {}
    per_round_refused = [int(r.number("refused") or 0) for r in rows]
    refused_total = _as_number(counts.get("refused"))
    server = final.get("privacy") if isinstance(final.get("privacy"), dict) else {}
    report: dict[str, Any] = {
        "dp": run.private,
        "layer": "1: on-device DP-SGD (Opacus); each device keeps its own accountant in its privacy ledger"
        + ("; and 2: user-level DP-FedAvg on the server (see user_level)" if run.user_private else ""),
        "unit_of_protection": UNIT_OF_PROTECTION,
        "user_level": _user_level(server, run),
        "aggregation": run.aggregation,  # "secagg+": the server learns only the sum (Flower's SecAgg+)
        "accountant": "Opacus RDPAccountant (RDP), recomputed by each device from its ledger" if run.private else None,
        "delta": run.delta,
        "epsilon_budget": run.epsilon_budget,
        "noise_multiplier": run.noise_multiplier,
        "max_grad_norm": run.max_grad_norm,
        "expected_batch_size": run.batch_size,
        "local_epochs": run.local_epochs,
        "devices": config.federation.num_supernodes,
        "device_epsilon": {
            "max": _json_number(eps_max if run.private else math.inf),
            "mean": _json_number(eps_mean if run.private else math.inf),
            "devices_reporting": server.get("devices_reporting"),
            "source": "final.json: the highest cumulative epsilon each device reported to the server",
            "meaning": "cumulative example-level epsilon of each device at the run's delta, over the devices that reported one",
        },
        "refusals": {
            "device_rounds": int(refused_total) if refused_total is not None else sum(per_round_refused),
            "rounds_with_refusals": sum(1 for n in per_round_refused if n > 0),
            "meaning": "a device refuses to train when one more round would take it past the budget; "
            "the ServerApp counts refusals per round, not which devices they came from",
        },
        "per_round": [
            {
                "round": r.round,
                "epsilon_max": _json_number(r.number("epsilon_max")),
                "epsilon_mean": _json_number(r.number("epsilon_mean")),
                "refused": r.get("refused"),
            }
            for r in rows
        ],
    }
    if ledgers is not None:
        trained = sorted(eps for eps, charged in ledgers.values() if charged > 0)
        finite = [e for e in trained if math.isfinite(e)]
        report["ledgers"] = {
            "source": f"{DEVICES_DIR}/*.sqlite, epsilon recomputed here with Opacus's RDP accountant at the run's delta",
            "devices_with_ledger": len(ledgers),
            "devices_trained": len(trained),
            "epsilon_max": _json_number(max(trained)) if trained else None,
            "epsilon_mean": _json_number(sum(finite) / len(finite)) if finite and len(finite) == len(trained) else None,
            "epsilon_median": _json_number(trained[len(trained) // 2]) if trained else None,
            "devices_over_budget": sum(1 for e in trained if e > run.epsilon_budget),
        }
    if not run.private:
        report["note"] = "noise-multiplier = 0: DP-SGD is off; no clipping, no noise, epsilon is infinite"
    report["noise_source"] = "research-noise-seed (reproducible)" if run.noise_seeded else "OS entropy"
    if run.noise_seeded:
        report["warning"] = SEEDED_NOISE_WARNING
    return report


def _user_level(server: Mapping[str, Any], run: RunConfig) -> dict[str, Any] | str:
    """Layer 2's figures from final.json (server/user_privacy.py), or why there are none."""
    user = server.get("user_level")
    if not run.user_private or not isinstance(user, dict):
        return USER_LEVEL_NOTE
    return dict(user)


def _user_level_line(user: Mapping[str, Any] | str) -> str:
    if isinstance(user, str):
        return user
    return (
        f"epsilon {user['epsilon']:.4g} at delta {user['delta']:.3g} after {user['rounds_accounted']} rounds "
        f"(budget {user['epsilon_budget']:g}; DP-FedAvg: update clip {user['clip_norm']:g}, noise multiplier "
        f"{user['noise_multiplier']:g}, {user['sampling']} sampling of devices, {user['accountant']} accountant): {user['unit']}"
        + (f"; noise: {user['mechanism_detail']}" if user.get("mechanism_detail") else "")
    )


def privacy_markdown(report: Mapping[str, Any]) -> str:
    """The privacy report as a short Markdown page."""
    eps = report["device_epsilon"]
    ref = report["refusals"]

    def fmt(value: Any) -> str:
        if value is None:
            return "not measured"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = [
        "# Privacy report",
        "",
        *([f"**Warning**: {report['warning']}.", ""] if report.get("warning") else []),
        f"- **Differential privacy**: {'on' if report['dp'] else 'off'} (layer {report['layer']})",
        f"- **Unit of protection**: {report['unit_of_protection']}",
        f"- **User level (layer 2)**: {_user_level_line(report['user_level'])}",
        f"- **Aggregation**: {report.get('aggregation', 'plain')}"
        + (" (Flower's SecAgg+: the server learns only the sum of the devices' vectors)" if report.get("aggregation") == "secagg+" else " (the server sees each update)"),
        f"- **Accountant**: {fmt(report['accountant'])}",
        f"- **delta**: {fmt(report['delta'])}",
        f"- **Budget per device**: epsilon {fmt(report['epsilon_budget'])} at that delta; a device refuses to train "
        "once one more round would exceed it",
        f"- **DP-SGD**: noise multiplier {fmt(report['noise_multiplier'])}, clipping norm {fmt(report['max_grad_norm'])}, "
        f"expected batch size {report['expected_batch_size']} (Poisson sampling), {report['local_epochs']} local epoch(s) per round",
        "",
        "| devices | reporting | epsilon max | epsilon mean | refusals (device-rounds) | rounds with refusals |",
        "|---|---|---|---|---|---|",
        f"| {fmt(report['devices'])} | {fmt(eps.get('devices_reporting'))} | {fmt(eps['max'])} | {fmt(eps['mean'])} "
        f"| {ref['device_rounds']} | {ref['rounds_with_refusals']} |",
        "",
        f"Epsilon is the {eps['meaning']} ({eps['source']}). Refusals: {ref['meaning']}.",
    ]
    ledgers = report.get("ledgers")
    if ledgers:
        lines += [
            "",
            f"Device ledgers ({ledgers['source']}): {ledgers['devices_trained']} of {ledgers['devices_with_ledger']} "
            f"devices trained at least once; epsilon max {fmt(ledgers['epsilon_max'])}, mean {fmt(ledgers['epsilon_mean'])}, "
            f"median {fmt(ledgers['epsilon_median'])}; {ledgers['devices_over_budget']} over the budget.",
        ]
    if report.get("note"):
        lines += ["", f"Note: {report['note']}."]
    if report["per_round"]:
        lines += ["", "| round | epsilon max | epsilon mean | refused |", "|---|---|---|---|"]
        lines += [f"| {r['round']} | {fmt(r['epsilon_max'])} | {fmt(r['epsilon_mean'])} | {fmt(r['refused'])} |" for r in report["per_round"]]
    return "\n".join(lines) + "\n"


def summarize_run(config: SimulationConfig, rows: Sequence[RoundRow], final: Mapping[str, Any], privacy: Mapping[str, Any], wall_seconds: float) -> dict[str, Any]:
    """The numbers of the final table (and of `--json`)."""
    return {
        "rounds": len(rows),
        "devices": config.federation.num_supernodes,
        "test": _split_metrics(final, "test"),
        "valid": _split_metrics(final, "valid"),
        "best_valid": _best_valid(final),
        "device_dp": config.run.noise_multiplier > 0,
        "users_per_node": config.run.users_per_node,
        "epsilon_max": privacy["device_epsilon"]["max"],
        "epsilon_mean": privacy["device_epsilon"]["mean"],
        "delta": config.run.delta,
        "epsilon_budget": config.run.epsilon_budget,
        "user_level": privacy["user_level"] if isinstance(privacy["user_level"], dict) else None,
        "stopped_early": final.get("stopped_early"),
        "refused_device_rounds": privacy["refusals"]["device_rounds"],
        "failed_replies": int((final.get("counts") or {}).get("failed", 0) or 0),
        "rejected_replies": int((final.get("counts") or {}).get("rejected", 0) or 0),
        "wall_seconds": round(wall_seconds, 1),
        "server_wall_seconds": _as_number(final.get("wall_seconds")),
        "popularity_test": popularity_test(config.run),
        "private_popularity_test": private_popularity_test(config.run, privacy["user_level"]),
        "privacy_warning": privacy.get("warning"),
    }


def popularity_test(run: RunConfig) -> dict[str, float]:
    """The popularity baseline on the same split, shown beside every federated figure (DESIGN.md)."""
    from fedinterest.common.datasets import load_split
    from fedinterest.common.metrics import summarize
    from fedinterest.simulations.baselines import popularity_ranks

    return summarize(popularity_ranks(load_split(run.dataset_spec()), "test"))


def private_popularity_test(run: RunConfig, user_level: Any) -> dict[str, Any] | None:
    """Under layer 2, popularity released with the same user-level (epsilon, delta) the model
    spent (common/popularity.py): the fair private baseline. None without layer 2."""
    if not isinstance(user_level, dict) or not user_level.get("epsilon"):
        return None
    import numpy as np

    from fedinterest.common.datasets import load_split
    from fedinterest.common.metrics import summarize
    from fedinterest.common.popularity import private_popularity_noise, private_popularity_ranks

    accountant = "rdp" if "rdp" in str(user_level.get("accountant", "")) else "prv"
    sigma = private_popularity_noise(float(user_level["epsilon"]), float(user_level["delta"]), accountant)
    ranks = private_popularity_ranks(load_split(run.dataset_spec()), "test", sigma, np.random.default_rng())  # OS entropy, as layer 2
    return {**summarize(ranks), "epsilon": user_level["epsilon"], "delta": user_level["delta"], "noise_multiplier": sigma}


def write_report(config: SimulationConfig, run_dir: Path, wall_seconds: float) -> tuple[list[RoundRow], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """privacy_report.json/.md and the plots of a completed run; (rows, final, privacy, summary)."""
    from fedinterest.server.plots import plot_epsilon, plot_ndcg

    rows = read_rows(run_dir / METRICS_FILE)
    final = json.loads((run_dir / FINAL_FILE).read_text(encoding="utf-8"))
    privacy = privacy_report(config, rows, final, ledger_epsilons(run_dir, config.run.delta))
    write_json(run_dir / PRIVACY_JSON, privacy)
    atomic_write_text(run_dir / PRIVACY_MD, privacy_markdown(privacy))
    plot_ndcg(rows, run_dir / NDCG_PNG, final_test=_as_number(_split_metrics(final, "test").get("ndcg@10")))
    plot_epsilon(rows, run_dir / EPSILON_PNG, budget=config.run.epsilon_budget if config.run.private else None)
    summary = summarize_run(config, rows, final, privacy, wall_seconds)
    return rows, final, privacy, summary


def run_simulation(
    config: SimulationConfig,
    out: Path,
    *,
    argv: Sequence[str] = (),
    app_dir: Path | None = None,
    on_prepared: Callable[[PreparedRun], None] | None = None,
    on_started: Callable[[int], None] | None = None,
    on_round: Callable[[RoundRow], None] | None = None,
    timeout: float | None = None,
    resume: bool = False,
) -> SimulationResult:
    """Prepare, run and report one simulation (raises SimulationConfigError or SimulationFailed).

    With `resume` (a config from `resume_config`), run again in the config's run
    directory instead of a new one under `out`: the ServerApp continues after the last
    checkpoint, and the devices' ledgers there keep counting.
    """
    app_dir = project_dir() if app_dir is None else Path(app_dir)
    check_project(app_dir)
    prepared = prepare_resume(config, argv=argv) if resume else prepare_run(config, out, argv=argv)
    if on_prepared is not None:
        on_prepared(prepared)
    start = time.perf_counter()
    run_id, _ = run_flower(prepared, app_dir=app_dir, on_round=on_round, on_started=on_started, timeout=timeout)
    wall = time.perf_counter() - start
    rows, final, privacy, summary = write_report(prepared.config, prepared.run_dir, wall)
    check_updates(prepared.run_dir, final)
    return SimulationResult(
        run_dir=prepared.run_dir, run_id=run_id, config=prepared.config, rows=rows, final=final,
        privacy=privacy, wall_seconds=wall, summary=summary,
    )


def check_updates(run_dir: Path, final: Mapping[str, Any]) -> None:
    """Fail a run that completed without aggregating a single device update because replies
    failed or were rejected: its metrics would describe the initial model."""
    counts = final.get("counts") if isinstance(final.get("counts"), dict) else {}
    broken = int(counts.get("failed", 0) or 0) + int(counts.get("rejected", 0) or 0)
    if int(counts.get("aggregated", 0) or 0) == 0 and broken > 0:
        hint = last_exception(run_dir / FLWR_LOG)
        reason = (
            f"no device update was aggregated in {final.get('rounds')} rounds: {counts.get('failed', 0)} replies failed "
            f"and {counts.get('rejected', 0)} were rejected"
        )
        if hint:
            reason += f"; last error in {FLWR_LOG}: {hint}"
        raise SimulationFailed(reason, run_dir, log_tail(run_dir / FLWR_LOG))
