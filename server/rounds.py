"""The federated round loop, driven by the ServerApp.

Flower's `Strategy.start()` can neither resume at round k nor drop refused replies, so
this loop drives the strategy's public steps itself, round by round:

    sample users (server/cohort.py) -> configure_train for the nodes that hold them
    -> (simulated faults marked) -> grid.send_and_receive -> reply checks (update norm
    bound included) -> aggregate_train (valid only, in the cohort's order)
    -> (layer 2: the release's accountant step persisted, checkpoint.record_release)
    -> server-side evaluation (every eval_every rounds and at the last) -> checkpoint
    -> one row of metrics.jsonl and of timings.jsonl (server/run_rows.py)

The unit sampled is a user: a node holds a shard of users (one on a real device,
users-per-node in simulation), and each round's train message names the node's sampled
users. Without layer 2, clients-per-round users are drawn without replacement, seeded
by (seed, round) over the cohort's fixed order of users, so a run samples the same
users whatever node ids Flower assigns. With user-level DP (layer 2,
`user-noise-multiplier` > 0) the sample is Poisson over users and every round releases
the clipped, noised mean of server/user_privacy.py; the run stops before a round that
would pass `user-epsilon-budget` (final.json "stopped_early").

A round with fewer than `min-replies` valid replies (at least one is always needed)
completes without aggregation; the model stays, it is logged as a warning and counted in
`rounds_without_update`. With `fault-fraction` > 0 the loop marks that fraction of the
sampled devices' train messages (server/faults.py) so that simulated devices fail or stall.

Run directory (`config.run_dir`, or a fresh temporary directory when it is empty):
- `metrics.jsonl` and `timings.jsonl`: one row per round each (server/run_rows.py);
- `final.json`: the last round's validation and test metrics over all users, and
  `best_valid`: the round with the best validation NDCG@10 with its validation and test
  metrics (the early-stopping choice; test never decides it); rounds, wall time, device
  epsilon max/mean, reply counts over the whole run (see `_final`);

Deployment (`dataset = "deployed"`): the server loads no data; it waits for
clients-per-round nodes and evaluates through the devices' evaluate path
(server/evaluation.FederatedEvaluator), so metrics average the devices that answered.
- `checkpoints/`: see server/checkpoint.py.

Resume: when `run_dir` holds a checkpoint of round R written with the same run config
(run-dir and num-server-rounds may differ), the loop restarts at round R + 1 from the
saved global model, strategy state, privacy tally and counts; metrics.jsonl is cut back
to rows 1..R (the row of round R is restored from the checkpoint if a crash came
between the checkpoint and the row). A different config raises ConfigMismatchError.

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

import dataclasses
import json
import logging
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedinterest.common.datasets import load_split
from fedinterest.common.run_config import RunConfig
from fedinterest.common.run_files import FINAL_FILE, METRIC_KEYS
from fedinterest.common.serialization import atomic_write_text
from fedinterest.common.split import LeaveOneOut
from fedinterest.common.wire import ARRAYS, CLIP_NORM, METRICS, NDCG_10, NUM_EXAMPLES, SERVER_ROUND
from fedinterest.server import checkpoint as ckpt
from fedinterest.server.cohort import Cohort, addressed, survey
from fedinterest.server.evaluation import FederatedEvaluator, ServerEvaluator, arrays_from_numpy, arrays_to_numpy, initial_arrays
from fedinterest.server.faults import mark_faults, pick_faulty
from fedinterest.server.noise_aware_adam import NoiseAwareFedAdam
from fedinterest.server.popularity_prior import prior_for_run, prior_summary
from fedinterest.server.privacy_tally import PrivacyTally
from fedinterest.server.reply_checks import ArraySpec, ReplyKind, RoundReplies, UpdateBound, classify_replies
from fedinterest.server.secure_rounds import secure_train_round
from fedinterest.server.run_rows import append_round, metrics_row, reconcile, timing_row
from fedinterest.server.strategies import build_strategy, fit_sampling, load_strategy_state, strategy_state
from fedinterest.server.user_privacy import UserLevelAccountant, noised_mean_update, settings_of

LOG = logging.getLogger("flwr.fedinterest")  # a child of Flower's logger: shown in its run log

# Stop waiting for more nodes once the registered count has not moved for this long.
SETTLE_SECONDS = 15.0
COUNT_KEYS = ("sampled", "answered", "refused", "failed", "rejected", "empty", "aggregated", "rounds_without_update")


@dataclass(frozen=True)
class RoundResult:
    """What one training round produced; `epsilons` by user name (server/cohort.py)."""

    arrays: ArrayRecord
    replies: RoundReplies
    aggregated: bool
    epsilons: dict[str, float]
    devices_seconds: float = 0.0  # from sending the train messages to the last reply (or the timeout)


# Why a run ended before num-server-rounds (final.json "stopped_early").
STOPPED_AT_USER_BUDGET = "user-epsilon-budget"


def run(grid: Grid, config: RunConfig, *, poll_interval: float = 1.0) -> dict[str, Any]:
    """Run (or resume) the whole federated training; returns what final.json holds."""
    started = time.monotonic()
    run_dir = resolve_run_dir(config)
    if config.deployed:
        # Real devices hold the data: evaluate through them, wait for a round's worth.
        split, num_items, expected_nodes = None, config.num_items, config.clients_per_round
        evaluator: ServerEvaluator | FederatedEvaluator = FederatedEvaluator(grid, timeout=config.round_timeout)
        LOG.info("fedinterest: deployed run, %d items; run directory %s", num_items, run_dir)
    else:
        split = load_split(config.dataset_spec())
        num_items, expected_nodes = split.num_items, -(-len(split.users) // config.users_per_node)
        evaluator = ServerEvaluator(split, config.model_config(num_items, split.dataset.item_ids))
        LOG.info("fedinterest: %d users, %d items; run directory %s", len(split.users), num_items, run_dir)
    model_config = config.model_config(num_items, split.dataset.item_ids if split is not None else None)

    saved = ckpt.latest(run_dir)
    arrays = initial_arrays(model_config, config.seed)
    spec = ArraySpec.of(arrays)
    if saved is not None:
        ckpt.check_compatible(saved, config)
        if set(saved.arrays) != set(spec.shapes):
            raise ckpt.CheckpointError("the checkpoint's array names differ from the model of this run config")
        arrays = arrays_from_numpy({key: saved.arrays[key] for key in spec.shapes})
        LOG.info("fedinterest: resuming after round %d from %s", saved.round, run_dir / ckpt.CHECKPOINT_DIR)
    first = saved.round + 1 if saved else 1
    if ArraySpec.of(arrays) != spec:
        raise ckpt.CheckpointError("the checkpoint's array shapes or dtypes differ from the model of this run config")
    privacy = PrivacyTally.from_json(saved.privacy if saved else {})
    counts = {key: int((saved.counts if saved else {}).get(key, 0)) for key in COUNT_KEYS}
    prior_seconds = saved.elapsed_seconds if saved else 0.0
    reconcile(run_dir, saved.round if saved else 0, saved.metrics_row if saved else None)

    last_valid: dict[str, float] | None = None
    best = dict(saved.best) if saved else {}
    user_dp = _restore_user_accountant(config, saved, run_dir)
    stopped_early = None
    if first <= config.num_server_rounds:
        (run_dir / FINAL_FILE).unlink(missing_ok=True)  # it described fewer rounds than this run will
        nodes = wait_for_nodes(grid, expected_nodes, timeout=config.round_timeout, settle=SETTLE_SECONDS, poll_interval=poll_interval)
        cohort = _cohort(grid, config)
        strategy = build_strategy(config, nodes)
        load_strategy_state(strategy, saved.strategy_state if saved else {})
        strategy.summary()
        if config.user_private:
            user_dp = user_dp or UserLevelAccountant.start(settings_of(config), cohort.population)
            if config.popularity_prior and isinstance(evaluator, ServerEvaluator):  # released once, before round 1
                evaluator.prior = prior_for_run(grid, run_dir, cohort, user_dp, num_items, timeout=config.round_timeout)
            _log_user_dp_plan(user_dp, cohort.population, config.num_server_rounds - first + 1)
    elif saved is not None:
        LOG.warning("fedinterest: the checkpoint is at round %d >= num-server-rounds %d: nothing to train", saved.round, config.num_server_rounds)
    final_round = saved.round if saved else 0

    for server_round in range(first, config.num_server_rounds + 1):
        round_start = time.monotonic()
        if config.deployed:  # devices come and go: each registered node is one user
            cohort = _cohort(grid, config)
        if user_dp is not None and user_dp.would_exceed(cohort.population):
            stopped_early = STOPPED_AT_USER_BUDGET
            LOG.warning(
                "fedinterest: stopping before round %d: one more release would take user-level epsilon past %g "
                "(spent %.3f at delta %g after %d rounds)",
                server_round, config.user_epsilon_budget, user_dp.epsilon(), user_dp.delta, user_dp.rounds,
            )
            break
        LOG.info("fedinterest: [ROUND %d/%d]", server_round, config.num_server_rounds)
        result = train_round(grid, strategy, arrays, server_round, config, spec, cohort, user_dp)
        arrays = result.arrays
        if user_dp is not None:  # counted on disk before the release leaves the server (evaluation, next round)
            ckpt.record_release(run_dir, server_round, user_dp.to_json())
        evaluation, evaluated_at = None, time.monotonic()
        if server_round % config.eval_every == 0 or server_round == config.num_server_rounds:
            evaluation = last_valid = evaluator.evaluate(arrays, "valid")
            if is_better(evaluation, best.get("valid")):
                # Model selection on validation only; test is recorded, never used to choose.
                best = {"round": server_round, "valid": evaluation, "test": evaluator.evaluate(arrays, "test")}
                if isinstance(evaluator, ServerEvaluator):
                    best |= evaluator.blend_report(arrays)
        saved_at = time.monotonic()
        privacy.update(result.epsilons)
        _add_counts(counts, result)
        user_epsilon = user_dp.epsilon() if user_dp is not None else None
        row = metrics_row(server_round, result.replies, evaluation, user_epsilon)
        ckpt.save(run_dir, ckpt.Checkpoint(
            round=server_round,
            arrays=arrays_to_numpy(arrays),
            config=ckpt.hashed_config(config),
            strategy_state=strategy_state(strategy),
            privacy=privacy.to_json() | ({"user_level": user_dp.to_json()} if user_dp is not None else {}),
            counts=counts,
            elapsed_seconds=prior_seconds + time.monotonic() - started,
            metrics_row=row,
            best=best,
        ))
        phases = {"devices": result.devices_seconds, "evaluation": saved_at - evaluated_at, "checkpoint": time.monotonic() - saved_at}
        append_round(run_dir, row, timing_row(server_round, time.monotonic() - round_start, phases))
        final_round = server_round
        LOG.info("fedinterest: round %d: %s", server_round, json.dumps(row))

    if last_valid is None:
        last_valid = evaluator.evaluate(arrays, "valid")
    test = evaluator.evaluate(arrays, "test")
    final = _final(config, split, run_dir, final_round, first, last_valid, test, best, privacy, user_dp, stopped_early, counts, prior_seconds + time.monotonic() - started)
    if config.popularity_prior:
        final["popularity_prior"] = prior_summary(best.get("prior_weight"))
    atomic_write_text(run_dir / FINAL_FILE, json.dumps(final, indent=2, allow_nan=False) + "\n")
    # A deployment's devices may share no metrics (run-config share-metrics): then they are None.
    shown = " ".join(f"{key} {test[key]:.4f}" for key in METRIC_KEYS if test.get(key) is not None) or "no metrics shared"
    LOG.info("fedinterest: done after round %d: test %s; %s", final_round, shown, run_dir / FINAL_FILE)
    return final


def train_round(
    grid: Grid, strategy: FedAvg, arrays: ArrayRecord, server_round: int, config: RunConfig, spec: ArraySpec,
    cohort: Cohort, user_dp: UserLevelAccountant | None = None,
) -> RoundResult:
    """One round: sample users, send to their nodes, check replies, aggregate the valid ones (if any).

    With `user_dp` (layer 2) the sample is Poisson, and the valid replies' clipped updates
    are summed, noised and released whatever their number (server/user_privacy.py).
    """
    if user_dp is not None:
        users = user_dp.sample(cohort.population, server_round)
        LOG.info("fedinterest: round %d: Poisson sample of %d of %d users (q %.4f)", server_round, len(users), cohort.population, user_dp.sample_rate(cohort.population))
    else:
        users = random.Random(round_seed(config.seed, server_round)).sample(range(cohort.population), min(config.clients_per_round, cohort.population))
    assignment = cohort.assign(users)
    if config.secure_aggregation:  # Flower's SecAgg+: the server learns only the sum (server/secure_rounds.py)
        done = secure_train_round(grid, strategy, arrays, server_round, config, cohort, assignment, user_dp)
        return RoundResult(_as_dtypes(done.arrays, spec), done.replies, done.aggregated, done.epsilons, done.devices_seconds)
    # Under adaptive clipping the round's clip norm travels with the train config.
    adaptive = user_dp is not None and user_dp.adaptive is not None
    round_config = ConfigRecord({CLIP_NORM: user_dp.clip_norm} if adaptive else {})
    messages = _train_messages(strategy, arrays, server_round, grid, cohort, assignment, round_config)
    if config.fault_fraction > 0:
        faulty = pick_faulty([m.metadata.dst_node_id for m in messages], config.fault_fraction, config.seed, server_round)
        messages = mark_faults(messages, faulty, config.fault_mode)
        LOG.info("fedinterest: round %d: simulated fault %r on %d node(s)", server_round, config.fault_mode, len(faulty))
    bound = UpdateBound(arrays_to_numpy(arrays), config.max_update_norm) if config.max_update_norm > 0 else None
    sampled = {node: len(local) for node, local in assignment.items()}
    sent_at = time.monotonic()
    received = grid.send_and_receive(messages, timeout=config.round_timeout)
    devices_seconds = time.monotonic() - sent_at
    replies = classify_replies(sampled, received, spec, bound)
    # Replies arrive in any order; combining them in the cohort's order makes the sum reproducible.
    replies.checked.sort(key=lambda c: cohort.rank(c.node_id) if c.node_id in sampled else -1)
    epsilons = {cohort.user_key(node, assignment[node][i]): eps for (node, i), eps in replies.epsilons.items() if node in sampled}
    _log_bad_replies(server_round, replies, name_nodes=user_dp is None)
    if replies.missing:
        LOG.warning("fedinterest: round %d: %d sampled user(s) got no reply within %g s", server_round, replies.missing, config.round_timeout)
    if user_dp is not None:
        released = _user_level_round(strategy, arrays, server_round, replies, spec, user_dp, cohort.population, epsilons)
        return dataclasses.replace(released, devices_seconds=devices_seconds)
    valid = replies.valid_messages
    if len(valid) < config.min_replies:
        LOG.warning(
            "fedinterest: round %d: %d valid update(s) from %d sampled user(s), fewer than min-replies %d; the model stays",
            server_round, len(valid), replies.sampled, config.min_replies,
        )
        return RoundResult(arrays, replies, aggregated=False, epsilons=epsilons, devices_seconds=devices_seconds)
    new_arrays, _ = strategy.aggregate_train(server_round, valid)
    if new_arrays is None:
        return RoundResult(arrays, replies, aggregated=False, epsilons=epsilons, devices_seconds=devices_seconds)
    return RoundResult(_as_dtypes(new_arrays, spec), replies, aggregated=True, epsilons=epsilons, devices_seconds=devices_seconds)


def _log_bad_replies(server_round: int, replies: RoundReplies, name_nodes: bool) -> None:
    """Why replies failed, were rejected or refused. Without layer 2 a line per device names
    the node (the operator's `server status` finds it); under layer 2 only counts and
    reasons: node ids would name who was sampled, and layer 2's amplification by sampling
    assumes the sample stays hidden."""
    bad = [c for c in replies.checked if c.kind in (ReplyKind.REJECTED, ReplyKind.FAILED)]
    if not name_nodes:
        if bad:
            reasons = "; ".join(sorted({f"{c.kind.value}: {c.reason}" for c in bad}))
            LOG.warning("fedinterest: round %d: %d repl(ies) for %d user(s) failed or were rejected: %s", server_round, len(bad), sum(c.users for c in bad), reasons)
        return
    for checked in bad:
        LOG.warning("fedinterest: round %d: node %d %s: %s (%d user(s))", server_round, checked.node_id, checked.kind.value, checked.reason, checked.users)
    for checked in (c for c in replies.checked if c.kind is ReplyKind.REFUSED):  # the device's own log says why
        LOG.info("fedinterest: round %d: node %d refused: reported epsilon %s", server_round, checked.node_id, ", ".join(f"{e:.4g}" for e in checked.epsilons) or "-")

def _train_messages(
    strategy: FedAvg, arrays: ArrayRecord, server_round: int, grid: Grid, cohort: Cohort, assignment: dict[int, list[int]],
    round_config: ConfigRecord,
) -> list[Message]:
    """The strategy's own train messages (its config: server round, FedProx's mu, ...) for
    the nodes holding sampled users, each naming its users, in the cohort's order."""
    chosen = sorted(assignment, key=cohort.rank)
    if not chosen:
        return []
    fit_sampling(strategy, len(chosen), len(chosen))
    messages = list(strategy.configure_train(server_round, arrays, round_config, _Only(grid, chosen)))
    return sorted(addressed(messages, assignment), key=lambda m: cohort.rank(m.metadata.dst_node_id))


