"""The centralized baseline: the same model trained on all users' training data at once,
without federation or privacy, with early stopping on validation NDCG@10."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedinterest.common.datasets import DatasetSpec, load_split
from fedinterest.common.evaluation import model_ranks
from fedinterest.common.examples import bucketed_batches, stack_windows
from fedinterest.common.item_attributes import item_attribute_rows
from fedinterest.common.metrics import summarize
from fedinterest.common.model import InterestModel, ModelConfig, packed_sequence_loss, sampled_sequence_loss
from fedinterest.common.run_files import NDCG_10
from fedinterest.common.serialization import save_model
from fedinterest.common.split import LeaveOneOut
from fedinterest.common.training import LossFn, train_epoch
from fedinterest.simulations.baselines import popularity_ranks
from fedinterest.simulations.provenance import git_commit, machine
from fedinterest.simulations.runs import new_run_dir, write_json


@dataclass(frozen=True)
class CentralizedConfig:
    """Training settings of the centralized run (checked on creation)."""

    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    # Stop after this many evaluations without a better validation NDCG@10.
    patience: int = 10
    eval_every: int = 1
    max_minutes: float | None = None
    seed: int = 0
    # "full": softmax over the whole catalogue; "sampled": against `negatives` uniform items.
    loss: str = "full"
    negatives: int = 256

    def __post_init__(self) -> None:
        if self.loss not in ("full", "sampled"):
            raise ValueError(f"loss must be 'full' or 'sampled', got {self.loss!r}")
        if self.negatives < 1:
            raise ValueError(f"negatives must be at least 1, got {self.negatives}")
        for name in ("epochs", "batch_size", "patience", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be positive, got {self.max_minutes}")


@dataclass(frozen=True)
class EpochReport:
    """What one epoch did, handed to the progress callback."""

    epoch: int
    loss: float
    valid_ndcg10: float | None
    best_ndcg10: float
    elapsed: float


@dataclass
class CentralizedResult:
    """The outcome: best epoch, validation and test metrics, the wall time of training."""

    best_epoch: int
    valid: dict[str, float]
    test: dict[str, float]
    train_seconds: float
    epochs_run: int
    stopped_because: str
    model: InterestModel
    history: list[EpochReport] = field(default_factory=list)


def train_centralized(
    split: LeaveOneOut,
    model_config: ModelConfig,
    config: CentralizedConfig,
    on_epoch: Callable[[EpochReport], None] | None = None,
) -> CentralizedResult:
    """Train on every user's training windows; keep the weights of the best validation epoch."""
    torch.manual_seed(config.seed)
    if model_config.num_items != split.num_items:
        raise ValueError(f"model has {model_config.num_items} items but the data has {split.num_items}")
    model = InterestModel(model_config)
    inputs, targets = stack_windows([u.train for u in split.users], model_config.max_len)
    if len(inputs) == 0:
        raise ValueError("no training examples: every training history is shorter than two items")
    generator = torch.Generator().manual_seed(config.seed)
    loss_fn: LossFn
    if config.loss == "full":
        loss_fn = packed_sequence_loss
    else:
        loss_fn = lambda m, x, y: sampled_sequence_loss(m, x, y, config.negatives)  # noqa: E731
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start = time.perf_counter()
    best_ndcg, best_epoch, best_state, stale = -1.0, 0, None, 0
    history: list[EpochReport] = []
    stopped = "max epochs"
    epoch = 0
    for epoch in range(1, config.epochs + 1):
        batches = bucketed_batches(inputs, targets, config.batch_size, generator)
        loss, _ = train_epoch(model, batches, optimizer, loss_fn)
        valid_ndcg = None
        if epoch % config.eval_every == 0 or epoch == config.epochs:
            valid_ndcg = summarize(model_ranks(model, split.users, "valid"))[NDCG_10]
            if valid_ndcg > best_ndcg:
                best_ndcg, best_epoch, best_state, stale = valid_ndcg, epoch, copy.deepcopy(model.state_dict()), 0
            else:
                stale += 1
        report = EpochReport(epoch, loss, valid_ndcg, best_ndcg, time.perf_counter() - start)
        history.append(report)
        if on_epoch is not None:
            on_epoch(report)
        if stale >= config.patience:
            stopped = f"no better validation NDCG@10 in {config.patience} evaluations"
            break
        if config.max_minutes is not None and report.elapsed >= config.max_minutes * 60:
            stopped = f"time budget of {config.max_minutes} minutes"
            break
    train_seconds = time.perf_counter() - start
    if best_state is None:  # time ran out before the first evaluation
        best_epoch, best_state = epoch, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return CentralizedResult(
        best_epoch=best_epoch,
        valid=summarize(model_ranks(model, split.users, "valid")),
        test=summarize(model_ranks(model, split.users, "test")),
        train_seconds=train_seconds,
        epochs_run=epoch,
        stopped_because=stopped,
        model=model,
        history=history,
    )


def run_centralized(
    spec: DatasetSpec,
    model_options: Mapping[str, Any],
    config: CentralizedConfig,
    *,
    threads: int,
    out: Path,
    on_epoch: Callable[[EpochReport], None] | None = None,
    on_data: Callable[[LeaveOneOut], None] | None = None,
    item_attributes: Path | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Load, train, evaluate beside popularity, and write a run directory (results.json, model).

    `model_options` are ModelConfig fields other than num_items and item_attributes,
    which the data and the `item_attributes` file decide.
    """
    commit = git_commit()  # taken before training: the code that runs, not what HEAD is later
    torch.set_num_threads(threads)
    split = load_split(spec)
    rows = item_attribute_rows(item_attributes, split.dataset.item_ids) if item_attributes is not None else ()
    model_config = ModelConfig(num_items=split.num_items, **model_options, item_attributes=rows)
    if on_data is not None:
        on_data(split)
    result = train_centralized(split, model_config, config, on_epoch)
    run_dir = new_run_dir(out, f"centralized-{spec.kind}")
    save_model(result.model, run_dir)
    payload = {
        "command": "centralized",
        "commit": commit,
        "machine": machine(threads),
        "dataset": {
            "spec": spec.label,
            "users": len(split),
            "items": split.num_items,
            "interactions": split.dataset.num_interactions,
            "reports": list(split.dataset.reports),
            "users_left_out": split.users_left_out,
        },
        "model": {k: v for k, v in asdict(model_config).items() if k != "item_attributes"} | {"item_attributes_file": str(item_attributes) if item_attributes else None},
        "training": asdict(config),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "stopped_because": result.stopped_because,
        "train_seconds": round(result.train_seconds, 1),
        "valid": result.valid,
        "test": result.test,
        "popularity_test": summarize(popularity_ranks(split, "test")),
        "history": [asdict(r) for r in result.history],
    }
    write_json(run_dir / "results.json", payload)
    return run_dir, payload
