"""Train-reply metrics in the wire's form (common/wire.py), and a scripted device, for tests that play devices."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedinterest.common.wire import (
    ARRAYS,
    EPSILON,
    HIT_RATE_10,
    METRICS,
    NDCG_10,
    NUM_EXAMPLES,
    NUM_USERS,
    REFUSED,
    TRAIN_LOSS,
)


def train_metrics(n: float, loss: float, eps: float, refused: float = 0.0, *, users: int = 1, **extra) -> MetricRecord:
    """The metrics of a reply for `users` sampled users: trained when n > 0 and not refused."""
    refused_users = users if refused else 0
    trained = users if n and not refused else 0
    return MetricRecord({
        NUM_EXAMPLES: n, NUM_USERS: trained, TRAIN_LOSS: loss, EPSILON: [eps] * users, REFUSED: refused_users, **extra,
    })


def deployed_device(*, share: bool = True, step: float = 0.01, epsilon: float = 1.0, loss: float = 2.0, ndcg: float = 0.5):
    """A scripted real device: trains (every weight + `step`) and ranks its held-out item.

    With `share` it adds the shared-only metrics (train-loss; hr@10, ndcg@10), as every
    device did before issue 13, so a test using it also runs against that code.
    """

    def respond(message: Message) -> Message:
        if message.metadata.message_type == MessageType.EVALUATE:
            values = {NUM_EXAMPLES: 1} | ({HIT_RATE_10: float(ndcg > 0), NDCG_10: ndcg} if share else {})
            return Message(RecordDict({METRICS: MetricRecord(values)}), reply_to=message)
        arrays = ArrayRecord({k: Array((a.numpy() + step).astype(np.float32)) for k, a in message.content[ARRAYS].items()})
        values = {NUM_EXAMPLES: 1, NUM_USERS: 1, EPSILON: [epsilon], REFUSED: 0} | ({TRAIN_LOSS: loss} if share else {})
        return Message(RecordDict({ARRAYS: arrays, METRICS: MetricRecord(values)}), reply_to=message)

    return respond