class _Only:
    """A view of the grid that shows the strategy's node sampler only the round's chosen nodes."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid, self._node_ids = grid, list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _user_level_round(
    strategy: FedAvg, arrays: ArrayRecord, server_round: int, replies: RoundReplies, spec: ArraySpec,
    user_dp: UserLevelAccountant, population: int, epsilons: dict[str, float],
) -> RoundResult:
    """Release the round's DP-FedAvg model and account for it; the strategy sees only that model."""
    clip, expected = user_dp.clip_norm, user_dp.sample_rate(population) * population
    global_arrays = arrays_to_numpy(arrays)
    rng = user_dp.noise_rng(server_round)
    noised, norms = noised_mean_update(
        global_arrays, [(arrays_to_numpy(c.message.content[ARRAYS]), c.trained) for c in replies.valid],
        clip_norm=clip, noise_multiplier=user_dp.update_noise_multiplier, expected_size=expected, rng=rng,
    )
    if user_dp.adaptive is not None:  # the next round's clip norm, from the noised count (server/adaptive_clipping.py)
        fraction = user_dp.adaptive.step([(c.unclipped or 0, c.trained) for c in replies.valid], expected, rng)
        LOG.info("fedinterest: round %d: noised unclipped fraction %.3f at clip %.4g; next clip %.4g", server_round, fraction, clip, user_dp.clip_norm)
    user_dp.record_release(population)
    clipped = sum(1 for n in norms if n > clip * (1 + 1e-6))
    # The median norm before clipping is what user-clip-norm should be chosen near (McMahan et al.).
    LOG.info(
        "fedinterest: round %d: DP-FedAvg over %d user update(s) in %d replies, %d replies clipped again to %g (median norm %s); "
        "user-level epsilon %.3f at delta %g",
        server_round, replies.count(ReplyKind.VALID), len(norms), clipped, clip,
        f"{float(np.median(norms)):.3g}" if norms else "-", user_dp.epsilon(), user_dp.delta,
    )
    if isinstance(strategy, NoiseAwareFedAdam):  # DP-AdamBC: the per-coordinate variance of the released noise
        strategy.noise_variance = (user_dp.update_noise_multiplier * clip / expected) ** 2
    new_arrays, _ = strategy.aggregate_train(server_round, [_released_reply(noised, server_round)])
    if new_arrays is None:  # no strategy drops its only reply; guard rather than lose the release
        new_arrays = arrays_from_numpy(noised)
    return RoundResult(_as_dtypes(new_arrays, spec), replies, aggregated=True, epsilons=epsilons)


