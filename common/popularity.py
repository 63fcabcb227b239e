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
    return _ranks_by(counts, split, stage, batch_size)


def _ranks_by(item_scores: np.ndarray, split: LeaveOneOut, stage: str, batch_size: int) -> np.ndarray:
    """Each user's `stage` target ranked among the items it has not seen, by one score per item."""
    scores_row = torch.from_numpy(item_scores)
    ranks = []
    for start in range(0, len(split.users), batch_size):
        chunk = split.users[start : start + batch_size]
        ranks.append(target_ranks(scores_row.expand(len(chunk), -1), [u.target(stage) for u in chunk], [u.history(stage) for u in chunk]))
    return np.concatenate(ranks)


# --- popularity under user-level DP (issue 12, lever 5: a fair private baseline) ----------
#
# Each user adds 1 / sqrt(n) to each of its n distinct items (repeats count once), so its
# contribution has L2 norm 1 whatever its history: adding or removing one user moves the
# count vector by at most 1 (the Gaussian mechanism's sensitivity). The counts plus
# N(0, sigma^2) per item are one release of the Gaussian mechanism, accounted by Opacus's
# accountant as one step at sampling rate 1.


def user_bounded_counts(histories: list[np.ndarray], num_items: int) -> np.ndarray:
    """Item counts in which every user's contribution has L2 norm 1 (index 0 = padding, unused)."""
    counts = np.zeros(num_items + 1, dtype=np.float64)
    for history in histories:
        distinct = np.unique(np.asarray(history, dtype=np.int64))
        distinct = distinct[distinct > 0]
        if distinct.size:
            counts[distinct] += 1.0 / np.sqrt(distinct.size)
    return counts


def private_popularity_noise(epsilon: float, delta: float, accountant: str = "prv") -> float:
    """The smallest sigma (Opacus's get_noise_multiplier) for which one sensitivity-1 release spends `epsilon` at `delta`."""
    import warnings

    from opacus.accountants.utils import get_noise_multiplier

    if not (epsilon > 0 and 0 < delta < 1):
        raise ValueError(f"private popularity needs epsilon > 0 and 0 < delta < 1, got epsilon {epsilon}, delta {delta}")
    # RDP's "optimal order is the largest alpha" is still a valid bound; PRV's log(1 - q) at q = 1 is -inf by design.
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.simplefilter("ignore", UserWarning)
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=1.0, steps=1, accountant=accountant, epsilon_tolerance=0.005))


def private_popularity_ranks(split: LeaveOneOut, stage: str, noise_multiplier: float, rng: np.random.Generator, batch_size: int = 512) -> np.ndarray:
    """Ranks of each user's `stage` target under popularity released with user-level DP (noise from `rng`)."""
    counts = user_bounded_counts([u.history(stage) for u in split.users], split.num_items)
    return _ranks_by(counts + rng.normal(0.0, noise_multiplier, counts.shape), split, stage, batch_size)


# --- the private popularity prior blended into the model (issue 12, lever 5) --------------
#
# The model scores item i as h . w_i + b_i; adding beta * log(1 + max(count_i, 0)) to the
# per-item bias b_i multiplies the model's softmax by the noised popularity to the power
# beta (a product of experts). beta = 0 is the model alone; a large beta ranks by
# popularity and breaks its ties by the model (falling back to popularity). The server
# picks beta on validation ranks, as it picks the round. Folded into the bias, the
# blended model is an ordinary model: the device ranks with it as with any other.

# The blend weights tried on validation; the last is the fallback to popularity.
PRIOR_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 1000.0)
# The per-item bias of the two model forms (common/model.py): the untied Linear head's
# bias, or ItemBias beside the attribute vectors.
BIAS_KEYS = ("head.bias", "item_bias.bias")


def user_count_vector(history: np.ndarray, num_items: int) -> np.ndarray:
    """One user's contribution to the bounded counts: 1 / sqrt(n) on each of its n distinct items (L2 norm 1, or 0)."""
    return user_bounded_counts([history], num_items)


def log_prior(noised_counts: np.ndarray) -> np.ndarray:
    """The blend's per-item prior from the released counts: log(1 + count), negative noise floored at 0; padding 0."""
    prior = np.log1p(np.maximum(np.asarray(noised_counts, dtype=np.float64), 0.0))
    prior[0] = 0.0
    return prior


def with_prior(arrays: dict[str, np.ndarray], prior: np.ndarray, weight: float) -> dict[str, np.ndarray]:
    """The model `arrays` with weight * prior added to its per-item bias (a new dict; `arrays` is kept)."""
    keys = [key for key in BIAS_KEYS if key in arrays]
    if len(keys) != 1:
        raise ValueError(f"the model has no single per-item bias among {BIAS_KEYS} to fold the popularity prior into")
    bias = arrays[keys[0]]
    if bias.shape != prior.shape:
        raise ValueError(f"the popularity prior has {prior.shape[0]} entries but the model's {keys[0]} has {bias.shape[0]}")
    return {**arrays, keys[0]: (bias.astype(np.float64) + weight * prior).astype(bias.dtype)}
