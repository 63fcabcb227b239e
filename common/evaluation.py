"""Leave-one-out evaluation of the model over many users (full catalogue ranking)."""

from __future__ import annotations

import numpy as np
import torch

from fedinterest.common.examples import history_batch
from fedinterest.common.metrics import target_ranks
from fedinterest.common.model import InterestModel
from fedinterest.common.split import UserSplit


@torch.no_grad()
def model_ranks(model: InterestModel, users: list[UserSplit] | tuple[UserSplit, ...], stage: str, batch_size: int = 256) -> np.ndarray:
    """The rank of every user's `stage` target under `model` (eval mode, no dropout)."""
    return offset_ranks(model, users, stage, torch.zeros(1, model.config.num_items + 1), batch_size)[0]


@torch.no_grad()
def offset_ranks(
    model: InterestModel, users: list[UserSplit] | tuple[UserSplit, ...], stage: str, offsets: torch.Tensor, batch_size: int = 256,
) -> np.ndarray:
    """Ranks (one row per row of `offsets`) of every user's `stage` target when per-item
    offsets are added to the model's scores: one forward pass serves every offset (the
    blends of common/popularity.py).

    Users are ranked in batches of similar history length, so a batch is padded only to
    its own longest history (padding does not change a real position's output).
    """
    was_training = model.training
    model.eval()
    ranks = np.zeros((len(offsets), len(users)), dtype=np.int64)
    lengths = np.array([min(len(u.history(stage)), model.config.max_len) for u in users], dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    try:
        for start in range(0, len(users), batch_size):
            rows = order[start : start + batch_size]
            chunk = [users[i] for i in rows]
            histories = [u.history(stage) for u in chunk]
            scores = model.score_last(history_batch(histories, model.config.max_len))
            targets = [u.target(stage) for u in chunk]
            for index, offset in enumerate(offsets):
                ranks[index, rows] = target_ranks(scores + offset.to(scores.dtype), targets, histories)
    finally:
        model.train(was_training)
    return ranks
