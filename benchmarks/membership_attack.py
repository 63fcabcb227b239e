"""The privacy audit's membership-inference attack: per-user losses, the member split and the AUC.

The loss threshold of Yeom et al. (2018), its difficulty-calibrated variant (Watson et al.,
2022) and a popularity control; benchmarks/privacy_audit.py says who is a member and
how the audited models are trained.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedinterest.common.constants import PAD_ID
from fedinterest.common.evaluation import model_ranks
from fedinterest.common.examples import training_windows
from fedinterest.common.metrics import summarize
from fedinterest.common.model import InterestModel
from fedinterest.common.run_files import NDCG_10
from fedinterest.common.split import LeaveOneOut, UserSplit


def roc_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """P(score of a random member > score of a random non-member), ties counted half.

    The Mann-Whitney rank formula: with mid-ranks over the pooled scores,
    AUC = (sum of the members' ranks - n1 (n1 + 1) / 2) / (n1 n2).
    """
    pos = np.asarray(member_scores, dtype=np.float64)
    neg = np.asarray(nonmember_scores, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("the AUC needs at least one member and one non-member score")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("scores must be finite")
    ranks = _midranks(np.concatenate([pos, neg]))
    n1, n2 = len(pos), len(neg)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n2))


def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    # Each run of equal values [start, end) gets the mean of ranks start+1 .. end.
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), dtype=np.float64)
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + 1 + end) / 2
    return ranks


def auc_standard_error(auc: float, n_members: int, n_nonmembers: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUC from n1 positives and n2 negatives."""
    q1 = auc / (2 - auc)
    q2 = 2 * auc * auc / (1 + auc)
    variance = (auc * (1 - auc) + (n_members - 1) * (q1 - auc * auc) + (n_nonmembers - 1) * (q2 - auc * auc)) / (n_members * n_nonmembers)
    return math.sqrt(max(variance, 0.0))


@torch.no_grad()
def user_losses(model: InterestModel, users: Sequence[UserSplit], *, windows_per_batch: int = 64) -> np.ndarray:
    """Each user's mean next-item cross-entropy over the pairs of its training history.

    The history is cut into windows exactly as local training cuts it
    (`training_windows` at the model's max_len), so every position sees the context it
    was trained with; the loss is the full-catalogue softmax of training
    (`sequence_loss`), averaged over all the user's (input, next item) pairs. Eval mode,
    no dropout. A user with no training pair gets NaN.
    """
    max_len = model.config.max_len
    parts = [training_windows(np.asarray(u.train, dtype=np.int64), max_len) for u in users]
    owner = np.concatenate([np.full(len(p[0]), i, dtype=np.int64) for i, p in enumerate(parts)]) if parts else np.zeros(0, np.int64)
    inputs = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, max_len), np.int64)
    targets = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, max_len), np.int64)
    totals = np.zeros(len(users), dtype=np.float64)
    counts = np.zeros(len(users), dtype=np.int64)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(inputs), windows_per_batch):
            items = torch.from_numpy(inputs[start : start + windows_per_batch])
            target = torch.from_numpy(targets[start : start + windows_per_batch])
            has_target = target != PAD_ID  # (B, L)
            hidden = model.encode(items)  # (B, L, D)
            per_token = F.cross_entropy(model.head(hidden[has_target]), target[has_target], reduction="none")  # (N,)
            rows = owner[start : start + windows_per_batch][has_target.nonzero()[:, 0].numpy()]  # (N,) user of each pair
            np.add.at(totals, rows, per_token.double().numpy())
            np.add.at(counts, rows, 1)
    finally:
        model.train(was_training)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)


def popularity_losses(users: Sequence[UserSplit], reference: Sequence[UserSplit], num_items: int) -> np.ndarray:
    """Each user's mean next-item cross-entropy under a popularity model (the attack's reference).

    The popularity model predicts item i with probability (count_i + 1) / (total + num_items),
    counts over the training items of `reference` (every user: it favours no group).
    The pairs scored are the user's training pairs, as in `user_losses` (every item but the first).
    """
    counts = np.ones(num_items + 1, dtype=np.float64)
    counts[PAD_ID] = 0.0
    for u in reference:
        np.add.at(counts, np.asarray(u.train, dtype=np.int64), 1.0)
    log_p = np.log(counts / counts.sum(), where=counts > 0, out=np.full_like(counts, -np.inf))
    out = np.full(len(users), np.nan)
    for row, u in enumerate(users):
        targets = np.asarray(u.train, dtype=np.int64)[1:]
        if len(targets):
            out[row] = float(-log_p[targets].mean())
    return out


@dataclass(frozen=True)
class Groups:
    """Members (users 0..M-1, the ones that trained) and as many non-members (users M..)."""

    members: tuple[int, ...]
    nonmembers: tuple[int, ...]


def membership_groups(num_users: int, num_members: int) -> Groups:
    """The first min(M, N - M) users of each side, so both groups have the same size."""
    if not 0 < num_members < num_users:
        raise ValueError(f"need 0 < members < users, got members {num_members} of {num_users} users")
    size = min(num_members, num_users - num_members)
    return Groups(members=tuple(range(size)), nonmembers=tuple(range(num_members, num_members + size)))


def attack(model: InterestModel, split: LeaveOneOut, num_members: int) -> dict[str, Any]:
    """The loss-threshold attack (and its calibrated variant and control) on `model`."""
    groups = membership_groups(len(split.users), num_members)
    users = [split.users[i] for i in groups.members + groups.nonmembers]
    losses = user_losses(model, users)
    pop = popularity_losses(users, split.users, split.num_items)
    keep = np.isfinite(losses) & np.isfinite(pop)
    is_member = np.r_[np.ones(len(groups.members), bool), np.zeros(len(groups.nonmembers), bool)]
    m, n = keep & is_member, keep & ~is_member

    def scored(score: np.ndarray) -> dict[str, float]:
        auc = roc_auc(score[m], score[n])
        return {"auc": auc, "se": auc_standard_error(auc, int(m.sum()), int(n.sum()))}

    # Ranking quality on each side (test split): the generalisation gap the attack exploits.
    member_ndcg = summarize(model_ranks(model, [split.users[i] for i in groups.members], "test"))[NDCG_10]
    nonmember_ndcg = summarize(model_ranks(model, [split.users[i] for i in groups.nonmembers], "test"))[NDCG_10]
    return {
        "members": int(m.sum()),
        "nonmembers": int(n.sum()),
        "skipped_without_pairs": int((~keep).sum()),
        "loss": scored(-losses),
        "calibrated": scored(-(losses - pop)),
        "control_popularity": scored(-pop),
        "mean_loss": {"members": float(losses[m].mean()), "nonmembers": float(losses[n].mean())},
        "test_ndcg@10": {"members": member_ndcg, "nonmembers": nonmember_ndcg},
    }
