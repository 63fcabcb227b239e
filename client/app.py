"""The device's Flower ClientApp: decode the message, delegate, encode the reply.

Training lives in `client.local_training`, ranking in `client.local_evaluation`, the
device's data in `client.data_source` and its privacy ledger in `client.ledger`. What a
reply may hold is fixed by `common.wire` (docs/privacy.md lists it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from fedinterest.client.data_source import DeviceData, load_device_data
from fedinterest.client.faults import act_out, requested_fault
from fedinterest.client.ledger import open_device_ledger
from fedinterest.client.local_evaluation import DEFAULT_STAGE, evaluate_locally
from fedinterest.client.local_models import save_global_model
from fedinterest.client.local_training import LocalTrainingResult, train_locally
from fedinterest.client.privacy_policy import run_for_device
from fedinterest.common import wire
from fedinterest.common.model import InterestModel
from fedinterest.common.run_config import RunConfig
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

app = ClientApp()
LOG = logging.getLogger("flwr.fedinterest")
NO_HISTORY = np.zeros(0, dtype=np.int64)  # a device too new to train: train_locally replies empty


@dataclass(frozen=True)
class _Request:
    run: RunConfig
    device: DeviceData
    model: InterestModel  # holds the global weights the message carried
    config: ConfigRecord


def _decode(msg: Message, context: Context) -> _Request:
    """Run config, the device's data, the global model and the message's config."""
    torch.set_num_threads(1)
    run = RunConfig.from_flower(context.run_config)
    device = load_device_data(context.node_config, run)
    arrays = msg.content.array_records.get(wire.ARRAYS)
    if arrays is None:
        raise ValueError(f"the {msg.metadata.message_type} message carries no ArrayRecord under {wire.ARRAYS!r}")
    model = InterestModel(run.model_config(device.num_items))
    model.load_state_dict(arrays.to_torch_state_dict())
    config = msg.content.config_records.get(wire.CONFIG, ConfigRecord())
    if device.store_path is not None:
        # A real device keeps the global model it received, so it can rank offline later.
        server_round = config.get(wire.SERVER_ROUND)
        save_global_model(
            device.store_path, model, run_id=context.run_id, server_round=server_round if isinstance(server_round, int) else None,
            message_type=msg.metadata.message_type, delta=run.delta, epsilon_budget=run.epsilon_budget,
        )
    return _Request(run, device, model, config)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local DP training; a refusal (privacy budget) is a normal reply without arrays."""
    req = _decode(msg, context)
    server_round = req.config.get(wire.SERVER_ROUND)
    if not isinstance(server_round, int):
        raise ValueError(f"the train message's {wire.CONFIG!r} record needs an integer {wire.SERVER_ROUND!r}")
    fault = requested_fault(context.node_config, req.config)
    if fault is not None:
        act_out(fault, req.run.round_timeout)
    run, refusal = req.run, None
    if req.device.store_path is not None:  # a real device: its own privacy floor applies
        run, refusal = run_for_device(str(req.device.store_path), req.run)
    with open_device_ledger(req.device.ledger_path, context.state) as ledger:
        if refusal is not None:
            LOG.warning("fedinterest device: refusing round %d: %s", server_round, refusal)
            result = LocalTrainingResult(None, 0, 0.0, ledger.epsilon(run.delta), refused=True)
        else:
            result = train_locally(
                model=req.model, train_history=req.device.user.train if req.device.user else NO_HISTORY, run=run, ledger=ledger,
                run_id=context.run_id, server_round=server_round,
                proximal_mu=float(req.config.get(wire.PROXIMAL_MU, 0.0)),
            )
    content = RecordDict()
    if result.state_dict is not None:
        content[wire.ARRAYS] = ArrayRecord(result.state_dict)
    content[wire.METRICS] = MetricRecord({
        wire.NUM_EXAMPLES: result.num_examples,
        wire.TRAIN_LOSS: result.train_loss,
        wire.EPSILON: result.epsilon,
        wire.REFUSED: 1.0 if result.refused else 0.0,
    })
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Rank the full catalogue for the user's held-out item of the requested stage."""
    req = _decode(msg, context)
    stage = req.config.get(wire.STAGE, DEFAULT_STAGE)
    if req.device.user is None:  # no held-out item yet: counts for no user in the average
        metrics = MetricRecord({wire.NUM_EXAMPLES: 0, wire.HIT_RATE_10: 0.0, wire.NDCG_10: 0.0})
        return Message(RecordDict({wire.METRICS: metrics}), reply_to=msg)
    result = evaluate_locally(model=req.model, user=req.device.user, stage=str(stage))
    metrics = MetricRecord({wire.NUM_EXAMPLES: 1, wire.HIT_RATE_10: result.hit_rate_10, wire.NDCG_10: result.ndcg_10})
    return Message(RecordDict({wire.METRICS: metrics}), reply_to=msg)
