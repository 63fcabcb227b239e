"""One training round: who trains, the messages, the replies, the aggregate.

    sample users -> configure_train for the nodes that hold them -> (simulated faults
    marked) -> grid.send_and_receive -> reply checks (update norm bound included)
    -> aggregate_train (valid only, in the cohort's order)

The unit sampled is a user: a node holds a shard of users (one on a real device,
users-per-node in simulation), and each round's train message names the node's sampled
users. Without layer 2, clients-per-round users are drawn without replacement, seeded
by (seed, round) over the cohort's fixed order of users, so a run samples the same
users whatever node ids Flower assigns. Under layer 2 the strategy is wrapped
(server/user_dp_strategy.py): the wrapper draws a Poisson sample and releases the
clipped, noised mean of every sampled round. Under secure aggregation the round goes
through Flower's SecAgg+ instead (server/secure_rounds.py), which is handed the strategy
under the wrapper and layer 2's accountant: there the devices add the noise.

A round with fewer than `min-replies` valid replies (at least one is always needed)
completes without aggregation: the model stays, it is logged as a warning and counted in
`rounds_without_update` (not under layer 2, which releases every sampled round). With
`fault-fraction` > 0 that fraction of the sampled devices' train messages is marked
(server/faults.py) so that simulated devices fail or stall.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time

from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedinterest.common.run_config import RunConfig
from fedinterest.server.cohort import Cohort, addressed
from fedinterest.server.evaluation import arrays_to_numpy
from fedinterest.server.faults import mark_faults, pick_faulty
from fedinterest.server.reply_checks import ArraySpec, ReplyKind, RoundReplies, UpdateBound, classify_replies
from fedinterest.server.round_result import RoundResult
from fedinterest.server.secure_rounds import secure_train_round
from fedinterest.server.strategies import base_strategy, train_messages
from fedinterest.server.user_dp_strategy import UserLevelDP, user_updates

LOG = logging.getLogger("flwr.fedinterest")


def train_round(
    grid: Grid, strategy: Strategy, arrays: ArrayRecord, server_round: int, config: RunConfig, spec: ArraySpec, cohort: Cohort,
) -> RoundResult:
    """One round: sample users, send to their nodes, check replies, aggregate the valid ones (if any).

    `strategy` is the run's strategy, wrapped in UserLevelDP under layer 2.
    """
    dp = strategy if isinstance(strategy, UserLevelDP) else None
    private = dp is not None
    if dp is not None:
        users = dp.sample_users(server_round, arrays, cohort.population)
    else:
        users = random.Random(round_seed(config.seed, server_round)).sample(range(cohort.population), min(config.clients_per_round, cohort.population))
    assignment = cohort.assign(users)
    if config.secure_aggregation:  # Flower's SecAgg+: the server learns only the sum (server/secure_rounds.py)
        accountant = dp.accountant if dp is not None else None
        done = secure_train_round(grid, base_strategy(strategy), arrays, server_round, config, cohort, assignment, accountant)
        return dataclasses.replace(done, arrays=_as_dtypes(done.arrays, spec))
    messages = _train_messages(strategy, arrays, server_round, grid, cohort, assignment)
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
    _log_bad_replies(server_round, replies, name_nodes=not private)
    if replies.missing:
        LOG.warning("fedinterest: round %d: %d sampled user(s) got no reply within %g s", server_round, replies.missing, config.round_timeout)
    if dp is not None:  # every sampled round is released, whatever the number of valid replies
        released, _ = dp.aggregate_train(server_round, user_updates(replies.valid))
        assert released is not None, "UserLevelDP releases every sampled round"
        return RoundResult(_as_dtypes(released, spec), replies, aggregated=True, epsilons=epsilons, devices_seconds=devices_seconds)
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


def round_seed(seed: int, server_round: int) -> int:
    """The seed of round `server_round`'s node sampling."""
    return seed * 1_000_003 + server_round


def _train_messages(
    strategy: Strategy, arrays: ArrayRecord, server_round: int, grid: Grid, cohort: Cohort, assignment: dict[int, list[int]],
) -> list[Message]:
    """The strategy's own train messages for the nodes holding sampled users, each naming its users, in the cohort's order."""
    chosen = sorted(assignment, key=cohort.rank)
    if not chosen:
        return []
    messages = train_messages(strategy, server_round, arrays, ConfigRecord(), grid, chosen)
    return sorted(addressed(messages, assignment), key=lambda m: cohort.rank(m.metadata.dst_node_id))


def _log_bad_replies(server_round: int, replies: RoundReplies, name_nodes: bool) -> None:
    """Why replies failed, were rejected or refused. Without layer 2 a line per device names
    the node (the operator's `server status` finds it, server/run_reasons.py parses it);
    under layer 2 only counts and reasons: node ids would name who was sampled, and layer
    2's amplification by sampling assumes the sample stays hidden."""
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


def _as_dtypes(arrays: ArrayRecord, spec: ArraySpec) -> ArrayRecord:
    """The aggregate in the model's own dtypes: FedAdam's update upcasts float32 to float64
    (numpy 2 scalar promotion), which the devices' float32 replies would then not match."""
    if all(str(arrays[k].dtype) == spec.dtypes[k] for k in spec.shapes):
        return arrays
    return ArrayRecord({k: Array(arrays[k].numpy().astype(spec.dtypes[k])) for k in spec.shapes})
