"""The federated round loop, driven by the ServerApp.

Flower's `Strategy.start()` can neither resume at round k nor drop refused replies, so
this loop drives the strategy's public steps itself, round by round:

    callbacks' on_round_start (layer 2: stop before the budget would be passed)
    -> one training round (server/train_round.py: sample users, configure_train for
    the nodes that hold them, send, reply checks, aggregate_train)
    -> callbacks' on_round_end (server/round_callbacks.py: layer 2's release journal,
    validation and the best round, privacy tally and counts, metrics row, checkpoint,
    the rows of metrics.jsonl and timings.jsonl)

The loop's state is what a checkpoint holds (server/loop_state.py). With user-level DP
(layer 2, `user-noise-multiplier` > 0) the strategy is wrapped (server/user_dp_strategy.py):
the sample is Poisson over users and every round releases the clipped, noised mean of
server/user_privacy.py; the run stops before a round that would pass
`user-epsilon-budget` (final.json "stopped_early").

Run directory (`config.run_dir`, or a fresh temporary directory when it is empty):
- `metrics.jsonl` and `timings.jsonl`: one row per round each (server/run_rows.py);
- `final.json`: the run's result (server/run_outputs.py);
- `checkpoints/`: see server/checkpoint.py.

Deployment (`dataset = "deployed"`): the server loads no data; it waits for
clients-per-round nodes and evaluates through the devices' evaluate path
(server/evaluation.FederatedEvaluator), so metrics average the devices that answered.

Resume: when `run_dir` holds a checkpoint of round R written with the same run config
(run-dir and num-server-rounds may differ), the loop restarts at round R + 1 from the
saved global model, strategy state, privacy tally and counts (server/loop_state.py);
metrics.jsonl is cut back to rows 1..R (the row of round R is restored from the
checkpoint if a crash came between the checkpoint and the row). A different config
raises ConfigMismatchError.

Before round 1 (and before a resumed round) the loop waits until as many nodes are
registered as the dataset needs (ceil(users / users-per-node): in simulation partition
i holds users i*k .. i*k+k-1), for at most `round_timeout` seconds, or until the count
has not moved for SETTLE_SECONDS (a simulation with fewer supernodes than that); then it
continues with the nodes present (at least one), with a warning. The ServerApp cannot
see the federation's num-supernodes, hence the settle rule. A simulation then asks each
node which users it holds (`cohort.survey`); a deployment takes every registered node
as one user, again every round.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedinterest.common.datasets import load_split
from fedinterest.common.model_config import ModelConfig
from fedinterest.common.run_config import RunConfig
from fedinterest.common.run_files import METRIC_KEYS
from fedinterest.common.split import LeaveOneOut
from fedinterest.server.cohort import Cohort, survey
from fedinterest.server.evaluation import FederatedEvaluator, ServerEvaluator, initial_arrays
from fedinterest.server.loop_state import LoopState
from fedinterest.server.popularity_prior import prior_for_run
from fedinterest.server.reply_checks import ArraySpec
from fedinterest.server.round_callbacks import (
    Checkpointing,
    ReleaseJournal,
    RoundCallback,
    RoundEnd,
    RunTally,
    UserBudgetStop,
    Validation,
    end_round,
    start_round,
)
from fedinterest.server.run_outputs import MetricsRow, RunFiles, final_summary
from fedinterest.server.strategies import build_strategy, load_strategy_state
from fedinterest.server.train_round import train_round
from fedinterest.server.user_dp_strategy import UserLevelDP
from fedinterest.server.user_privacy import UserLevelAccountant, settings_of

LOG = logging.getLogger("flwr.fedinterest")  # a child of Flower's logger: shown in its run log
# Stop waiting for more nodes once the registered count has not moved for this long.
SETTLE_SECONDS = 15.0


@dataclass
class RunData:
    """Where the run's data is and how it is evaluated: on the server (simulation) or on the devices (deployment)."""

    split: LeaveOneOut | None  # None in a deployment: the server holds no data
    evaluator: ServerEvaluator | FederatedEvaluator
    num_items: int
    expected_nodes: int  # the nodes to wait for before the first round
    model_config: ModelConfig


def run(grid: Grid, config: RunConfig, *, poll_interval: float = 1.0) -> dict[str, Any]:
    """Run (or resume) the whole federated training; returns what final.json holds."""
    started = time.monotonic()
    run_dir = resolve_run_dir(config)
    data = _run_data(grid, config, run_dir)
    state = LoopState.restore(run_dir, config, initial_arrays(data.model_config, config.seed), started)
    spec, files = ArraySpec.of(state.arrays), RunFiles(run_dir)
    training = state.round < config.num_server_rounds
    files.resume(state, training)
    if not training:
        LOG.warning("fedinterest: the checkpoint is at round %d >= num-server-rounds %d: nothing to train", state.round, config.num_server_rounds)
        return _finish(config, run_dir, state, data, files)
    strategy, cohort = _start_training(grid, config, data, state, run_dir, poll_interval)
    callbacks = round_callbacks(config, run_dir, data.evaluator, strategy, files)
    for server_round in range(state.round + 1, config.num_server_rounds + 1):
        round_start = time.monotonic()
        if config.deployed:  # devices come and go: each registered node is one user
            cohort = _cohort(grid, config)
        state.stopped_early = start_round(callbacks, state, server_round, cohort)
        if state.stopped_early is not None:
            break
        LOG.info("fedinterest: [ROUND %d/%d]", server_round, config.num_server_rounds)
        result = train_round(grid, strategy, state.arrays, server_round, config, spec, cohort)
        state.round, state.arrays = server_round, result.arrays
        end_round(callbacks, state, RoundEnd(server_round, result, round_start))
    return _finish(config, run_dir, state, data, files)


