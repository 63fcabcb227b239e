"""The popularity baseline: every user gets the catalogue ranked by interaction count (simulation, and the operator's catalogue)."""

from __future__ import annotations

import numpy as np
import torch

from fedinterest.common.metrics import target_ranks
from fedinterest.common.split import LeaveOneOut


def popularity_ranks(split: LeaveOneOut, stage: str, batch_size: int = 512) -> np.ndarray:
    """Rank of each user's `stage` target when items are scored by how often they occur
    in all users' histories before that stage (train items, plus validation items for test)."""
    counts = np.zeros(split.num_items + 1, dtype=np.float64)
    for user in split.users:
        np.add.at(counts, user.history(stage), 1.0)
    scores_row = torch.from_numpy(counts)
    ranks = []
    for start in range(0, len(split.users), batch_size):
        chunk = split.users[start : start + batch_size]
        scores = scores_row.expand(len(chunk), -1)
        ranks.append(target_ranks(scores, [u.target(stage) for u in chunk], [u.history(stage) for u in chunk]))
    return np.concatenate(ranks)
