"""What the round loop does around each round besides training, as callbacks.

A callback (`RoundCallback`) may stop the run before a round (`on_round_start` returns
the reason, final.json "stopped_early") and updates the loop's state after it
(`on_round_end`, server/loop_state.py). The loop calls them in its list's order
(server/rounds.round_callbacks); the time each takes counts toward its `phase`, a
column of timings.jsonl. After a round, in order:

    ReleaseJournal (layer 2: the release's accountant step persisted) -> Validation
    (every eval_every rounds and at the last; the best round by it) -> RunTally (privacy
    tally, reply counts) -> MetricsRow -> Checkpointing -> RunFiles (a row of
    metrics.jsonl and of timings.jsonl; server/run_outputs.py)

Why this order: the release is counted on disk before the model leaves the server (a
deployment's evaluation sends it to the devices; checkpoint.record_release); the row
is part of the checkpoint, and the checkpoint is written before the row, so a crash
between the two is repaired from the checkpoint on resume (run_rows.reconcile).

Before a round, UserBudgetStop ends a layer-2 run before a release that would pass
`user-epsilon-budget`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from flwr.serverapp.strategy import Strategy

from fedinterest.common.run_config import RunConfig
from fedinterest.common.wire import NDCG_10
from fedinterest.server import checkpoint as ckpt
from fedinterest.server.cohort import Cohort
from fedinterest.server.evaluation import FederatedEvaluator, ServerEvaluator
from fedinterest.server.loop_state import LoopState
from fedinterest.server.reply_checks import ReplyKind
from fedinterest.server.round_result import RoundResult
from fedinterest.server.strategies import base_strategy, strategy_state

LOG = logging.getLogger("flwr.fedinterest")
# Why a run ended before num-server-rounds (final.json "stopped_early").
STOPPED_AT_USER_BUDGET = "user-epsilon-budget"


@dataclass
class RoundEnd:
    """One finished round as the callbacks see it; they fill in the evaluation and the phases' seconds."""

    server_round: int
    result: RoundResult
    started: float  # time.monotonic() at the round's start
    evaluation: dict[str, float] | None = None  # the round's validation, when it had one
    phases: dict[str, float] = field(default_factory=dict)  # seconds by timings.jsonl phase: devices, evaluation, checkpoint


class RoundCallback(Protocol):
    """A step of the loop around each round (subclass it for the no-op defaults)."""

    phase: str | None = None  # the timings.jsonl phase its time counts toward (None: the rest of the round)

    def on_round_start(self, state: LoopState, server_round: int, cohort: Cohort) -> str | None:
        """A reason to stop the run before `server_round`, or None to go on."""
        return None

    def on_round_end(self, state: LoopState, end: RoundEnd) -> None:
        """Fold the finished round into `state` (and whatever it writes)."""
        return None


def start_round(callbacks: list[RoundCallback], state: LoopState, server_round: int, cohort: Cohort) -> str | None:
    """The first callback's reason to stop before `server_round`, or None."""
    for callback in callbacks:
        if (reason := callback.on_round_start(state, server_round, cohort)) is not None:
            return reason
    return None


def end_round(callbacks: list[RoundCallback], state: LoopState, end: RoundEnd) -> None:
    """Run every callback on the finished round, timing each toward its phase."""
    end.phases = {"devices": end.result.devices_seconds, "evaluation": 0.0, "checkpoint": 0.0}
    for callback in callbacks:
        began = time.monotonic()
        callback.on_round_end(state, end)
        if callback.phase is not None:
            end.phases[callback.phase] += time.monotonic() - began


class UserBudgetStop(RoundCallback):
    """Layer 2: stop before a round whose release would take user-level epsilon past the budget."""

    def on_round_start(self, state: LoopState, server_round: int, cohort: Cohort) -> str | None:
        accountant = state.user_dp
        if accountant is None or not accountant.would_exceed(cohort.population):
            return None
        LOG.warning(
            "fedinterest: stopping before round %d: one more release would take user-level epsilon past %g "
            "(spent %.3f at delta %g after %d rounds)",
            server_round, accountant.settings.epsilon_budget, accountant.epsilon(), accountant.delta, accountant.rounds,
        )
        return STOPPED_AT_USER_BUDGET


class ReleaseJournal(RoundCallback):
    """Layer 2: the release counted on disk before it leaves the server (evaluation, next round; checkpoint.record_release)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def on_round_end(self, state: LoopState, end: RoundEnd) -> None:
        if state.user_dp is not None:
            ckpt.record_release(self.run_dir, end.server_round, state.user_dp.to_json())


class Validation(RoundCallback):
    """Server-side (or federated) validation every eval_every rounds and at the last, and the best round by it."""

    phase = "evaluation"

    def __init__(self, evaluator: ServerEvaluator | FederatedEvaluator, config: RunConfig) -> None:
        self.evaluator, self.every, self.last = evaluator, config.eval_every, config.num_server_rounds

    def on_round_end(self, state: LoopState, end: RoundEnd) -> None:
        server_round = end.server_round
        if server_round % self.every != 0 and server_round != self.last:
            return
        end.evaluation = state.last_valid = self.evaluator.evaluate(state.arrays, "valid")
        if is_better(end.evaluation, state.best.get("valid")):
            # Model selection on validation only; test is recorded, never used to choose.
            state.best = {"round": server_round, "valid": end.evaluation, "test": self.evaluator.evaluate(state.arrays, "test")}
            if isinstance(self.evaluator, ServerEvaluator):
                state.best |= self.evaluator.blend_report(state.arrays)


def is_better(valid: dict[str, Any], best_valid: dict[str, Any] | None) -> bool:
    """Whether a validation result beats the best so far on NDCG@10 (ties keep the earlier round)."""
    if valid.get(NDCG_10) is None:
        return False
    return best_valid is None or best_valid.get(NDCG_10) is None or valid[NDCG_10] > best_valid[NDCG_10]


class RunTally(RoundCallback):
    """The run's totals: each user's highest reported epsilon (layer 1) and the reply counts of final.json."""

    phase = "checkpoint"

    def on_round_end(self, state: LoopState, end: RoundEnd) -> None:
        result, counts = end.result, state.counts
        state.privacy.update(result.epsilons)
        replies = result.replies
        counts["sampled"] += replies.sampled
        counts["answered"] += replies.answered
        for kind in (ReplyKind.REFUSED, ReplyKind.FAILED, ReplyKind.REJECTED, ReplyKind.EMPTY):
            counts[kind.value] += replies.count(kind)
        counts["aggregated"] += replies.count(ReplyKind.VALID) if result.aggregated else 0
        counts["rounds_without_update"] += 0 if result.aggregated else 1


class Checkpointing(RoundCallback):
    """The state after the round, with the strategy's optimizer state, as the run's checkpoint."""

    phase = "checkpoint"

    def __init__(self, run_dir: Path, config: RunConfig, strategy: Strategy) -> None:
        self.run_dir, self.config, self.strategy = run_dir, config, base_strategy(strategy)

    def on_round_end(self, state: LoopState, end: RoundEnd) -> None:
        state.strategy_state = strategy_state(self.strategy)
        ckpt.save(self.run_dir, state.checkpoint(self.config))
