"""Full-catalogue ranking metrics: HR@K, NDCG@K and MRR.

Every catalogue item is a candidate except padding and the items the user already saw.
Ties are counted against the target (pessimistic): the target's rank is the number of
candidates scoring at least as high as it, itself included, so a model that scores
everything equally does not look good.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedinterest.common.constants import PAD_ID
from fedinterest.common.wire import HIT_RATE_10, NDCG_10


def target_ranks(scores: torch.Tensor, targets: Sequence[int], seen: Sequence[np.ndarray]) -> np.ndarray:
    """1-based rank of each target among its user's candidates.

    scores (B, V + 1) with column PAD_ID unused; targets (B,) item indices; seen[b] the
    items user b already interacted with (excluded from the candidates).
    """
    if scores.dim() != 2 or scores.shape[0] != len(targets) or len(seen) != len(targets):
        raise ValueError(f"scores {tuple(scores.shape)} must be (B, V+1) with B={len(targets)} targets and seen lists")
    # Compared in their own precision (widening float32 to float64 changes no comparison);
    # integer scores (counts) as float64.
    scores = scores.detach().clone() if scores.is_floating_point() else scores.detach().to(torch.float64)
    scores[:, PAD_ID] = float("-inf")
    for row, (target, items) in enumerate(zip(targets, seen)):
        if not 1 <= target < scores.shape[1]:
            raise ValueError(f"target {target} is not an item index in 1..{scores.shape[1] - 1}")
        if np.any(np.asarray(items) == target):
            raise ValueError(f"target {target} of row {row} is among the items excluded as already seen")
        scores[row, torch.as_tensor(np.asarray(items, dtype=np.int64))] = float("-inf")
    target_scores = scores[torch.arange(len(targets)), torch.as_tensor(np.asarray(targets, dtype=np.int64))]
    if torch.isnan(target_scores).any() or torch.isinf(target_scores).any():
        raise ValueError("a target's score is not finite")
    return torch.count_nonzero(scores >= target_scores[:, None], dim=1).numpy().astype(np.int64)


def hit_rate(ranks: np.ndarray, k: int) -> np.ndarray:
    """1 where the target is in the top k, else 0 (per user)."""
    return (np.asarray(ranks) <= k).astype(np.float64)


def ndcg(ranks: np.ndarray, k: int) -> np.ndarray:
    """1 / log2(rank + 1) where the target is in the top k, else 0 (per user; one relevant item)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)


def reciprocal_rank(ranks: np.ndarray) -> np.ndarray:
    """1 / rank, without cut-off (per user)."""
    return 1.0 / np.asarray(ranks, dtype=np.float64)


def summarize(ranks: np.ndarray) -> dict[str, float]:
    """The report's metrics averaged over users: HR@10, NDCG@10, HR@20, NDCG@20, MRR."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("no users to average over")
    return {
        HIT_RATE_10: float(hit_rate(ranks, 10).mean()),
        NDCG_10: float(ndcg(ranks, 10).mean()),
        "hr@20": float(hit_rate(ranks, 20).mean()),
        "ndcg@20": float(ndcg(ranks, 20).mean()),
        "mrr": float(reciprocal_rank(ranks).mean()),
        "users": int(ranks.size),
    }
