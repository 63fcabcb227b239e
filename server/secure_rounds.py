"""One training round under secure aggregation (run-config aggregation "secagg+").

The server drives Flower's own SecAggPlusWorkflow on the run's Grid; every cryptographic
step is Flower's (flwr.server.workflow, flwr.client.mod.secaggplus_mod,
flwr.common.secure_aggregation). In Flower 1.41 the workflow is written for the legacy
API: it takes a LegacyContext whose Strategy samples with `configure_fit` and receives the
decoded aggregate in `aggregate_fit`. `_SumCollector` is that legacy Strategy: it hands
the workflow one FitIns per node this round's cohort sampled (our train config, the
global arrays) and keeps the one aggregate Flower decodes. No array of a single device
reaches it, the round loop, the strategy or the log: the mod on the device masks the
vector, and the workflow only ever adds masked vectors and removes the masks of their sum.

Each device sends the sum of its users' clipped updates plus its share of the noise
(client/secure_contribution.py) with weight 1, so Flower's weighted mean times the
number of surviving devices is the plain sum. Then, as in the trusted-server layer 2
(server/user_privacy.py): new = global + sum / E with E = q * users, the expected sample
size, and the accountant charges one (sigma, q) step, now with no noise added by the
server: the devices' shares carry it, at least sigma C in total whenever the protocol
completes (at least m survivors: t, or ceil(n t / shares) for SecAgg+; server/secure_plan.py). Without layer 2 the sum of
clipped updates is divided by the users that trained (each user weighs alike).

A round the protocol halts (fewer than two nodes sampled, or too many dropped) releases
the unchanged model; under layer 2 it is still charged (conservative).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedinterest.common import wire
from fedinterest.common.run_config import RunConfig
from fedinterest.common.serialization import atomic_write_text
from fedinterest.server.cohort import Cohort
from fedinterest.server.evaluation import arrays_from_numpy, arrays_to_numpy
from fedinterest.server.faults import pick_faulty
from fedinterest.server.noise_aware_adam import NoiseAwareFedAdam
from fedinterest.server.reply_checks import CheckedReply, ReplyKind, RoundReplies, check_masked_reply
from fedinterest.server.round_result import RoundResult
from fedinterest.server.secure_plan import plan_round
from fedinterest.server.strategies import train_messages
from fedinterest.server.user_dp_strategy import released_reply
from fedinterest.server.user_privacy import UserLevelAccountant

LOG = logging.getLogger("flwr.fedinterest")
SECURE_ROUNDS_FILE = "secure_aggregation.jsonl"  # one row per secure round: the plan and the protocol's outcome


@dataclass(frozen=True)
class SecureRound(RoundResult):
    """A RoundResult with what only a secure round has."""

    row: dict[str, object] = field(default_factory=dict)  # the round's line of secure_aggregation.jsonl
    # What the server learns: the decoded sum of the survivors' vectors (None when the protocol halted).
    decoded_sum: dict[str, np.ndarray] | None = None


def secure_train_round(
    grid: Grid, strategy: FedAvg, arrays: ArrayRecord, server_round: int, config: RunConfig, cohort: Cohort,
    assignment: dict[int, list[int]], user_dp: UserLevelAccountant | None,
) -> SecureRound:
    """Run one round of Flower's SecAgg+ over the nodes of `assignment` and release the model from the sum alone."""
    nodes = sorted(assignment, key=cohort.rank)
    sampled = {node: len(assignment[node]) for node in nodes}
    global_arrays = arrays_to_numpy(arrays)
    sigma = user_dp.noise_multiplier if user_dp is not None else 0.0
    started = time.monotonic()
    observed = _ObservedGrid(grid)
    summed, survivors, plan = None, 0, None
    if len(nodes) >= 2:
        plan = plan_round(config, nodes=len(nodes), max_users=max(sampled.values()), noise_multiplier=sigma)
        configs = _fit_configs(grid, strategy, arrays, config, server_round, assignment, nodes, list(global_arrays), sigma)
        collector = _SumCollector(grid, configs, global_arrays)
        shares, threshold = plan.flower_arguments()
        workflow = SecAggPlusWorkflow(
            shares, threshold, max_weight=1.0, clipping_range=plan.clipping_range, quantization_range=2**plan.bits,
            timeout=config.round_timeout,
        )
        workflow(cast(Grid, observed), _legacy_context(collector, server_round))  # a proxy: the rest of Grid is delegated
        if observed.threshold_sent not in (None, plan.threshold):
            raise RuntimeError(f"SecAgg+ sent threshold {observed.threshold_sent}, the plan's noise is for {plan.threshold}")
        if collector.mean is not None:
            survivors = collector.survivors
            if survivors < plan.min_survivors:  # Flower's own check forbids this; the noise would fall short of sigma C
                raise RuntimeError(f"SecAgg+ decoded a sum of {survivors} devices, fewer than the {plan.min_survivors} its noise is calibrated to")
            summed = {name: mean * survivors for name, mean in zip(global_arrays, collector.mean)}
    devices_seconds = time.monotonic() - started
    replies = _classified(sampled, observed)
    epsilons = {cohort.user_key(node, assignment[node][i]): eps for (node, i), eps in replies.epsilons.items() if node in sampled}
    row: dict[str, object] = {"round": server_round, **(plan.summary() if plan else {"nodes": len(nodes)}), "survivors": survivors, "completed": summed is not None}
    if plan is not None and summed is not None:
        row |= {"quantization_error_bound": plan.quantization_error_bound(survivors), "sum_noise_std": plan.sum_noise_std(survivors)}
    row |= {"messages": observed.messages, "seconds": round(devices_seconds, 3)}
    _log_round(server_round, row, replies)
    _append_row(config, row)
    if summed is None:
        if user_dp is not None:  # the unchanged model is released; charging it keeps the count conservative
            user_dp.record_release(cohort.population)
        return SecureRound(arrays, replies, False, epsilons, devices_seconds, row, None)
    assert plan is not None  # a sum is decoded only in a planned round (two nodes or more)
    if user_dp is not None:
        divisor = user_dp.sample_rate(cohort.population) * cohort.population
        user_dp.record_release(cohort.population)
        if isinstance(strategy, NoiseAwareFedAdam):  # DP-AdamBC: the variance of the noise the devices added, on the mean
            strategy.noise_variance = (plan.sum_noise_std(survivors) / divisor) ** 2
    else:
        divisor = float(max(1, replies.count(ReplyKind.VALID)))
    released = {k: (v + summed[k] / divisor).astype(v.dtype) for k, v in global_arrays.items()}
    new_arrays, _ = strategy.aggregate_train(server_round, [released_reply(released, server_round)])
    return SecureRound(new_arrays if new_arrays is not None else arrays_from_numpy(released), replies, True, epsilons, devices_seconds, row, summed)


