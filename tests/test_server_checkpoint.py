"""Checkpoints: round trip, atomicity under a crash, config hash, corruption."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from fedinterest.common.run_config import RunConfig
from fedinterest.server import checkpoint as ckpt

CONFIG = RunConfig(synthetic_users=4, synthetic_items=160, dim=8, max_len=8, num_blocks=1)


def make(round_: int, value: float, config: RunConfig = CONFIG, state: bool = True) -> ckpt.Checkpoint:
    return ckpt.Checkpoint(
        round=round_,
        arrays={"w": np.full((3, 2), value, dtype=np.float32), "b": np.arange(4, dtype=np.float32) + value},
        config=ckpt.hashed_config(config),
        strategy_state={"m_t/w": np.full((3, 2), value / 10, dtype=np.float32)} if state else {},
        privacy={"device_epsilon_max": {"17": 1.5 * round_}, "devices_without_dp": []},
        counts={"sampled": 5 * round_, "refused": round_},
        elapsed_seconds=2.5 * round_,
        metrics_row={"round": round_, "train_loss": value},
    )


def test_round_trip(tmp_path):
    assert ckpt.latest(tmp_path) is None
    saved = make(3, 0.25)
    ckpt.save(tmp_path, saved)
    loaded = ckpt.latest(tmp_path)
    assert loaded.round == 3 and loaded.config_hash == ckpt.config_hash(CONFIG)
    assert loaded.privacy == saved.privacy and loaded.counts == saved.counts and loaded.metrics_row == saved.metrics_row
    assert loaded.elapsed_seconds == 7.5
    assert list(loaded.arrays) == ["w", "b"]
    for key in saved.arrays:
        np.testing.assert_array_equal(loaded.arrays[key], saved.arrays[key])
    np.testing.assert_array_equal(loaded.strategy_state["m_t/w"], saved.strategy_state["m_t/w"])
    manifest = json.loads((tmp_path / ckpt.CHECKPOINT_DIR / ckpt.MANIFEST).read_text())
    assert manifest["weights"] == "round-00003.safetensors" and manifest["strategy_state"] == "round-00003.strategy.safetensors"


def test_later_checkpoint_replaces_earlier_files(tmp_path):
    ckpt.save(tmp_path, make(1, 1.0))
    ckpt.save(tmp_path, make(2, 2.0, state=False))
    names = sorted(p.name for p in (tmp_path / ckpt.CHECKPOINT_DIR).iterdir())
    assert names == ["manifest.json", "round-00002.safetensors"]
    assert ckpt.latest(tmp_path).strategy_state == {}


def test_crash_between_weights_and_manifest_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save(tmp_path, make(1, 1.0))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(ckpt, "_commit_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(tmp_path, make(2, 2.0))
    monkeypatch.undo()
    # Round 2's weights are on disk, but the manifest still names round 1, whose files remain.
    assert (tmp_path / ckpt.CHECKPOINT_DIR / "round-00002.safetensors").exists()
    loaded = ckpt.latest(tmp_path)
    assert loaded.round == 1
    np.testing.assert_array_equal(loaded.arrays["w"], np.full((3, 2), 1.0, dtype=np.float32))
    # The next successful save cleans up the orphans.
    ckpt.save(tmp_path, make(2, 2.5))
    assert ckpt.latest(tmp_path).round == 2
    assert not (tmp_path / ckpt.CHECKPOINT_DIR / "round-00001.safetensors").exists()


def test_torn_temporary_file_is_ignored(tmp_path):
    ckpt.save(tmp_path, make(1, 1.0))
    (tmp_path / ckpt.CHECKPOINT_DIR / "round-00002.safetensors.tmp").write_bytes(b"\x00half")
    (tmp_path / ckpt.CHECKPOINT_DIR / "manifest.json.tmp").write_text('{"round": 2')
    assert ckpt.latest(tmp_path).round == 1


def test_corrupted_weights_are_a_clear_error(tmp_path):
    ckpt.save(tmp_path, make(1, 1.0))
    weights = tmp_path / ckpt.CHECKPOINT_DIR / "round-00001.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        ckpt.latest(tmp_path)
    weights.unlink()
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        ckpt.latest(tmp_path)


def test_config_hash_ignores_run_dir_and_rounds_only():
    base = ckpt.config_hash(CONFIG)
    assert ckpt.config_hash(dataclasses.replace(CONFIG, run_dir="/elsewhere", num_server_rounds=99)) == base
    assert ckpt.config_hash(dataclasses.replace(CONFIG, local_lr=0.5)) != base
    ckpt.check_compatible(make(1, 1.0), dataclasses.replace(CONFIG, num_server_rounds=50, run_dir="x"))
    with pytest.raises(ckpt.ConfigMismatchError, match=r"local-lr: checkpoint 0\.001, now 0\.5"):
        ckpt.check_compatible(make(1, 1.0), dataclasses.replace(CONFIG, local_lr=0.5))
