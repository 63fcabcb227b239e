"""What a run writes into its run directory besides checkpoints: a row of metrics.jsonl
and of timings.jsonl per round (formats: server/run_rows.py), and final.json at the end.

final.json: the last round's validation and test metrics over all users, and
`best_valid`: the round with the best validation NDCG@10 with its validation and test
metrics (the early-stopping choice; test never decides it); rounds, wall time, device
epsilon max/mean, layer 2's summary, reply counts over the whole run (`final_summary`).

Every write of these files is in this module (two callbacks of the round loop, and
`RunFiles.write_final`), so their formats can move elsewhere in one edit.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedinterest.common.run_config import RunConfig
from fedinterest.common.run_files import FINAL_FILE
from fedinterest.common.serialization import atomic_write_text
from fedinterest.common.split import LeaveOneOut
from fedinterest.server import checkpoint as ckpt
from fedinterest.server.loop_state import LoopState
from fedinterest.server.popularity_prior import prior_summary
from fedinterest.server.round_callbacks import RoundCallback, RoundEnd
from fedinterest.server.run_rows import append_round, metrics_row, reconcile, timing_row

LOG = logging.getLogger("flwr.fedinterest")


class MetricsRow(RoundCallback):
    """The round's metrics.jsonl row, kept in the state: the checkpoint holds it too (written before the row)."""

    phase = "checkpoint"

    def on_round_end(self, state: LoopState, end: RoundEnd) -> None:
        user_epsilon = state.user_dp.epsilon() if state.user_dp is not None else None
        state.metrics_row = metrics_row(end.server_round, end.result.replies, end.evaluation, user_epsilon)


class RunFiles(RoundCallback):
    """metrics.jsonl and timings.jsonl, a row each per round (after the round's checkpoint), and final.json."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def resume(self, state: LoopState, training: bool) -> None:
        """Cut the rows back to the state's round (restoring its metrics row if a crash came
        between the checkpoint and the row); when rounds are to be trained, final.json goes:
        it described fewer rounds than this run will."""
        reconcile(self.run_dir, state.round, state.metrics_row)
        if training:
            (self.run_dir / FINAL_FILE).unlink(missing_ok=True)

    def on_round_end(self, state: LoopState, end: RoundEnd) -> None:
        row = state.metrics_row
        assert row is not None, "MetricsRow runs before RunFiles (server/rounds.round_callbacks)"
        append_round(self.run_dir, row, timing_row(end.server_round, time.monotonic() - end.started, end.phases))
        LOG.info("fedinterest: round %d: %s", end.server_round, json.dumps(row))

    def write_final(self, final: dict[str, Any]) -> Path:
        path = self.run_dir / FINAL_FILE
        atomic_write_text(path, json.dumps(final, indent=2, allow_nan=False) + "\n")
        return path


def final_summary(
    config: RunConfig, run_dir: Path, state: LoopState, valid: dict[str, float], test: dict[str, float], split: LeaveOneOut | None,
) -> dict[str, Any]:
    """The content of final.json (`split` None in a deployment: the server holds no data)."""
    user_dp = state.user_dp
    final = {
        "rounds": state.round,
        "resumed_after_round": state.resumed_after,
        "strategy": config.strategy,
        "valid": valid,
        "test": test,
        "best_valid": state.best or None,
        "stopped_early": state.stopped_early,
        "wall_seconds": round(state.elapsed_seconds, 3),
        "privacy": state.privacy.summary(config.delta) | {
            "user_level": user_dp.summary() if user_dp is not None else None,
            # Research only: seeded noise is reproducible, so no privacy figure of the run holds.
            "noise_source": "research-noise-seed" if config.noise_seeded else "os-entropy",
        },
        "counts": state.counts,
        "dataset": (
            {"label": "deployed", "users": None, "items": config.num_items} if split is None
            else {"label": config.dataset_spec().label, "users": len(split.users), "items": split.num_items}
        ),
        "config_hash": ckpt.config_hash(config),
        "run_config": config.to_flower(),
        "run_dir": str(run_dir),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if config.popularity_prior:
        final["popularity_prior"] = prior_summary(state.best.get("prior_weight"))
    return final