def _fit_configs(
    grid: Grid, strategy: FedAvg, arrays: ArrayRecord, config: RunConfig, server_round: int, assignment: dict[int, list[int]],
    nodes: list[int], names: list[str], sigma: float,
) -> dict[int, dict[str, object]]:
    """Each node's train config: the strategy's own (server round, FedProx's mu, ...), its users, a simulated fault, the secure keys.

    The strategy's `configure_train` is called as in the plain path, for the round's nodes
    (server/strategies.train_messages).
    """
    messages = train_messages(strategy, server_round, arrays, ConfigRecord(), grid, nodes)
    common: dict[str, object] = dict(messages[0].content.config_records[wire.CONFIG]) if messages else {wire.SERVER_ROUND: server_round}
    common |= {wire.SECURE_ARRAY_KEYS: names, wire.SECURE_NOISE_MULTIPLIER: float(sigma)}
    faulty = set(pick_faulty(nodes, config.fault_fraction, config.seed, server_round)) if config.fault_fraction > 0 else set()
    return {
        node: {**common, wire.SHARD_USERS: assignment[node], **({wire.SIMULATED_FAULT: config.fault_mode} if node in faulty else {})}
        for node in nodes
    }


class _SumCollector(Strategy):
    """The legacy Strategy Flower's SecAggPlusWorkflow asks for: it samples the round's nodes and keeps the decoded aggregate."""

    def __init__(self, grid: Grid, configs: dict[int, dict[str, object]], global_arrays: dict[str, np.ndarray]) -> None:
        self._grid, self._configs = grid, configs
        self._parameters: Parameters = ndarrays_to_parameters(list(global_arrays.values()))
        self.mean: list[np.ndarray] | None = None  # Flower's weighted mean of the survivors' vectors (weights 1)
        self.survivors = 0

    def initialize_parameters(self, client_manager):  # noqa: ANN001 - the legacy interface
        return None

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: ANN001
        return [(GridClientProxy(node, self._grid, 0), FitIns(self._parameters, dict(config))) for node, config in self._configs.items()]

    def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001
        # Flower sets every result's parameters to the one decoded aggregate: the sum, never an update.
        self.survivors = len(results)
        self.mean = parameters_to_ndarrays(results[0][1].parameters) if results else None
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: ANN001
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: ANN001
        return None, {}

    def evaluate(self, server_round, parameters):  # noqa: ANN001
        return None