def _released_reply(arrays: dict[str, np.ndarray], server_round: int) -> Message:
    """The released model as the one reply the strategy aggregates: FedAvg keeps it as it
    is, a server optimizer (FedAdam, FedAvgM, ...) takes it as its pseudo-gradient step."""
    content = RecordDict({ARRAYS: arrays_from_numpy(arrays), METRICS: MetricRecord({NUM_EXAMPLES: 1, SERVER_ROUND: server_round})})
    return Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)


def _cohort(grid: Grid, config: RunConfig) -> Cohort:
    """Who holds which users: every registered node is one device (deployment), or as the nodes say (simulation)."""
    node_ids = list(grid.get_node_ids())
    if not node_ids:
        wait_for_nodes(grid, 1, timeout=config.round_timeout)
        node_ids = list(grid.get_node_ids())
    return Cohort.of_devices(node_ids) if config.deployed else survey(grid, node_ids, timeout=config.round_timeout)


def _restore_user_accountant(config: RunConfig, saved: ckpt.Checkpoint | None, run_dir: Path) -> UserLevelAccountant | None:
    """Layer 2's accountant after the last release persisted (checkpoint.user_level_state; None when off or not started yet)."""
    state = ckpt.user_level_state(run_dir, saved) if config.user_private else None
    return UserLevelAccountant.from_json(settings_of(config), state) if state is not None else None


