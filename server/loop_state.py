"""The round loop's state: what a checkpoint holds, restored from it and saved as it.

`LoopState.restore` reads the last checkpoint of the run directory (server/checkpoint.py)
-- or starts afresh -- and `LoopState.checkpoint` is the Checkpoint of the state after a
round, field for field: the global model, the strategy's optimizer state, the privacy
tally (layer 1) and layer 2's accountant, the reply counts, the elapsed time, the last
metrics row and the best validation so far. The few fields below `resumed_after` live
in this process only (how the run ends); a resumed run recomputes them.

Resume: a checkpoint of round R written with the same run config (run-dir and
num-server-rounds may differ) restarts the loop at round R + 1; a different config raises
ConfigMismatchError, a model of other array names, shapes or dtypes CheckpointError.
Layer 2's accountant is taken from the release journal when a release came after the
checkpoint (`checkpoint.user_level_state`), so that release stays counted.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedinterest.common.run_config import RunConfig
from fedinterest.server import checkpoint as ckpt
from fedinterest.server.evaluation import arrays_from_numpy, arrays_to_numpy
from fedinterest.server.privacy_tally import PrivacyTally
from fedinterest.server.reply_checks import ArraySpec
from fedinterest.server.user_privacy import UserLevelAccountant, settings_of

LOG = logging.getLogger("flwr.fedinterest")
# The reply tallies of final.json "counts", summed over the run (server/round_callbacks.RunTally).
COUNT_KEYS = ("sampled", "answered", "refused", "failed", "rejected", "empty", "aggregated", "rounds_without_update")


@dataclass
class LoopState:
    """The run after its last completed round (`round`, 0 before round 1)."""

    round: int
    arrays: ArrayRecord
    strategy_state: dict[str, np.ndarray] = field(default_factory=dict)
    privacy: PrivacyTally = field(default_factory=PrivacyTally)
    user_dp: UserLevelAccountant | None = None  # layer 2's accountant (None when off, or until the first round starts it)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNT_KEYS, 0))
    prior_seconds: float = 0.0  # the wall time of the runs this one resumes
    metrics_row: dict[str, Any] | None = None
    best: dict[str, Any] = field(default_factory=dict)  # round, valid and test of the best validation so far
    # This process only, not checkpointed:
    resumed_after: int = 0
    last_valid: dict[str, float] | None = None  # the last validation (None until one in this process)
    stopped_early: str | None = None  # why the run ended before num-server-rounds (final.json)
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed_seconds(self) -> float:
        """The run's wall time so far, over all the processes it took."""
        return self.prior_seconds + time.monotonic() - self.started

    @classmethod
    def restore(cls, run_dir: Path, config: RunConfig, initial: ArrayRecord, started: float) -> LoopState:
        """The state of the checkpoint in `run_dir`, or a fresh one from the `initial` model
        (`started`: time.monotonic() when this process began the run)."""
        saved = ckpt.latest(run_dir)
        spec = ArraySpec.of(initial)
        if saved is None:
            return cls(round=0, arrays=initial, user_dp=_user_accountant(config, None, run_dir), started=started)
        ckpt.check_compatible(saved, config)
        if set(saved.arrays) != set(spec.shapes):
            raise ckpt.CheckpointError("the checkpoint's array names differ from the model of this run config")
        arrays = arrays_from_numpy({key: saved.arrays[key] for key in spec.shapes})
        LOG.info("fedinterest: resuming after round %d from %s", saved.round, run_dir / ckpt.CHECKPOINT_DIR)
        if ArraySpec.of(arrays) != spec:
            raise ckpt.CheckpointError("the checkpoint's array shapes or dtypes differ from the model of this run config")
        return cls(
            round=saved.round, arrays=arrays, strategy_state=saved.strategy_state, privacy=PrivacyTally.from_json(saved.privacy),
            user_dp=_user_accountant(config, saved, run_dir), counts={key: int(saved.counts.get(key, 0)) for key in COUNT_KEYS}, prior_seconds=saved.elapsed_seconds,
            metrics_row=saved.metrics_row, best=dict(saved.best), resumed_after=saved.round, started=started,
        )

    def checkpoint(self, config: RunConfig) -> ckpt.Checkpoint:
        """This state as the checkpoint of its round."""
        return ckpt.Checkpoint(
            round=self.round,
            arrays=arrays_to_numpy(self.arrays),
            config=ckpt.hashed_config(config),
            strategy_state=self.strategy_state,
            privacy=self.privacy.to_json() | ({"user_level": self.user_dp.to_json()} if self.user_dp is not None else {}),
            counts=self.counts,
            elapsed_seconds=self.elapsed_seconds,
            metrics_row=self.metrics_row,
            best=self.best,
        )


def _user_accountant(config: RunConfig, saved: ckpt.Checkpoint | None, run_dir: Path) -> UserLevelAccountant | None:
    """Layer 2's accountant after the last release persisted (checkpoint.user_level_state; None when off or not started yet)."""
    state = ckpt.user_level_state(run_dir, saved) if config.user_private else None
    return UserLevelAccountant.from_json(settings_of(config), state) if state is not None else None
