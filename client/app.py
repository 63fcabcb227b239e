"""The device's Flower ClientApp: decode the message, delegate, encode the reply.

A node stands for the users of its shard: one on a real device, several in simulation
(run-config users-per-node). Training lives in `client.shard_training` (each sampled user
as its own device) and `client.local_training`, ranking in `client.local_evaluation`,
the node's data in `client.data_source` and its privacy ledger in `client.ledger` (kept open,
with a model template, between a simulation process's messages: `client.warm_node`). What
a reply may hold is fixed by `common.wire` (docs/privacy.md lists it); what an error
reply may say, by `client.device_errors`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    MetricRecordValues,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fedinterest.client.data_source import DeviceData, load_device_data
from fedinterest.client.device_errors import MessageError, reported_errors
from fedinterest.client.device_logging import drop_opacus_root_handler, refusal_reason
from fedinterest.client.faults import act_out, requested_fault
from fedinterest.client.local_evaluation import DEFAULT_STAGE, evaluate_locally
from fedinterest.client.local_models import save_global_model
from fedinterest.client.privacy_policy import run_for_device
from fedinterest.client.secure_contribution import (
    contribution,
    fit_instructions,
    is_secure,
    masked_fit_reply,
    protocol_min_survivors,
    secure_aggregation_mod,
)
from fedinterest.client.shard_training import refused_round, train_shard
from fedinterest.client.warm_node import fresh_model, node_ledger
from fedinterest.common import wire
from fedinterest.common.model import InterestModel
from fedinterest.common.popularity import user_count_vector
from fedinterest.common.run_config import RunConfig

app = ClientApp()
LOG = logging.getLogger("flwr.fedinterest")
drop_opacus_root_handler()  # else every log line is printed twice, spacers as blank lines (client/device_logging.py)


@dataclass(frozen=True)
class _Request:
    run: RunConfig
    device: DeviceData
    model: InterestModel  # holds the global weights the message carried
    config: ConfigRecord


def _decode(msg: Message, context: Context) -> _Request:
    """Run config, the device's data, the global model and the message's config."""
    torch.set_num_threads(1)
    run = _run_config(context)
    device = load_device_data(context.node_config, run)
    if device.store_path is not None:  # a real device: its own privacy policy applies
        run, _ = run_for_device(str(device.store_path), run)  # a refusal is the train handler's to act on
    # A secure round's train message is Flower's legacy FitIns (client/secure_contribution.py).
    arrays, config = fit_instructions(msg) if is_secure(msg) else (msg.content.array_records.get(wire.ARRAYS), None)
    if arrays is None:
        raise MessageError(f"the {msg.metadata.message_type} message carries no ArrayRecord under {wire.ARRAYS!r}")
    model = fresh_model(run.model_config(device.num_items, device.item_ids))  # built once per process (client/warm_node.py)
    try:
        model.load_state_dict(arrays.to_torch_state_dict())
    except RuntimeError as err:  # torch names only the arrays' and the model's shapes (the catalogue's size)
        raise MessageError(f"the {msg.metadata.message_type} message's arrays do not fit the run's model: {err}") from None
    config = config if config is not None else msg.content.config_records.get(wire.CONFIG, ConfigRecord())
    if device.store_path is not None:
        # A real device keeps the global model it received, so it can rank offline later.
        server_round = config.get(wire.SERVER_ROUND)
        save_global_model(
            device.store_path, model, run_id=context.run_id, server_round=server_round if isinstance(server_round, int) else None,
            message_type=msg.metadata.message_type, delta=run.delta, epsilon_budget=run.epsilon_budget,
        )
    return _Request(run, device, model, config)


def _run_config(context: Context) -> RunConfig:
    """The run config the server sent, parsed (its errors name only its own keys and values)."""
    try:
        return RunConfig.from_flower(context.run_config)
    except ValueError as err:
        raise MessageError(str(err)) from None


@app.train(mods=[secure_aggregation_mod])
@reported_errors
def train(msg: Message, context: Context) -> Message:
    """One round for the node's sampled users; a refusal (privacy budget) is a normal reply without arrays.

    In a secure round (Flower's SecAgg+ mod calls this in its masked-vector stage) the
    reply is the users' clipped sum plus this device's noise share, which the mod masks.
    """
    req = _decode(msg, context)
    secure = is_secure(msg)
    # The secure reply is an update (trained - global): keep the global weights, only then.
    global_state = {name: value.detach().clone() for name, value in req.model.state_dict().items()} if secure else None
    server_round = req.config.get(wire.SERVER_ROUND)
    if not isinstance(server_round, int):
        raise MessageError(f"the train message's {wire.CONFIG!r} record needs an integer {wire.SERVER_ROUND!r}")
    sampled = _sampled_users(req.config, len(req.device.users))
    clip_norm = _round_clip_norm(req.config)
    fault = requested_fault(context.node_config, req.config)
    if fault is not None:
        act_out(fault, req.run.round_timeout)
    run, refusal = req.run, None
    if req.device.store_path is not None:  # a real device: its own privacy floor applies
        run, refusal = run_for_device(str(req.device.store_path), req.run)
    with node_ledger(req.device, context.state, context.run_id) as ledger:  # kept open across messages (client/warm_node.py)
        if refusal is not None:
            LOG.warning("fedinterest device: refusing round %d: %s", server_round, refusal)
            result = refused_round(req.device, sampled, ledger, run.delta)
        else:
            result = train_shard(
                model=req.model, device=req.device, sampled=sampled, run=run, ledger=ledger, run_id=context.run_id,
                server_round=server_round, proximal_mu=_config_float(req.config, wire.PROXIMAL_MU), clip_norm=clip_norm,
            )
            if result.refused and req.device.store_path is not None:  # a real device's one user: its log says why
                LOG.warning("fedinterest device: refusing round %d: %s", server_round, refusal_reason(ledger, run, context.run_id, server_round, result.epsilons[0]))
    metrics: dict[str, MetricRecordValues] = {
        wire.NUM_EXAMPLES: result.num_examples,
        wire.NUM_USERS: result.num_users,
        wire.EPSILON: [float(e) for e in result.epsilons],
        wire.REFUSED: result.refused,
    }
    if clip_norm is not None:  # adaptive clipping: the server noises the count (server/adaptive_clipping.py)
        metrics[wire.UNCLIPPED_USERS] = result.unclipped
    if run.share_metrics:  # a noiseless function of the training windows (docs/privacy.md)
        metrics[wire.TRAIN_LOSS] = result.train_loss
    if global_state is not None:  # a secure round
        shares = contribution(
            global_state, result.state_dict, result.num_users, run=run, server_round=server_round,
            noise_multiplier=_config_float(req.config, wire.SECURE_NOISE_MULTIPLIER), min_survivors=protocol_min_survivors(context),
        )
        return Message(masked_fit_reply(shares, MetricRecord(metrics)), reply_to=msg)
    content = RecordDict()
    if result.state_dict is not None:
        content[wire.ARRAYS] = ArrayRecord(result.state_dict)
    content[wire.METRICS] = MetricRecord(metrics)
    return Message(content, reply_to=msg)


def _config_float(config: ConfigRecord, key: str) -> float:
    """config[key] (absent: 0) as float() reads it; a list raises TypeError, as float() does."""
    value: Any = config.get(key, 0.0)  # any ConfigRecord value: float() takes a number, str or bytes
    return float(value)


def _int_list(values: list[Any]) -> TypeGuard[list[int]]:
    """Whether every value is an int (a bool, though an int to Python, is not)."""
    return not any(isinstance(i, bool) or not isinstance(i, int) for i in values)


def _round_clip_norm(config: ConfigRecord) -> float | None:
    """The round's user-level clip norm under adaptive clipping (absent: the run's user-clip-norm)."""
    clip = config.get(wire.CLIP_NORM)
    if clip is None:
        return None
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip) or clip <= 0:
        raise MessageError(f"the train message's {wire.CLIP_NORM!r} must be a positive number, got {clip!r}")
    return float(clip)


def _sampled_users(config: ConfigRecord, shard_size: int) -> list[int]:
    """The shard indices the server sampled (absent: the first, a real device's only user)."""
    sampled = config.get(wire.SHARD_USERS, [0])
    if not isinstance(sampled, list) or not sampled or not _int_list(sampled):
        raise MessageError(f"the train message's {wire.SHARD_USERS!r} must be a non-empty list of user indices, got {sampled!r}")
    if any(not 0 <= i < shard_size for i in sampled) or len(set(sampled)) != len(sampled):
        raise MessageError(f"{wire.SHARD_USERS!r} {sampled} names users outside this node's {shard_size}, or one twice")
    return sorted(sampled)


@app.query("shard")
@reported_errors
def shard(msg: Message, context: Context) -> Message:
    """Which users this node holds: the dataset index of its first user and how many."""
    torch.set_num_threads(1)
    device = load_device_data(context.node_config, _run_config(context))
    metrics = MetricRecord({wire.SHARD_FIRST_USER: device.first_user, wire.SHARD_SIZE: len(device.users)})
    return Message(RecordDict({wire.METRICS: metrics}), reply_to=msg)


@app.query("popularity")
@reported_errors
def popularity(msg: Message, context: Context) -> Message:
    """The mean of the sampled users' bounded item counts (each of L2 norm 1) over their
    training items, for the private popularity prior; a simulated node's reply only."""
    torch.set_num_threads(1)
    device = load_device_data(context.node_config, _run_config(context))
    if device.store_path is not None:  # not part of what a real device sends (docs/privacy.md)
        raise MessageError("a real device answers no popularity query: the popularity prior is a simulation option")
    config = msg.content.config_records.get(wire.CONFIG, ConfigRecord())
    sampled = [user for i in _sampled_users(config, len(device.users)) if (user := device.users[i]) is not None]
    total = np.zeros(device.num_items + 1, dtype=np.float64)
    for user in sampled:
        total += user_count_vector(user.train, device.num_items)
    content = RecordDict({wire.METRICS: MetricRecord({wire.NUM_USERS: len(sampled)})})
    if sampled:
        content[wire.ARRAYS] = ArrayRecord({wire.POPULARITY_COUNTS: Array(total / len(sampled))})
    return Message(content, reply_to=msg)


@app.evaluate()
@reported_errors
def evaluate(msg: Message, context: Context) -> Message:
    """Rank the full catalogue for each user's held-out item of the requested stage; reply their mean."""
    req = _decode(msg, context)
    stage = str(req.config.get(wire.STAGE, DEFAULT_STAGE))
    users = [u for u in req.device.users if u is not None]  # a user without a held-out item counts for none
    results = [evaluate_locally(model=req.model, user=user, stage=stage) for user in users]
    count = len(results)
    metrics: dict[str, MetricRecordValues] = {wire.NUM_EXAMPLES: count}
    if req.run.share_metrics and count:  # the held-out item's rank, without noise (docs/privacy.md)
        metrics[wire.HIT_RATE_10] = sum(r.hit_rate_10 for r in results) / count
        metrics[wire.NDCG_10] = sum(r.ndcg_10 for r in results) / count
    return Message(RecordDict({wire.METRICS: MetricRecord(metrics)}), reply_to=msg)
