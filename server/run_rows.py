"""The per-round files of a run directory: metrics.jsonl (what a round computed) and
timings.jsonl (how long it took), written by the round loop.

metrics.jsonl holds exactly ROW_FIELDS per round: round, sampled, answered (users of
replies with content), refused, failed (users of error replies and of nodes silent at
the timeout; sampled = answered + failed), rejected, empty -- all counts of users --
train_loss (weighted mean over the valid replies that shared one -- run-config share-metrics,
docs/privacy.md -- null without any), epsilon_max /
epsilon_mean (cumulative example-level epsilon at the run's delta reported for the users
that replied in form this round; null when none did or when any reported inf), dp (false
when a user reported inf, i.e. trained without DP; null when no epsilon was reported),
user_epsilon (layer 2's user-level epsilon after the round, null without layer 2),
hr@10 / ndcg@10 (server-side validation metrics when evaluated this round, else null).
Nothing in it depends on the clock, so two runs of the same config and seed without DP
noise write the same file. timings.jsonl holds TIMING_FIELDS: round, seconds (the
round's wall time, evaluation included), where it went -- devices_seconds (from sending
the train messages to the last reply: the devices' work and the transport),
evaluation_seconds, checkpoint_seconds (the rest is sampling and aggregation) -- and time
(ISO 8601, UTC, end of round); readers of the rows (common/run_files.py) see both
files as one row.
"""

from __future__ import annotations

import json
import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedinterest.common.run_files import (
    EPSILON_MAX,
    EPSILON_MEAN,
    METRICS_FILE,
    ROW_FIELDS,
    TIMING_FIELDS,
    TIMINGS_FILE,
    read_jsonl,
)
from fedinterest.common.serialization import atomic_write_text
from fedinterest.common.wire import HIT_RATE_10, NDCG_10
from fedinterest.server.reply_checks import ReplyKind, RoundReplies


def metrics_row(
    server_round: int, replies: RoundReplies, evaluation: dict[str, float] | None, user_epsilon: float | None = None,
) -> dict[str, Any]:
    """The metrics.jsonl row of one round (exactly ROW_FIELDS)."""
    epsilons = list(replies.epsilons.values())
    dp = None if not epsilons else not any(math.isinf(e) for e in epsilons)
    row = {
        "round": server_round,
        "sampled": replies.sampled,
        "answered": replies.answered,
        "refused": replies.count(ReplyKind.REFUSED),
        "failed": replies.count(ReplyKind.FAILED),
        "rejected": replies.count(ReplyKind.REJECTED),
        "empty": replies.count(ReplyKind.EMPTY),
        "train_loss": replies.train_loss,
        EPSILON_MAX: max(epsilons) if dp else None,
        EPSILON_MEAN: sum(epsilons) / len(epsilons) if dp else None,
        "dp": dp,
        "user_epsilon": user_epsilon,
        HIT_RATE_10: evaluation[HIT_RATE_10] if evaluation else None,
        NDCG_10: evaluation[NDCG_10] if evaluation else None,
    }
    assert tuple(row) == ROW_FIELDS
    return row


def timing_row(server_round: int, seconds: float, phases: dict[str, float] | None = None) -> dict[str, Any]:
    """The timings.jsonl row of one round (exactly TIMING_FIELDS); `phases`: devices, evaluation, checkpoint seconds."""
    phases = phases or {}
    row: dict[str, Any] = {"round": server_round, "seconds": round(seconds, 3)}
    row |= {f"{name}_seconds": round(phases[name], 3) if name in phases else None for name in ("devices", "evaluation", "checkpoint")}
    row["time"] = datetime.now(UTC).isoformat(timespec="seconds")
    assert tuple(row) == TIMING_FIELDS
    return row


def reconcile(run_dir: Path, last_round: int, last_row: dict[str, Any] | None) -> None:
    """Cut both files back to rounds 1..last_round (a resumed run goes on from there);
    restore the metrics row of `last_round` from the checkpoint if a crash lost it."""
    for name, restored in ((METRICS_FILE, last_row), (TIMINGS_FILE, None)):
        path = run_dir / name
        rows = {row["round"]: row for row in read_jsonl(path) if isinstance(row.get("round"), int) and row["round"] <= last_round}
        if restored is not None:
            rows.setdefault(last_round, {k: v for k, v in restored.items() if k in ROW_FIELDS})
        if not rows and not path.exists():
            continue
        atomic_write_text(path, "".join(json.dumps(rows[r], allow_nan=False) + "\n" for r in sorted(rows)))


def append_round(run_dir: Path, row: dict[str, Any], timing: dict[str, Any]) -> None:
    """Append one round: its timing first, so a reader that sees the metrics row finds its timing."""
    for name, record in ((TIMINGS_FILE, timing), (METRICS_FILE, row)):
        with open(run_dir / name, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, allow_nan=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
