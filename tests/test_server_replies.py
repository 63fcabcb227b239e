"""Reply classification and aggregation on real Flower Message / RecordDict objects."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from reply_helpers import train_metrics
from scripted_grid import as_server_task

from fedinterest.common.wire import ARRAYS, CONFIG, EPSILON, METRICS, NUM_EXAMPLES, REFUSED, TRAIN_LOSS
from fedinterest.server.reply_checks import ArraySpec, ReplyKind, UpdateBound, check_train_reply, classify_replies

GLOBAL = {"a": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(4, dtype=np.float32)}


@pytest.fixture(autouse=True)
def task_identity():
    with as_server_task():
        yield


def spec() -> ArraySpec:
    return ArraySpec.of(ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}))


def instruction(node: int) -> Message:
    content = RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}), CONFIG: ConfigRecord({"server-round": 1})})
    return Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)


def metrics(n=3, loss=1.5, eps=0.7, refused=0.0, **extra) -> MetricRecord:
    return train_metrics(n, loss, eps, refused, **extra)


def arrays(value: float = 1.0, order=("a", "b"), **override) -> ArrayRecord:
    values = {k: np.full_like(GLOBAL[k], value) for k in order}
    values.update(override)
    return ArrayRecord({k: Array(v) for k, v in values.items()})


def reply(node: int, **records) -> Message:
    return Message(RecordDict(records), reply_to=instruction(node))


def kind_of(msg: Message) -> ReplyKind:
    return check_train_reply(msg, spec()).kind


def test_valid_reply_is_aggregated_in_the_global_key_order():
    checked = check_train_reply(reply(5, **{ARRAYS: arrays(2.0, order=("b", "a")), METRICS: metrics()}), spec())
    assert checked.kind is ReplyKind.VALID and checked.node_id == 5
    assert (checked.num_examples, checked.train_loss, checked.epsilon) == (3.0, 1.5, 0.7)
    assert list(checked.message.content[ARRAYS].keys()) == ["a", "b"]


def test_error_refused_and_empty_replies():
    error = Message(Error(code=3, reason="client crashed"), reply_to=instruction(2))
    assert check_train_reply(error, spec()).kind is ReplyKind.FAILED
    assert "client crashed" in check_train_reply(error, spec()).reason
    refused = check_train_reply(reply(3, **{METRICS: metrics(n=0, loss=float("nan"), eps=8.1, refused=1.0)}), spec())
    assert refused.kind is ReplyKind.REFUSED and refused.epsilon == 8.1
    assert kind_of(reply(4, **{METRICS: metrics(n=0, loss=float("nan"))})) is ReplyKind.EMPTY
    assert kind_of(reply(4, **{ARRAYS: arrays(), METRICS: metrics(n=0)})) is ReplyKind.EMPTY
    # DP off: epsilon is inf, still a well-formed reply.
    assert kind_of(reply(4, **{ARRAYS: arrays(), METRICS: metrics(eps=math.inf)})) is ReplyKind.VALID


@pytest.mark.parametrize(
    "records",
    [
        {ARRAYS: arrays(), METRICS: metrics(extra_key=1.0)},  # a metric beyond the contract
        {ARRAYS: arrays(), METRICS: MetricRecord({NUM_EXAMPLES: 3, TRAIN_LOSS: 1.0, EPSILON: 1.0})},  # one missing
        {ARRAYS: arrays(), METRICS: metrics(), "other": ConfigRecord({"history": "1 2 3"})},  # an extra record
        {ARRAYS: arrays(), "more": arrays(), METRICS: metrics()},  # two ArrayRecords
        {ARRAYS: arrays(), METRICS: metrics(), "m2": metrics()},  # two MetricRecords
        {ARRAYS: arrays(order=("a",)), METRICS: metrics()},  # a missing array
        {ARRAYS: arrays(a=np.zeros((3, 2), dtype=np.float32)), METRICS: metrics()},  # wrong shape
        {ARRAYS: arrays(a=np.zeros((2, 3), dtype=np.float64)), METRICS: metrics()},  # wrong dtype
        {ARRAYS: arrays(b=np.array([0, np.nan, 0, 0], dtype=np.float32)), METRICS: metrics()},  # non-finite weights
        {ARRAYS: arrays(), METRICS: metrics(loss=float("nan"))},  # non-finite loss of a trained update
        {ARRAYS: arrays(), METRICS: metrics(n=2.5)},  # fractional example count
        {ARRAYS: arrays(), METRICS: metrics(n=-1)},
        {ARRAYS: arrays(), METRICS: metrics(eps=-0.1)},
        {ARRAYS: arrays(), METRICS: metrics(eps=float("nan"))},
        {ARRAYS: arrays(), METRICS: metrics(refused=0.5)},
        {ARRAYS: arrays(), METRICS: metrics(refused=1.0)},  # refused, yet carrying weights
        {ARRAYS: arrays(), METRICS: MetricRecord({NUM_EXAMPLES: 3, TRAIN_LOSS: [1.0, 2.0], EPSILON: 1.0, REFUSED: 0.0})},
        {ARRAYS: arrays()},  # no metrics at all
        {METRICS: ConfigRecord({NUM_EXAMPLES: 3})},  # metrics of the wrong record type
    ],
)
def test_malformed_replies_are_rejected(records):
    checked = check_train_reply(reply(9, **records), spec())
    assert checked.kind is ReplyKind.REJECTED, checked
    assert checked.reason and checked.message is None


def test_round_tally_and_aggregation_use_valid_replies_only():
    replies = [
        reply(1, **{ARRAYS: arrays(1.0), METRICS: metrics(n=1, loss=2.0, eps=1.0)}),
        reply(2, **{ARRAYS: arrays(4.0), METRICS: metrics(n=3, loss=1.0, eps=3.0)}),
        reply(3, **{ARRAYS: arrays(100.0), METRICS: metrics(n=50, extra=1.0)}),  # rejected: never averaged
        reply(4, **{METRICS: metrics(n=0, loss=float("nan"), eps=8.5, refused=1.0)}),
        reply(5, **{METRICS: metrics(n=0, loss=float("nan"), eps=0.0)}),
        Message(Error(code=1, reason="boom"), reply_to=instruction(6)),
    ]
    tally = classify_replies(sampled=7, replies=replies, spec=spec())  # node 7 never answered
    counts = {kind: tally.count(kind) for kind in ReplyKind}
    assert counts == {ReplyKind.VALID: 2, ReplyKind.REJECTED: 1, ReplyKind.REFUSED: 1, ReplyKind.EMPTY: 1, ReplyKind.FAILED: 2}
    assert tally.answered == 5 and tally.missing == 1
    assert tally.train_loss == pytest.approx((1 * 2.0 + 3 * 1.0) / 4)
    assert tally.epsilons == {(1, 0): 1.0, (2, 0): 3.0, (4, 0): 8.5, (5, 0): 0.0}  # (node, its i-th sampled user)
    aggregated, _ = FedAvg(weighted_by_key=NUM_EXAMPLES).aggregate_train(1, tally.valid_messages)
    np.testing.assert_allclose(aggregated["a"].numpy(), np.full((2, 3), (1 * 1.0 + 3 * 4.0) / 4))
    np.testing.assert_allclose(aggregated["b"].numpy(), np.full(4, 3.25))


def bound(max_norm: float) -> UpdateBound:
    return UpdateBound({k: v.copy() for k, v in GLOBAL.items()}, max_norm)


def test_update_norm_bound_measures_the_update_against_the_weights_sent():
    # arrays(v) moves all 10 weights by v from the zero global model: norm sqrt(10) * v.
    assert bound(1.0).norm(arrays(2.0)) == pytest.approx(2.0 * math.sqrt(10))
    within = check_train_reply(reply(1, **{ARRAYS: arrays(1.0), METRICS: metrics()}), spec(), bound(math.sqrt(10) + 1e-6))
    assert within.kind is ReplyKind.VALID
    beyond = check_train_reply(reply(1, **{ARRAYS: arrays(1.01), METRICS: metrics()}), spec(), bound(math.sqrt(10)))
    assert beyond.kind is ReplyKind.REJECTED and "max-update-norm" in beyond.reason and beyond.message is None
    # float32 weights whose squares overflow float32 are still measured (in float64) and rejected.
    huge = check_train_reply(reply(1, **{ARRAYS: arrays(3e38), METRICS: metrics()}), spec(), bound(1e6))
    assert huge.kind is ReplyKind.REJECTED and "update norm" in huge.reason


def _extra_array() -> ArrayRecord:
    record = arrays(50.0)
    record["c"] = Array(np.zeros(1, dtype=np.float32))
    return record


# Each malformed kind of the issue: wrong array count (one missing, one extra), shape, dtype, NaN, Inf, norm.
MALFORMED_UPDATES = {
    "array missing": arrays(50.0, order=("a",)),
    "array extra": _extra_array(),
    "shape": arrays(50.0, a=np.full((3, 2), 50.0, dtype=np.float32)),
    "dtype": arrays(50.0, a=np.full((2, 3), 50.0, dtype=np.float16)),
    "nan": arrays(50.0, b=np.array([50, np.nan, 50, 50], dtype=np.float32)),
    "inf": arrays(50.0, b=np.array([50, np.inf, 50, 50], dtype=np.float32)),
    "norm": arrays(50.0),  # well formed, but moved by 50 * sqrt(10), beyond the bound of 20
}


@pytest.mark.parametrize("kind", sorted(MALFORMED_UPDATES))
def test_each_malformed_kind_is_rejected_counted_and_left_out_of_the_aggregate(kind):
    good = [
        reply(1, **{ARRAYS: arrays(1.0), METRICS: metrics(n=1)}),
        reply(2, **{ARRAYS: arrays(4.0), METRICS: metrics(n=3)}),
    ]
    bad = reply(3, **{ARRAYS: MALFORMED_UPDATES[kind], METRICS: metrics(n=1000)})
    tally = classify_replies(sampled=3, replies=[good[0], bad, good[1]], spec=spec(), bound=bound(20.0))
    assert tally.count(ReplyKind.REJECTED) == 1 and tally.count(ReplyKind.VALID) == 2
    (rejected,) = [c for c in tally.checked if c.kind is ReplyKind.REJECTED]
    assert rejected.node_id == 3 and rejected.reason
    got, _ = FedAvg(weighted_by_key=NUM_EXAMPLES).aggregate_train(1, tally.valid_messages)
    valid_only = classify_replies(sampled=2, replies=[
        reply(1, **{ARRAYS: arrays(1.0), METRICS: metrics(n=1)}),
        reply(2, **{ARRAYS: arrays(4.0), METRICS: metrics(n=3)}),
    ], spec=spec())
    expected, _ = FedAvg(weighted_by_key=NUM_EXAMPLES).aggregate_train(1, valid_only.valid_messages)
    for key in GLOBAL:
        np.testing.assert_array_equal(got[key].numpy(), expected[key].numpy())
    np.testing.assert_allclose(got["a"].numpy(), np.full((2, 3), 3.25))