def _log_user_dp_plan(user_dp: UserLevelAccountant, nodes: int, rounds_left: int) -> None:
    settings = user_dp.settings
    planned = user_dp.epsilon_after(nodes, rounds_left)
    LOG.info(
        "fedinterest: user-level DP: sigma %g, clip %g, q %.4f of %d nodes; epsilon after %d rounds would be %.3f at delta %g (budget %g)",
        user_dp.noise_multiplier, settings.clip_norm, user_dp.sample_rate(nodes), nodes, user_dp.rounds + rounds_left, planned, user_dp.delta, settings.epsilon_budget,
    )
    if planned > settings.epsilon_budget:
        LOG.warning("fedinterest: the user-level budget %g will stop the run before its last round", settings.epsilon_budget)


def round_seed(seed: int, server_round: int) -> int:
    """The seed of round `server_round`'s node sampling."""
    return seed * 1_000_003 + server_round


def _as_dtypes(arrays: ArrayRecord, spec: ArraySpec) -> ArrayRecord:
    """The aggregate in the model's own dtypes: FedAdam's update upcasts float32 to float64
    (numpy 2 scalar promotion), which the devices' float32 replies would then not match."""
    if all(str(arrays[k].dtype) == spec.dtypes[k] for k in spec.shapes):
        return arrays
    return ArrayRecord({k: Array(arrays[k].numpy().astype(spec.dtypes[k])) for k in spec.shapes})


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


