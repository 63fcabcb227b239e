"""On-device evaluation: rank the full catalogue for the user's held-out item.

The same `common.evaluation.model_ranks` the server-side evaluation uses, on the one
user, so a device's figures are identical to the simulation's shortcut of evaluating
every user on the server.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedinterest.common.evaluation import model_ranks
from fedinterest.common.metrics import hit_rate, ndcg
from fedinterest.common.model import InterestModel
from fedinterest.common.split import UserSplit

STAGES = ("valid", "test")
DEFAULT_STAGE = "test"


@dataclass(frozen=True)
class LocalEvaluation:
    """One user's ranking figures for one stage."""

    rank: int  # 1-based rank of the held-out item among the unseen catalogue items
    hit_rate_10: float
    ndcg_10: float


def evaluate_locally(*, model: InterestModel, user: UserSplit, stage: str = DEFAULT_STAGE) -> LocalEvaluation:
    """Rank every catalogue item not yet seen for `user`'s `stage` target ("valid" or "test")."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    ranks = model_ranks(model, [user], stage)  # (1,)
    return LocalEvaluation(rank=int(ranks[0]), hit_rate_10=float(hit_rate(ranks, 10)[0]), ndcg_10=float(ndcg(ranks, 10)[0]))
