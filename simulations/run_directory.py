"""A simulation's run directory: created (or reopened to resume) with its resolved config and provenance."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedinterest.common.datasets import SYNTHETIC
from fedinterest.common.run_files import FLWR_HOME_DIR, RESOLVED_JSON, RESOLVED_TOML, read_resolved
from fedinterest.common.run_overrides import toml_value
from fedinterest.common.serialization import atomic_write_text
from fedinterest.simulations.provenance import git_commit, machine
from fedinterest.simulations.runs import new_run_dir, write_json
from fedinterest.simulations.simulation_config import (
    CLIENT_CPUS,
    FEDERATION_TABLE,
    NUM_SUPERNODES,
    RUN_TABLE,
    SimulationConfig,
    SimulationConfigError,
    count_users,
)


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
    resolved = read_resolved(run_dir)
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
            lines.append(f"{prefix}{key} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


