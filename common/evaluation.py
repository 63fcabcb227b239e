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
    """The rank of every user's `stage` target under `model` (eval mode, no dropout).

    Users are ranked in batches of similar history length, so a batch is padded only to
    its own longest history (padding does not change a real position's output).
    """
    was_training = model.training
    model.eval()
    ranks = np.zeros(len(users), dtype=np.int64)
    lengths = np.array([min(len(u.history(stage)), model.config.max_len) for u in users], dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    try:
        for start in range(0, len(users), batch_size):
            rows = order[start : start + batch_size]
            chunk = [users[i] for i in rows]
            histories = [u.history(stage) for u in chunk]
            scores = model.score_last(history_batch(histories, model.config.max_len))
            ranks[rows] = target_ranks(scores, [u.target(stage) for u in chunk], histories)
    finally:
        model.train(was_training)
    return ranks