def is_better(valid: dict[str, Any], best_valid: dict[str, Any] | None) -> bool:
    """Whether a validation result beats the best so far on NDCG@10 (ties keep the earlier round)."""
    if valid.get(NDCG_10) is None:
        return False
    return best_valid is None or best_valid.get(NDCG_10) is None or valid[NDCG_10] > best_valid[NDCG_10]


def _add_counts(counts: dict[str, int], result: RoundResult) -> None:
    replies = result.replies
    counts["sampled"] += replies.sampled
    counts["answered"] += replies.answered
    for kind in (ReplyKind.REFUSED, ReplyKind.FAILED, ReplyKind.REJECTED, ReplyKind.EMPTY):
        counts[kind.value] += replies.count(kind)
    counts["aggregated"] += replies.count(ReplyKind.VALID) if result.aggregated else 0
    counts["rounds_without_update"] += 0 if result.aggregated else 1


def _final(
    config: RunConfig,
    split: LeaveOneOut | None,
    run_dir: Path,
    final_round: int,
    first: int,
    valid: dict[str, float],
    test: dict[str, float],
    best: dict[str, Any],
    privacy: PrivacyTally,
    user_dp: UserLevelAccountant | None,
    stopped_early: str | None,
    counts: dict[str, int],
    seconds: float,
) -> dict[str, Any]:
    """The content of final.json."""
    return {
        "rounds": final_round,
        "resumed_after_round": first - 1,
        "strategy": config.strategy,
        "valid": valid,
        "test": test,
        "best_valid": best or None,
        "stopped_early": stopped_early,
        "wall_seconds": round(seconds, 3),
        "privacy": privacy.summary(config.delta) | {
            "user_level": user_dp.summary() if user_dp is not None else None,
            # Research only: seeded noise is reproducible, so no privacy figure of the run holds.
            "noise_source": "research-noise-seed" if config.noise_seeded else "os-entropy",
        },
        "counts": counts,
        "dataset": (
            {"label": "deployed", "users": None, "items": config.num_items} if split is None
            else {"label": config.dataset_spec().label, "users": len(split.users), "items": split.num_items}
        ),
        "config_hash": ckpt.config_hash(config),
        "run_config": config.to_flower(),
        "run_dir": str(run_dir),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
