"""Auditing a finished simulation run: its final model, evidence of who trained, and the attack on it."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedinterest.benchmarks.membership_attack import attack
from fedinterest.benchmarks.report import WINDOW_COUNT_HIDDEN
from fedinterest.common.datasets import load_split
from fedinterest.common.model import InterestModel
from fedinterest.common.run_config import RunConfig
from fedinterest.common.run_files import DEVICES_DIR, FINAL_FILE, FLWR_LOG, read_resolved
from fedinterest.server import checkpoint as ckpt

_LEDGER = re.compile(r"^partition-(\d+)\.sqlite$")
_REGISTERED = re.compile(r"fedinterest: (\d+)(?: of (\d+) expected)? nodes registered")


def final_model(run_dir: Path, run: RunConfig, num_items: int) -> tuple[InterestModel, int]:
    """The global model of the run's last checkpoint, and its round."""
    saved = ckpt.latest(run_dir)
    if saved is None:
        raise ValueError(f"{run_dir}: no checkpoint")
    model = InterestModel(run.model_config(num_items))
    model.load_state_dict({key: torch.from_numpy(np.array(value)) for key, value in saved.arrays.items()})
    return model, saved.round


def trained_partitions(run_dir: Path) -> list[int]:
    """The partitions that have a privacy ledger under `devices/`: the devices that trained."""
    found = []
    for path in (run_dir / DEVICES_DIR).glob("*.sqlite"):
        match = _LEDGER.match(path.name)
        if match:
            found.append(int(match.group(1)))
    return sorted(found)


def registered_nodes(run_dir: Path) -> int | None:
    """How many nodes the ServerApp saw registered before round 1 (from flwr.log)."""
    try:
        text = (run_dir / FLWR_LOG).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    found = _REGISTERED.findall(text)
    return int(found[-1][0]) if found else None


def check_membership(run_dir: Path, num_members: int) -> dict[str, Any]:
    """Evidence that only partitions < M trained; raises when a non-member did."""
    trained = trained_partitions(run_dir)
    registered = registered_nodes(run_dir)
    outside = [p for p in trained if p >= num_members]
    if outside:
        raise RuntimeError(f"{run_dir}: partitions {outside[:5]} >= members {num_members} trained; the member split is wrong")
    # Fewer registered than M before round 1 is no harm (late nodes join later rounds); more would be.
    if registered is not None and registered > num_members:
        raise RuntimeError(f"{run_dir}: {registered} nodes registered, more than the {num_members} members")
    return {"partitions_trained": len(trained), "max_partition_trained": max(trained) if trained else None, "nodes_registered": registered}


def user_level(final: dict[str, Any]) -> dict[str, Any] | None:
    """final.json's user-level (layer 2) privacy figures, when the run had layer 2."""
    privacy = final.get("privacy") or {}
    level = privacy.get("user_level")
    return level if isinstance(level, dict) else None


def summarize_audit(run_dir: Path, model_name: str) -> dict[str, Any]:
    """Audit a finished run: the attack on its final model beside the run's own figures."""
    run_dir = Path(run_dir)
    resolved = read_resolved(run_dir)
    final = json.loads((run_dir / FINAL_FILE).read_text(encoding="utf-8"))
    run = RunConfig.from_flower(resolved["run"])
    num_members = int(resolved["federation"]["num-supernodes"])
    split = load_split(run.dataset_spec())
    evidence = check_membership(run_dir, num_members)
    model, model_round = final_model(run_dir, run, split.num_items)
    started = time.perf_counter()
    result = attack(model, split, num_members)
    level = user_level(final)
    return {
        "dataset": run.dataset,
        "model": model_name,
        "users": len(split.users),
        "num_members": num_members,
        "membership_check": evidence,
        "attack": result,
        "attack_seconds": round(time.perf_counter() - started, 1),
        "model_round": model_round,
        "rounds": final["rounds"],
        "clients_per_round": run.clients_per_round,
        "test": final["test"],
        "best_valid": final.get("best_valid"),
        "privacy": final["privacy"],
        WINDOW_COUNT_HIDDEN: True,  # measured with the window count hidden (benchmarks/report.py)
        "user_level": level,
        # Layer 2 stops a run before a round that would pass its user-level budget.
        "stopped_early": final.get("stopped_early"),
        "run_config": {k: resolved["run"][k] for k in sorted(resolved["run"]) if k != "run-dir"},
        "counts": final["counts"],
        "wall_seconds": final["wall_seconds"],
        "command": " ".join(resolved["command"] or []),
        "commit": resolved["commit"],
        "run_dir": run_dir.name,
    }
