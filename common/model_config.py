"""The model's shape (`ModelConfig`), apart from the model so that reading it needs no torch.

RunConfig builds one to check a run's model settings, and every command that reads a
run config (the operator's `status`, `devices`, the device's `policy`) would otherwise
import torch, seconds before it can answer (issue 16). common/model.py re-exports it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines the model's shape; passed whole to `InterestModel`."""

    num_items: int
    max_len: int = 200
    dim: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.2

    def __post_init__(self) -> None:
        checks = {
            "num_items": self.num_items >= 1,
            "max_len": self.max_len >= 2,
            "dim": self.dim >= 1,
            "num_blocks": self.num_blocks >= 1,
            "num_heads": self.num_heads >= 1 and self.dim % self.num_heads == 0,
            "dropout": 0.0 <= self.dropout < 1.0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid model config {bad}: need num_items>=1, max_len>=2, dim>=1, num_blocks>=1, "
                f"num_heads>=1 dividing dim, 0<=dropout<1; got {asdict(self)}"
            )
