"""Saving and loading model weights: safetensors for the arrays, JSON for the shape.

Writes go to a temporary file that is renamed into place, so a crash mid-write never
leaves a half-written model where a reader expects a whole one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where weights are written or read, not by atomic_write_text's users
    from fedinterest.common.model import InterestModel


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_model(model: InterestModel, directory: Path, name: str = "model") -> Path:
    """`name.safetensors` plus `name.json` (the ModelConfig) in `directory`."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"{name}.safetensors"
    tmp = weights.with_name(weights.name + ".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, weights)
    atomic_write_text(directory / f"{name}.json", json.dumps(asdict(model.config), indent=2))
    return weights


def load_model(directory: Path, name: str = "model") -> InterestModel:
    """The model saved by `save_model`, in eval mode."""
    from safetensors.torch import load_file

    from fedinterest.common.model import InterestModel, ModelConfig

    config_path = directory / f"{name}.json"
    weights_path = directory / f"{name}.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no saved model here")
    model = InterestModel(ModelConfig(**json.loads(config_path.read_text(encoding="utf-8"))))
    model.load_state_dict(load_file(str(weights_path)))
    return model.eval()
