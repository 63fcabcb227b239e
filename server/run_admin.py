"""Federated runs of a deployment: submit one (`flwr run`), read its state, stop it.

Each run gets `DIR/runs/run-<YYYYmmdd-HHMMSS>/` before it is submitted; the ServerApp
writes metrics.jsonl, final.json and checkpoints/ there (its `run-dir`), and this module
writes `run.json` (the Flower run id, the run config, the catalogue it was sized for).
A run's state is Flower's own (`flwr ls`), its progress the rows of metrics.jsonl.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fedinterest.server
from fedinterest.common.errors import FedinterestError
from fedinterest.common.run_config import DEPLOYED, RunConfig
from fedinterest.common.run_files import (
    REPLY_COUNTS,
    RUN_JSON,
    FinalReport,
    MetricsFollower,
    PrivacySummary,
    RoundRow,
    device_epsilon,
    read_rows,
)
from fedinterest.common.run_overrides import flat_toml, parse_set_items
from fedinterest.common.serialization import atomic_write_text
from fedinterest.server.catalogue_build import read_popularity
from fedinterest.server.deployment import (
    RUN_MANAGED_KEYS,
    Deployment,
    DeploymentError,
    count_catalogue,
)
from fedinterest.server.flower_processes import (
    COMPLETED,
    SuperLinkNotReady,
    flwr_json,
    run_status,
    stop_run,
)
from fedinterest.server.run_outcome import outcome
from fedinterest.server.superlink import require_ready, superlink_env

RUN_CONFIG_TOML = "run-config.toml"
RUN_PREFIX = "run-"


class RunError(FedinterestError, ValueError):
    """A run that cannot be submitted or found (the message names what and where)."""


@dataclass(frozen=True)
class SubmittedRun:
    """A run handed to the SuperLink."""

    run_id: int
    run_dir: Path
    config: RunConfig
    warnings: tuple[str, ...] = ()  # e.g. the devices' budgets cannot cover the rounds (server/budget_forecast.py)


def project_dir() -> Path:
    """The Flower app's project directory (pyproject.toml with [tool.flwr.app]); `flwr run` packs it."""
    root = Path(fedinterest.server.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise RunError(f"{root}: no pyproject.toml; `fedinterest server run` submits the app from a source checkout (editable install)")
    return root


def resolve_run_config(deployment: Deployment, overrides: Sequence[str], run_dir: Path) -> RunConfig:
    """The deployment's [run] defaults, `--set` overrides, then the keys `server run` owns."""
    try:
        values = {**deployment.run_defaults, **parse_set_items(overrides)}
    except ValueError as err:
        raise RunError(str(err)) from err
    managed = sorted(set(parse_set_items(overrides)) & set(RUN_MANAGED_KEYS))
    if managed:
        raise RunError(f"--set {', '.join(managed)}: set by `fedinterest server run` itself (dataset is {DEPLOYED!r}, num-items the catalogue size, run-dir under {deployment.runs_dir})")
    values.update({"dataset": DEPLOYED, "num-items": count_catalogue(deployment.catalogue), "run-dir": str(run_dir)})
    try:
        return RunConfig.from_flower(values)
    except ValueError as err:
        raise RunError(str(err)) from err


def _new_run_dir(deployment: Deployment) -> Path:
    deployment.runs_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        candidate = deployment.runs_dir / (f"{RUN_PREFIX}{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RunError(f"{deployment.runs_dir}: no free run directory name for {stamp}")


def check_run(deployment: Deployment, overrides: Sequence[str] = ()) -> tuple[RunConfig, tuple[str, ...]]:
    """The run config `overrides` give, and the warnings about it, before anything is created or submitted."""
    from fedinterest.server.budget_forecast import forecast_for

    config = resolve_run_config(deployment, overrides, deployment.runs_dir / "not-yet-created")
    warning = forecast_for(deployment, config)
    return config, (warning,) if warning else ()


def submit_run(deployment: Deployment, overrides: Sequence[str] = (), warnings: tuple[str, ...] = ()) -> SubmittedRun:
    """Check the run config, create the run directory and submit the run; nothing is left behind on a refusal."""
    app = project_dir()
    count_catalogue(deployment.catalogue)  # fail before anything is created
    require_ready(deployment)
    run_dir = _new_run_dir(deployment)
    try:
        config = resolve_run_config(deployment, overrides, run_dir)
        config_file = run_dir / RUN_CONFIG_TOML
        atomic_write_text(config_file, flat_toml(config.to_flower()))
        try:
            reply = flwr_json(["run", str(app), "--run-config", str(config_file)], superlink_env(deployment), timeout=300)
        except (RuntimeError, subprocess.SubprocessError) as err:
            raise RunError(f"the SuperLink did not accept the run: {err}") from err
    except BaseException:
        for path in run_dir.iterdir():
            path.unlink()
        run_dir.rmdir()
        raise
    run_id = int(reply["run-id"])
    record = {
        "run_id": run_id,
        "submitted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_config": config.to_flower(),
        "catalogue_sha256": hashlib.sha256(deployment.catalogue.read_bytes()).hexdigest(),
        "fab": {k: reply.get(k) for k in ("fab-id", "fab-version", "fab-hash")},
    }
    if warnings:
        record["warnings"] = list(warnings)
    atomic_write_text(run_dir / RUN_JSON, json.dumps(record, indent=2) + "\n")
    return SubmittedRun(run_id=run_id, run_dir=run_dir, config=config, warnings=tuple(warnings))


def list_runs(deployment: Deployment) -> list[Path]:
    """The deployment's run directories that were submitted, oldest first."""
    if not deployment.runs_dir.is_dir():
        return []
    return sorted(p for p in deployment.runs_dir.iterdir() if (p / RUN_JSON).is_file())


def read_record(run_dir: Path) -> dict[str, Any]:
    """A run directory's run.json."""
    return json.loads((run_dir / RUN_JSON).read_text(encoding="utf-8"))


def find_run(deployment: Deployment, ref: str | None) -> Path:
    """A run directory by Flower run id or directory name; the latest run when `ref` is None."""
    runs = list_runs(deployment)
    if not runs:
        raise RunError(f"{deployment.runs_dir}: no run was submitted from this deployment yet (`fedinterest server run`)")
    if ref is None:
        return runs[-1]
    for run_dir in runs:
        if run_dir.name == ref or str(read_record(run_dir).get("run_id")) == ref:
            return run_dir
    known = ", ".join(f"{r.name} (id {read_record(r)['run_id']})" for r in runs)
    raise RunError(f"no run {ref!r} in {deployment.runs_dir} (runs: {known})")


def run_config_of(run_dir: Path) -> RunConfig:
    """The run config the run was submitted with."""
    return RunConfig.from_flower(read_record(run_dir)["run_config"])


def _sum(rows: Sequence[RoundRow], key: str) -> int:
    return int(sum(r.number(key) or 0 for r in rows))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def run_state(deployment: Deployment, ref: str | None) -> dict[str, Any]:
    """Everything `server status` reports: Flower's state of the run and the progress in its directory."""
    run_dir = find_run(deployment, ref)
    record = read_record(run_dir)
    config = RunConfig.from_flower(record["run_config"])
    flower: dict[str, Any]
    try:
        require_ready(deployment)
        entry = run_status(int(record["run_id"]), superlink_env(deployment))
        flower = {k: entry.get(k) for k in ("status", "status-details", "elapsed", "pending-at", "running-at", "finished-at")}
    except (SuperLinkNotReady, RuntimeError, subprocess.SubprocessError) as err:
        flower = {"status": None, "error": f"Flower's state of the run is unknown: {err}"}
    # Read the run directory after Flower's state: a run Flower calls finished has written final.json.
    rows = read_rows(run_dir)
    final = FinalReport.read(run_dir)
    status = flower.get("status")
    last = rows[-1].raw if rows else None
    devices = {key: _sum(rows, key) for key in REPLY_COUNTS}
    verdict = outcome(final, rows, devices)
    reasons: list[str] = []
    # Read once the run has finished (one `flwr log` call), not on every poll of `run --wait`.
    if str(status).startswith("finished") and devices["refused"] + devices["failed"] + devices["rejected"] > 0:
        from fedinterest.server.run_reasons import device_reasons

        try:
            reasons = device_reasons(deployment, int(record["run_id"]))
        except (RuntimeError, subprocess.SubprocessError) as err:
            reasons = [f"the reasons per device are unknown: {err}"]
    completed = status == COMPLETED
    privacy = final.privacy if final is not None else PrivacySummary({})
    # A finished run's figure is final.json's alone; while it runs, the latest round's.
    eps_max, eps_mean = (privacy.device_epsilon_max, privacy.device_epsilon_mean) if final is not None else device_epsilon(None, rows)
    return {
        "run": run_dir.name,
        # Text, not a number: Flower's 64-bit ids are corrupted by JSON tools that read numbers as doubles.
        "run_id": str(record["run_id"]),
        "run_dir": str(run_dir),
        "flower": flower,
        "status": status,
        # Flower completed the run and at least one device's update was aggregated.
        "completed": completed and verdict["trained"] is True,
        "flower_completed": completed,
        "finished": bool(status and str(status).startswith("finished")),
        "trained": verdict["trained"],
        "outcome": verdict["verdict"],
        "outcome_why": verdict["why"],
        "warnings": record.get("warnings", []),
        "rounds_done": len(rows),
        "rounds_planned": config.num_server_rounds,
        "devices": devices,
        "latest_round": {k: _json_safe(v) for k, v in last.items()} if last else None,
        "privacy": {
            "dp": config.private,
            "epsilon_max": _json_safe(eps_max),
            "epsilon_mean": _json_safe(eps_mean),
            "delta": config.delta,
            "epsilon_budget": config.epsilon_budget,
            "unit": privacy.get("unit") or "per-device cumulative example-level epsilon (on-device DP-SGD)",
        },
        "final": {"valid": final.get("valid"), "test": final.get("test"), "best_valid": final.get("best_valid")} if final else None,
        "popularity_baseline": read_popularity(deployment.catalogue),
        "device_reasons": reasons,  # one line per device that failed, was rejected or refused (server/run_reasons.py)
    }


def stop(deployment: Deployment, ref: str) -> dict[str, Any]:
    """Ask the SuperLink to stop a run; its state afterwards."""
    run_dir = find_run(deployment, ref)
    run_id = int(read_record(run_dir)["run_id"])
    require_ready(deployment)
    env = superlink_env(deployment)
    try:
        before = run_status(run_id, env)
    except (RuntimeError, subprocess.SubprocessError) as err:
        raise RunError(f"could not reach the SuperLink to stop run {run_id}: {err}") from err
    if str(before.get("status", "")).startswith("finished"):
        raise RunError(f"run {run_id} ({run_dir.name}) has already finished: {before.get('status')}")
    stop_run(run_id, env)
    deadline = time.monotonic() + 30
    while True:
        after = run_status(run_id, env)
        if str(after.get("status", "")).startswith("finished") or time.monotonic() > deadline:
            return {"run": run_dir.name, "run_id": str(run_id), "status": after.get("status"), "status-details": after.get("status-details")}
        time.sleep(0.5)


def wait_finished(
    deployment: Deployment, ref: str | None, timeout: float, on_round: Callable[[RoundRow], None] | None = None
) -> dict[str, Any]:
    """Poll until Flower says the run finished (or `timeout` seconds pass), handing each new round to `on_round`; the last state."""
    if timeout <= 0:
        raise DeploymentError("timeout must be positive")
    deadline = time.monotonic() + timeout
    follower = MetricsFollower(find_run(deployment, ref))
    while True:
        state = run_state(deployment, ref)
        for row in follower.poll():  # after the state: a finished run has written its last row
            if on_round is not None:
                on_round(row)
        if state["finished"] or time.monotonic() > deadline:
            return state
        time.sleep(1.0)
