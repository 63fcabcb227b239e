"""Train-reply metrics in the wire's form (common/wire.py), for tests that play devices."""

from __future__ import annotations

from flwr.app import MetricRecord

from fedinterest.common.wire import EPSILON, NUM_EXAMPLES, NUM_USERS, REFUSED, TRAIN_LOSS


def train_metrics(n: float, loss: float, eps: float, refused: float = 0.0, *, users: int = 1, **extra) -> MetricRecord:
    """The metrics of a reply for `users` sampled users: trained when n > 0 and not refused."""
    refused_users = users if refused else 0
    trained = users if n and not refused else 0
    return MetricRecord({
        NUM_EXAMPLES: n, NUM_USERS: trained, TRAIN_LOSS: loss, EPSILON: [eps] * users, REFUSED: refused_users, **extra,
    })
