"""Evaluation of a global model over all users.

Two paths give the same numbers:
- `ServerEvaluator` -- the simulation shortcut: the server holds the split and ranks the
  full catalogue for every user itself (common.evaluation.model_ranks), in batches;
- `federated_evaluate` -- the device path: every node ranks for its own user and
  replies EVAL_REPLY_METRICS, with the SHARED_EVAL_METRICS only when it shares them
  (run-config share-metrics and, on a real device, its privacy policy: they are the
  held-out item's rank without noise); the server averages what was shared weighted by
  NUM_EXAMPLES (one per evaluated user), i.e. the mean over users, as `summarize` does.
The round loop uses the shortcut; a deployment, where the server holds no histories,
uses the device path.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedinterest.common.evaluation import offset_ranks
from fedinterest.common.metrics import summarize
from fedinterest.common.model import InterestModel, ModelConfig
from fedinterest.common.popularity import PRIOR_WEIGHTS
from fedinterest.common.split import LeaveOneOut
from fedinterest.common.wire import (
    ARRAYS,
    CONFIG,
    EVAL_REPLY_METRICS,
    HIT_RATE_10,
    METRICS,
    NDCG_10,
    NUM_EXAMPLES,
    SERVER_ROUND,
    SHARED_EVAL_METRICS,
    STAGE,
)

# The held-out items an evaluation can rank (sent under STAGE).
STAGES = ("valid", "test")


def arrays_from_numpy(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of named numpy arrays, order kept."""
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})


def arrays_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """Named numpy arrays of an ArrayRecord, order kept."""
    return {key: array.numpy() for key, array in arrays.items()}


def initial_arrays(model_config: ModelConfig, seed: int) -> ArrayRecord:
    """The global model before round 1: InterestModel's own initialisation under `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InterestModel(model_config)
    return ArrayRecord(model.state_dict())


class ServerEvaluator:
    """Ranks every user's held-out item with a given global model (the simulation shortcut).

    With a popularity prior (server/popularity_prior.py) a validation evaluation ranks
    under every blend weight of PRIOR_WEIGHTS in one pass and keeps the best on NDCG@10
    (ties: the smaller weight) as `prior_weight`; a test evaluation then uses that weight.
    The returned metrics are the blend's; `valid_by_weight` holds every weight's.
    """

    def __init__(self, split: LeaveOneOut, model_config: ModelConfig) -> None:
        if model_config.num_items != split.num_items:
            raise ValueError(f"model has {model_config.num_items} items but the data has {split.num_items}")
        if not split.users:
            raise ValueError("the split has no users to evaluate")
        self.split = split
        self.model = InterestModel(model_config)
        self.prior: np.ndarray | None = None  # log-prior per item index (common/popularity.log_prior)
        self.prior_weight: float | None = None
        self.valid_by_weight: dict[float, dict[str, float]] = {}

    def ranks(self, arrays: ArrayRecord, stage: str) -> np.ndarray:
        """Rank of each user's `stage` target under the model `arrays` (blended at `prior_weight`, if any)."""
        weights = [self.prior_weight or 0.0] if self.prior is not None else [0.0]
        return self._ranks(arrays, stage, weights)[0]

    def evaluate(self, arrays: ArrayRecord, stage: str) -> dict[str, float]:
        """HR@10, NDCG@10, HR@20, NDCG@20, MRR and the user count for `stage`."""
        if self.prior is None or stage != "valid":
            return summarize(self.ranks(arrays, stage))
        self.valid_by_weight = {w: summarize(r) for w, r in zip(PRIOR_WEIGHTS, self._ranks(arrays, stage, PRIOR_WEIGHTS))}
        self.prior_weight = max(PRIOR_WEIGHTS, key=lambda w: (self.valid_by_weight[w][NDCG_10], -w))
        return self.valid_by_weight[self.prior_weight]

    def blend_report(self, arrays: ArrayRecord) -> dict[str, Any]:
        """What best_valid records of the blend ({} without a prior): the chosen weight, every
        weight's validation NDCG@10, and the model alone's test metrics (reported, never used to choose)."""
        if self.prior is None:
            return {}
        return {
            "prior_weight": self.prior_weight,
            "valid_ndcg_by_weight": {f"{w:g}": metrics[NDCG_10] for w, metrics in self.valid_by_weight.items()},
            "test_model_alone": summarize(self._ranks(arrays, "test", [0.0])[0]),
        }

    def _ranks(self, arrays: ArrayRecord, stage: str, weights: Sequence[float]) -> np.ndarray:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.model.load_state_dict(arrays.to_torch_state_dict())
        prior = torch.from_numpy(self.prior if self.prior is not None else np.zeros(self.split.num_items + 1))
        offsets = torch.stack([float(w) * prior for w in weights]).to(torch.float32)
        return offset_ranks(self.model, self.split.users, stage, offsets)


