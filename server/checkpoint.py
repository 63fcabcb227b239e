"""Checkpoints of the federated run: the global model, the strategy's state and the run's
privacy and reply tallies, written so that a crash at any point leaves the last
complete checkpoint loadable.

Layout, in `{run_dir}/checkpoints/`:
- `round-NNNNN.safetensors`          the global model after round N (numpy arrays by key);
- `round-NNNNN.strategy.safetensors` the strategy's optimizer state (FedAdam/FedYogi
                                      moments, FedAvgM momentum), absent when it has none;
- `manifest.json`                    the pointer to the last complete checkpoint:
  {"format": 1, "round": N, "config_hash": sha256, "config": {the hashed run config},
   "weights": file name, "weights_sha256": ..., "array_order": [model keys in order],
   "strategy_state": file name or null,
   "strategy_state_sha256": ... or null, "privacy": {...}, "counts": {...},
   "elapsed_seconds": float, "metrics_row": {the round's metrics.jsonl row},
   "best": {"round", "valid", "test"} of the best validation NDCG@10 so far, "time": ISO}.

Every file is written to a temporary name, fsynced and renamed into place, and the
manifest last: until the new manifest is in place, the old one still points at the
old round's files, which are deleted only after the new manifest is committed.

- `releases.json`                    layer 2's accountant right after the last release
  {"format": 1, "round": N, "user_level": {the UserLevelAccountant's state}}, written
  (`record_release`) before the released model leaves the server -- for federated
  evaluation in a deployment, or the next round -- and before the checkpoint of that
  round. A crash in between would otherwise resume from the previous checkpoint and
  release round N again with fresh noise, one release uncounted; resume composes from
  this file instead (`last_release`), so both releases are counted.

Secrets: the manifest and releases.json hold layer 2's sampling seed (whoever has it can
recompute every round's sample, and amplification by sampling is then void) and the
per-user epsilons by user name (in a deployment, node ids: who was sampled). Every file
here is written readable by its owner only; the directory must stay on the server
(docs/privacy.md, "Assumptions and limits of layer 2").

"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from fedinterest.common.errors import FedinterestError
from fedinterest.common.run_config import UNHASHED, RunConfig, keys_with
from fedinterest.common.run_files import CHECKPOINT_DIR
from fedinterest.common.structured_files import read_json

LOG = logging.getLogger("flwr.fedinterest")

MANIFEST = "manifest.json"
RELEASES = "releases.json"
FORMAT = 1
# A resumed run may change only where it writes and how many rounds it runs in total.
UNHASHED_KEYS = keys_with(UNHASHED)
_ROUND_FILE = re.compile(r"^round-\d{5,}(\.strategy)?\.safetensors$")


class CheckpointError(FedinterestError, RuntimeError):
    """A checkpoint that cannot be read (a referenced file missing or not what was written)."""


class ConfigMismatchError(FedinterestError, ValueError):
    """The run config differs from the one the checkpoint was written with."""


@dataclass(frozen=True)
class Checkpoint:
    """Everything needed to continue a run after `round`."""

    round: int
    arrays: dict[str, np.ndarray]
    config: dict[str, Any]
    strategy_state: dict[str, np.ndarray] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    elapsed_seconds: float = 0.0
    metrics_row: dict[str, Any] | None = None
    best: dict[str, Any] = field(default_factory=dict)  # round, valid and test of the best validation so far

    @property
    def config_hash(self) -> str:
        """The hash of the config this checkpoint belongs to."""
        return _hash(self.config)


def hashed_config(config: RunConfig) -> dict[str, Any]:
    """The part of the run config a resumed run must keep unchanged."""
    return {k: v for k, v in sorted(config.to_flower().items()) if k not in UNHASHED_KEYS}


def config_hash(config: RunConfig) -> str:
    """sha256 of the run config without run-dir and num-server-rounds."""
    return _hash(hashed_config(config))


def _hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode("utf-8")).hexdigest()


def check_compatible(checkpoint: Checkpoint, config: RunConfig) -> None:
    """Raise ConfigMismatchError naming the keys that differ, unless `config` may resume `checkpoint`."""
    current = hashed_config(config)
    if _hash(current) == checkpoint.config_hash:
        return
    keys = sorted(set(current) | set(checkpoint.config))
    diffs = [f"{k}: checkpoint {checkpoint.config.get(k)!r}, now {current.get(k)!r}" for k in keys if checkpoint.config.get(k) != current.get(k)]
    raise ConfigMismatchError(
        f"the checkpoint of round {checkpoint.round} was written with a different run config "
        f"({'; '.join(diffs)}). Only run-dir and num-server-rounds may change on resume: use a new run-dir "
        "to start afresh, or restore the original settings."
    )


def save(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write `checkpoint` under `run_dir/checkpoints/`; returns the manifest's path."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"round-{checkpoint.round:05d}"
    weights = f"{stem}.safetensors"
    weights_sha = _write_arrays(directory / weights, checkpoint.arrays)
    state_name, state_sha = None, None
    if checkpoint.strategy_state:
        state_name = f"{stem}.strategy.safetensors"
        state_sha = _write_arrays(directory / state_name, checkpoint.strategy_state)
    manifest = {
        "format": FORMAT,
        "round": checkpoint.round,
        "config_hash": checkpoint.config_hash,
        "config": checkpoint.config,
        "weights": weights,
        "weights_sha256": weights_sha,
        "array_order": list(checkpoint.arrays),
        "strategy_state": state_name,
        "strategy_state_sha256": state_sha,
        "privacy": checkpoint.privacy,
        "counts": checkpoint.counts,
        "elapsed_seconds": checkpoint.elapsed_seconds,
        "metrics_row": checkpoint.metrics_row,
        "best": checkpoint.best,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    _commit_manifest(directory, manifest)
    _remove_stale(directory, keep={weights, state_name})
    return directory / MANIFEST


def latest(run_dir: Path) -> Checkpoint | None:
    """The last complete checkpoint under `run_dir`, or None when there is none."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    path = directory / MANIFEST
    if not path.is_file():
        return None
    manifest = read_json(path, CheckpointError)  # written atomically: invalid only if written by something else
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {manifest.get('format')!r} (expected {FORMAT})")
    arrays = _read_arrays(directory / manifest["weights"], manifest["weights_sha256"])
    # safetensors does not keep insertion order; the model's key order matters to FedAvgM.
    order = manifest.get("array_order") or list(arrays)
    if sorted(order) != sorted(arrays):
        raise CheckpointError(f"{path}: array_order does not name the arrays of {manifest['weights']}")
    arrays = {key: arrays[key] for key in order}
    state = {}
    if manifest.get("strategy_state"):
        state = _read_arrays(directory / manifest["strategy_state"], manifest["strategy_state_sha256"])
    checkpoint = Checkpoint(
        round=int(manifest["round"]),
        arrays=arrays,
        config=manifest["config"],
        strategy_state=state,
        privacy=manifest.get("privacy") or {},
        counts=manifest.get("counts") or {},
        elapsed_seconds=float(manifest.get("elapsed_seconds") or 0.0),
        metrics_row=manifest.get("metrics_row"),
        best=manifest.get("best") or {},
    )
    if checkpoint.config_hash != manifest["config_hash"]:
        raise CheckpointError(f"{path}: config_hash does not match the config stored beside it")
    return checkpoint


