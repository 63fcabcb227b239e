"""DESIGN principle 1: the simulation shortcut (the server ranks every user itself) gives
the same HR@10 / NDCG@10 as the federated path (each device's evaluate handler) on the
same weights."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from flwr.app import DEFAULT_TTL, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from fedinterest.client.app import app as client_app
from fedinterest.common import wire
from fedinterest.common.datasets import load_split
from fedinterest.common.model import InterestModel
from fedinterest.common.run_config import RunConfig
from fedinterest.server.evaluation import ServerEvaluator

# share-metrics: the devices send their HR@10 / NDCG@10 (docs/privacy.md: not by default).
RUN = RunConfig(synthetic_users=25, synthetic_items=160, max_len=12, dim=8, num_blocks=1, dropout=0.0, share_metrics=True)


def _device_reply(arrays: ArrayRecord, partition: int, stage: str) -> dict[str, float]:
    metadata = Metadata(
        run_id=1, message_id=f"e-{partition}-{time.monotonic_ns()}", src_node_id=1, dst_node_id=100 + partition,
        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=DEFAULT_TTL, message_type="evaluate",
    )
    msg = Message(RecordDict({wire.ARRAYS: arrays, wire.CONFIG: ConfigRecord({wire.STAGE: stage})}), metadata=metadata)
    context = Context(
        run_id=1, node_id=100 + partition, node_config={"partition-id": partition, "num-partitions": RUN.synthetic_users},
        state=RecordDict(), run_config=RUN.to_flower(),
    )
    reply = client_app(msg, context)
    return dict(reply.content.metric_records[wire.METRICS])


@pytest.mark.parametrize("stage", ["valid", "test"])
def test_server_shortcut_equals_device_evaluation(stage: str) -> None:
    torch.manual_seed(3)
    split = load_split(RUN.dataset_spec())
    model = InterestModel(RUN.model_config(split.num_items))
    arrays = ArrayRecord(model.state_dict())
    server = ServerEvaluator(split, RUN.model_config(split.num_items)).evaluate(arrays, stage)
    replies = [_device_reply(arrays, p, stage) for p in range(len(split.users))]
    # Each device reports one user; the federated figure is their example-weighted mean.
    weights = np.array([r[wire.NUM_EXAMPLES] for r in replies])
    for key in (wire.HIT_RATE_10, wire.NDCG_10):
        federated = float(np.average([r[key] for r in replies], weights=weights))
        assert federated == pytest.approx(server[key], abs=1e-12), key
    assert 0 < server["ndcg@10"] < 1  # a non-trivial case: some users hit, some miss