class FederatedEvaluator:
    """Ranks through the devices' evaluate path (deployment: the server holds no histories).

    It sends the model to every device: with layer 2 the round loop persists the
    release's accountant step before calling it (server/checkpoint.py, releases.json).
    """

    def __init__(self, grid: Grid, *, timeout: float | None) -> None:
        self.grid = grid
        self.timeout = timeout

    def evaluate(self, arrays: ArrayRecord, stage: str) -> dict[str, Any]:
        """HR@10, NDCG@10 (None when no device shared them), users, users_with_metrics, replies and failed for `stage`."""
        # Round 0: the devices' evaluate handler ranks whatever weights it is sent.
        return federated_evaluate(self.grid, arrays, stage, server_round=0, timeout=self.timeout)


def federated_evaluate(
    grid: Grid,
    arrays: ArrayRecord,
    stage: str,
    *,
    server_round: int,
    timeout: float | None,
    node_ids: Iterable[int] | None = None,
) -> dict[str, Any]:
    """Ask every node (or `node_ids`) to evaluate `arrays` on `stage`; average what comes back.

    Replies that are errors or do not carry exactly EVAL_REPLY_METRICS (with or without
    the SHARED_EVAL_METRICS) with finite values are counted as failed and left out.
    Returns hr@10, ndcg@10 (the mean over the users whose devices shared them; None when
    none did), users (the summed NUM_EXAMPLES), users_with_metrics, replies and failed.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    targets = list(grid.get_node_ids() if node_ids is None else node_ids)
    messages = [
        Message(
            content=RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord({SERVER_ROUND: server_round, STAGE: stage})}),
            dst_node_id=node,
            message_type=MessageType.EVALUATE,
        )
        for node in targets
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    sums = {HIT_RATE_10: 0.0, NDCG_10: 0.0}
    users, shared, used = 0.0, 0.0, 0
    for reply in replies:
        values = _eval_metrics(reply)
        if values is None:
            continue
        used += 1
        users += values[NUM_EXAMPLES]
        if HIT_RATE_10 in values:
            shared += values[NUM_EXAMPLES]
            for key in sums:
                sums[key] += values[NUM_EXAMPLES] * values[key]
    return {
        HIT_RATE_10: sums[HIT_RATE_10] / shared if shared else None,
        NDCG_10: sums[NDCG_10] / shared if shared else None,
        "users": int(users),
        "users_with_metrics": int(shared),
        "replies": used,
        "failed": len(targets) - used,
    }


def _eval_metrics(reply: Message) -> dict[str, float] | None:
    """The reply's evaluation metrics, or None when it is an error or malformed."""
    if reply.has_error() or set(reply.content.metric_records) != {METRICS}:
        return None
    record = reply.content[METRICS]
    if set(record.keys()) not in (set(EVAL_REPLY_METRICS), set(EVAL_REPLY_METRICS + SHARED_EVAL_METRICS)):
        return None
    values = {}
    for key in record.keys():
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        values[key] = float(value)
    if values[NUM_EXAMPLES] < 0:
        return None
    return values