def record_release(run_dir: Path, server_round: int, user_level: dict[str, Any]) -> None:
    """Persist layer 2's accountant state after the release of `server_round` (before that model leaves the server)."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"format": FORMAT, "round": server_round, "user_level": user_level}, indent=2, allow_nan=False) + "\n"
    _atomic_write_bytes(directory / RELEASES, text.encode("utf-8"))


def last_release(run_dir: Path) -> tuple[int, dict[str, Any]] | None:
    """(round, accountant state) of the last release `record_release` persisted, or None."""
    path = Path(run_dir) / CHECKPOINT_DIR / RELEASES
    if not path.is_file():
        return None
    record = read_json(path, CheckpointError)  # written atomically: invalid only if written by something else
    if record.get("format") != FORMAT or not isinstance(record.get("round"), int) or not isinstance(record.get("user_level"), dict):
        raise CheckpointError(f"{path}: not a releases record of format {FORMAT} (round and user_level)")
    return record["round"], record["user_level"]


def user_level_state(run_dir: Path, saved: Checkpoint | None) -> dict[str, Any] | None:
    """Layer 2's accountant state to resume from: the checkpoint's, unless a later release was
    persisted (a crash between sending that model and checkpointing its round: the round
    runs again with fresh noise, and the lost release must stay counted)."""
    state = saved.privacy.get("user_level") if saved is not None else None
    released = last_release(run_dir)
    # Without a checkpoint any release counts, round 0's too (the popularity prior's, server/popularity_prior.py).
    if released is not None and (saved is None or released[0] > saved.round):
        LOG.warning("fedinterest: round %d was released after the last checkpoint; that release stays counted", released[0])
        state = released[1]
    return state


def _write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> str:
    """Write named arrays as safetensors atomically; returns the file's sha256."""
    data = save_safetensors({k: np.ascontiguousarray(v) for k, v in arrays.items()})
    _atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def _read_arrays(path: Path, sha256: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise CheckpointError(f"{path}: named by the checkpoint manifest but missing")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CheckpointError(f"{path}: contents differ from what the manifest recorded (sha256 mismatch)")
    return load_safetensors(data)


def _commit_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """The commit point of a checkpoint: the manifest replaces the previous one atomically."""
    text = json.dumps(manifest, indent=2, allow_nan=False) + "\n"
    _atomic_write_bytes(directory / MANIFEST, text.encode("utf-8"))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    # Owner only: the manifest and releases.json hold layer 2's secret sampling seed.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # also when a stale temporary of another mode was left behind
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale(directory: Path, keep: set[str | None]) -> None:
    """Delete round files and temporaries the committed manifest no longer names."""
    for path in directory.iterdir():
        if path.name in keep:
            continue
        if _ROUND_FILE.match(path.name) or path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)