def _legacy_context(collector: _SumCollector, server_round: int) -> LegacyContext:
    """The LegacyContext the workflow reads: the round number and (unused here) the global parameters."""
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}), strategy=collector)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(collector._parameters, keep_input=True)
    return context


class _ObservedGrid:
    """The run's Grid as the workflow sees it, keeping each node's masked-vector reply (for its train metrics) and how each stage went."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.masked_replies: dict[int, Message] = {}
        self.dropped: dict[int, str] = {}  # node -> the stage it stopped answering at (or its error)
        self.threshold_sent: int | None = None
        self.messages = 0

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001 - Grid's signature
        messages = list(messages)
        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]) if messages else ""
        if stage == Stage.SETUP:
            self.threshold_sent = int(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.THRESHOLD])
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.messages += len(messages) + len(replies)
        answered = {int(r.metadata.src_node_id): r for r in replies}
        for msg in messages:
            node = int(msg.metadata.dst_node_id)
            reply = answered.get(node)
            if reply is None or reply.has_error():
                self.dropped.setdefault(node, f"{stage}: " + (f"error {reply.error.code}: {reply.error.reason}" if reply is not None else "no reply"))
            elif stage == Stage.COLLECT_MASKED_VECTORS:
                self.masked_replies[node] = reply
        return replies

    def __getattr__(self, name: str):  # noqa: ANN204 - everything else is the run's Grid
        return getattr(self._grid, name)


def _classified(sampled: dict[int, int], observed: _ObservedGrid) -> RoundReplies:
    """The round's replies as the round loop counts them: in form from the train metrics of the masked-vector stage, else failed."""
    replies = RoundReplies(sampled=sum(sampled.values()))
    for node, users in sampled.items():
        if node in observed.masked_replies:
            replies.checked.append(check_masked_reply(observed.masked_replies[node], users))
        elif node in observed.dropped:
            replies.checked.append(CheckedReply(ReplyKind.FAILED, node, reason=f"dropped out of SecAgg+ at {observed.dropped[node]}", users=users))
    return replies


def _log_round(server_round: int, row: dict[str, object], replies: RoundReplies) -> None:
    # Counts and the plan only: no node id (layer 2's sample stays hidden), no vector.
    failed = sorted({c.reason.split(":")[0] for c in replies.checked if c.kind is ReplyKind.FAILED})
    LOG.info("fedinterest: round %d: SecAgg+ %s; %d user(s) trained; dropped at: %s", server_round, json.dumps(row), replies.count(ReplyKind.VALID), ", ".join(failed) or "-")


def _append_row(config: RunConfig, row: dict[str, object]) -> None:
    if not config.run_dir:
        return
    path = Path(config.run_dir) / SECURE_ROUNDS_FILE
    previous = path.read_text() if path.exists() else ""
    atomic_write_text(path, previous + json.dumps(row) + "\n")