def round_callbacks(
    config: RunConfig, run_dir: Path, evaluator: ServerEvaluator | FederatedEvaluator, strategy: Strategy, files: RunFiles,
) -> list[RoundCallback]:
    """The loop's callbacks in the order they run (server/round_callbacks.py says why this order)."""
    private: list[RoundCallback] = [UserBudgetStop(), ReleaseJournal(run_dir)] if config.user_private else []
    return [*private, Validation(evaluator, config), RunTally(), MetricsRow(), Checkpointing(run_dir, config, strategy), files]


def _run_data(grid: Grid, config: RunConfig, run_dir: Path) -> RunData:
    if config.deployed:
        # Real devices hold the data: evaluate through them, wait for a round's worth.
        LOG.info("fedinterest: deployed run, %d items; run directory %s", config.num_items, run_dir)
        evaluator = FederatedEvaluator(grid, timeout=config.round_timeout)
        return RunData(None, evaluator, config.num_items, config.clients_per_round, config.model_config(config.num_items, None))
    split = load_split(config.dataset_spec())
    model_config = config.model_config(split.num_items, split.dataset.item_ids)
    LOG.info("fedinterest: %d users, %d items; run directory %s", len(split.users), split.num_items, run_dir)
    return RunData(split, ServerEvaluator(split, model_config), split.num_items, -(-len(split.users) // config.users_per_node), model_config)


def _start_training(
    grid: Grid, config: RunConfig, data: RunData, state: LoopState, run_dir: Path, poll_interval: float,
) -> tuple[Strategy, Cohort]:
    """Wait for the nodes, learn who holds which users, build the strategy (wrapped under layer 2)."""
    nodes = wait_for_nodes(grid, data.expected_nodes, timeout=config.round_timeout, settle=SETTLE_SECONDS, poll_interval=poll_interval)
    cohort = _cohort(grid, config)
    strategy = build_strategy(config, nodes)
    load_strategy_state(strategy, state.strategy_state)
    strategy.summary()
    if not config.user_private:
        return strategy, cohort
    state.user_dp = state.user_dp or UserLevelAccountant.start(settings_of(config), cohort.population)
    if config.popularity_prior and isinstance(data.evaluator, ServerEvaluator):  # released once, before round 1
        data.evaluator.prior = prior_for_run(grid, run_dir, cohort, state.user_dp, data.num_items, timeout=config.round_timeout)
    private = UserLevelDP(strategy, state.user_dp)
    private.log_plan(cohort.population, config.num_server_rounds - state.round)
    return private, cohort


def _finish(config: RunConfig, run_dir: Path, state: LoopState, data: RunData, files: RunFiles) -> dict[str, Any]:
    """Evaluate the last model (validation again only if this process has none), write final.json."""
    valid = state.last_valid if state.last_valid is not None else data.evaluator.evaluate(state.arrays, "valid")
    test = data.evaluator.evaluate(state.arrays, "test")
    final = final_summary(config, run_dir, state, valid, test, data.split)
    path = files.write_final(final)
    # A deployment's devices may share no metrics (run-config share-metrics): then they are None.
    shown = " ".join(f"{key} {test[key]:.4f}" for key in METRIC_KEYS if test.get(key) is not None) or "no metrics shared"
    LOG.info("fedinterest: done after round %d: test %s; %s", state.round, shown, path)
    return final


def _cohort(grid: Grid, config: RunConfig) -> Cohort:
    """Who holds which users: every registered node is one device (deployment), or as the nodes say (simulation)."""
    node_ids = list(grid.get_node_ids())
    if not node_ids:
        wait_for_nodes(grid, 1, timeout=config.round_timeout)
        node_ids = list(grid.get_node_ids())
    return Cohort.of_devices(node_ids) if config.deployed else survey(grid, node_ids, timeout=config.round_timeout)


def wait_for_nodes(
    grid: Grid,
    expected: int,
    *,
    timeout: float,
    settle: float | None = None,
    poll_interval: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Wait until `expected` nodes are registered; return how many there are.

    Stops early, with a warning, when `timeout` passes or -- with `settle` set -- when
    at least one node is registered and the count has not changed for `settle` seconds
    (a simulation started with fewer supernodes than users registers them all within
    moments, then stays put). Raises RuntimeError when no node registered in time.
    """
    start = clock()
    deadline = start + timeout
    next_log = start
    last_count, last_change = -1, start
    while True:
        count = len(list(grid.get_node_ids()))
        now = clock()
        if count >= expected:
            LOG.info("fedinterest: %d nodes registered (expected %d)", count, expected)
            return count
        if count != last_count:
            last_count, last_change = count, now
        if now >= deadline:
            reason = f"after {timeout:g} s"
            break
        if settle is not None and count >= 1 and now - last_change >= settle:
            reason = f"unchanged for {settle:g} s"
            break
        if now >= next_log:
            LOG.info("fedinterest: waiting for nodes: %d of %d registered", count, expected)
            next_log = now + 10.0
        sleep(poll_interval)
    if count < 1:
        raise RuntimeError(f"no node registered within {timeout:g} s (expected {expected})")
    LOG.warning("fedinterest: %d of %d expected nodes registered (%s); continuing with them", count, expected, reason)
    return count


def resolve_run_dir(config: RunConfig) -> Path:
    """`config.run_dir` (created), or a new temporary directory when it is empty (logged)."""
    if config.run_dir:
        path = Path(config.run_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path
    path = Path(tempfile.mkdtemp(prefix="fedinterest-run-"))
    LOG.warning("fedinterest: run-dir is empty: writing metrics and checkpoints to %s", path)
    return path
