"""Checks on what devices send back: every train reply is classified before anything
is aggregated.

A reply is exactly one of
- failed   -- an error reply (`msg.has_error()`); devices that did not answer before the
              round's timeout are counted as failed by the round loop;
- rejected -- malformed: records other than one MetricRecord under METRICS (plus, for a
              trained update, one ArrayRecord under ARRAYS), metric keys other than
              exactly TRAIN_REPLY_METRICS, non-numeric or out-of-range values, arrays whose
              keys, shapes or dtypes differ from the global model's, non-finite
              weights or loss, or -- with an UpdateBound (run-config max-update-norm) --
              an update whose L2 norm against the global weights sent exceeds it. Rejected replies are counted and never aggregated, and
              nothing they report (not even epsilon) is trusted;
- refused  -- REFUSED == 1: the device declined because of its privacy budget (no arrays);
- empty    -- no arrays or NUM_EXAMPLES == 0: the device had nothing to train on;
- valid    -- everything else: aggregated, weighted by NUM_EXAMPLES.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedinterest.common.wire import ARRAYS, EPSILON, METRICS, NUM_EXAMPLES, REFUSED, TRAIN_LOSS, TRAIN_REPLY_METRICS


class ReplyKind(str, Enum):
    """What a train reply turned out to be."""

    VALID = "valid"
    REFUSED = "refused"
    EMPTY = "empty"
    REJECTED = "rejected"
    FAILED = "failed"


@dataclass(frozen=True)
class ArraySpec:
    """Key order, shapes and dtypes of the global model's arrays: what an update must match."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]

    @classmethod
    def of(cls, arrays: ArrayRecord) -> ArraySpec:
        """The spec of `arrays` (read from the arrays' metadata, nothing deserialised)."""
        return cls(
            shapes={k: tuple(a.shape) for k, a in arrays.items()},
            dtypes={k: str(a.dtype) for k, a in arrays.items()},
        )


@dataclass(frozen=True)
class UpdateBound:
    """The global weights a round sent, and the largest L2 norm an update may move them by."""

    sent: dict[str, np.ndarray]
    max_norm: float

    def norm(self, arrays: ArrayRecord) -> float:
        """L2 norm of (arrays - sent) over every array."""
        return l2_norm(arrays[key].numpy().astype(np.float64) - base.astype(np.float64) for key, base in self.sent.items())


def l2_norm(arrays: Iterable[np.ndarray]) -> float:
    """The L2 norm of several arrays taken together, in float64 (float32 squares overflow)."""
    total = 0.0
    for array in arrays:
        flat = np.asarray(array, dtype=np.float64).ravel()
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


@dataclass(frozen=True)
class CheckedReply:
    """One classified reply. The numbers are None when the reply was failed or rejected."""

    kind: ReplyKind
    node_id: int
    reason: str = ""
    num_examples: float | None = None
    train_loss: float | None = None
    epsilon: float | None = None
    message: Message | None = None  # valid replies only, arrays in the global model's key order


class MalformedReply(ValueError):
    """A reply that breaks the wire contract (common/wire.py)."""


def check_train_reply(msg: Message, spec: ArraySpec, bound: UpdateBound | None = None) -> CheckedReply:
    """Classify one train reply against the global model's `spec` (and the update `bound`, if any)."""
    node = int(msg.metadata.src_node_id)
    if msg.has_error():
        return CheckedReply(ReplyKind.FAILED, node, reason=f"error {msg.error.code}: {msg.error.reason}")
    try:
        return _check_content(msg, node, spec, bound)
    except MalformedReply as exc:
        return CheckedReply(ReplyKind.REJECTED, node, reason=str(exc))


def _check_content(msg: Message, node: int, spec: ArraySpec, bound: UpdateBound | None) -> CheckedReply:
    content = msg.content
    metrics = _metrics(content)
    num_examples, loss, epsilon, refused = (metrics[k] for k in (NUM_EXAMPLES, TRAIN_LOSS, EPSILON, REFUSED))
    has_arrays = ARRAYS in content.array_records
    if refused == 1.0:
        if has_arrays:
            raise MalformedReply("a refused reply must not carry arrays")
        return CheckedReply(ReplyKind.REFUSED, node, num_examples=num_examples, epsilon=epsilon)
    if not has_arrays or num_examples == 0:
        return CheckedReply(ReplyKind.EMPTY, node, num_examples=num_examples, epsilon=epsilon)
    if not math.isfinite(loss):
        raise MalformedReply(f"{TRAIN_LOSS} is {loss} for a trained update")
    ordered = _checked_arrays(content[ARRAYS], spec)
    if bound is not None:
        norm = bound.norm(ordered)
        if not norm <= bound.max_norm:  # also catches an overflow to inf
            raise MalformedReply(f"update norm {norm:.4g} exceeds max-update-norm {bound.max_norm:g}")
    # FedAvgM pairs arrays by position, not by key: hand the strategy the global order.
    msg.content = RecordDict({ARRAYS: ordered, METRICS: content[METRICS]})
    return CheckedReply(ReplyKind.VALID, node, num_examples=num_examples, train_loss=loss, epsilon=epsilon, message=msg)


def _metrics(content: RecordDict) -> dict[str, float]:
    """The reply's train metrics, checked: exactly TRAIN_REPLY_METRICS, scalar, in range."""
    others = set(content.keys()) - {ARRAYS, METRICS}
    if others:
        raise MalformedReply(f"unexpected records {sorted(others)}")
    if set(content.metric_records) != {METRICS}:
        raise MalformedReply(f"expected one MetricRecord under {METRICS!r}, got {sorted(content.metric_records)}")
    if ARRAYS in content and ARRAYS not in content.array_records:
        raise MalformedReply(f"record {ARRAYS!r} is not an ArrayRecord")
    record: MetricRecord = content[METRICS]
    if set(record.keys()) != set(TRAIN_REPLY_METRICS):
        raise MalformedReply(f"metric keys {sorted(record.keys())} are not exactly {sorted(TRAIN_REPLY_METRICS)}")
    values = {}
    for key in TRAIN_REPLY_METRICS:
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MalformedReply(f"metric {key!r} must be a number, got {value!r}")
        values[key] = float(value)
    n = values[NUM_EXAMPLES]
    if not (math.isfinite(n) and n >= 0 and n == int(n)):
        raise MalformedReply(f"{NUM_EXAMPLES} must be a whole number >= 0, got {n}")
    if values[REFUSED] not in (0.0, 1.0):
        raise MalformedReply(f"{REFUSED} must be 0 or 1, got {values[REFUSED]}")
    eps = values[EPSILON]
    if math.isnan(eps) or eps < 0:
        raise MalformedReply(f"{EPSILON} must be >= 0 (inf when DP is off), got {eps}")
    return values


def _checked_arrays(arrays: ArrayRecord, spec: ArraySpec) -> ArrayRecord:
    """`arrays` in the spec's key order, after checking keys, shapes, dtypes and finiteness."""
    if set(arrays.keys()) != set(spec.shapes):
        missing, extra = sorted(set(spec.shapes) - set(arrays.keys())), sorted(set(arrays.keys()) - set(spec.shapes))
        raise MalformedReply(f"array keys differ from the global model's (missing {missing}, unexpected {extra})")
    for key, shape in spec.shapes.items():
        array = arrays[key]
        try:
            values = array.numpy()
        except Exception as exc:  # noqa: BLE001 -- any undecodable payload is a malformed reply
            raise MalformedReply(f"array {key!r} cannot be decoded: {exc}") from exc
        if tuple(values.shape) != shape or tuple(array.shape) != shape:
            raise MalformedReply(f"array {key!r} has shape {tuple(values.shape)}, expected {shape}")
        if str(values.dtype) != spec.dtypes[key]:
            raise MalformedReply(f"array {key!r} has dtype {values.dtype}, expected {spec.dtypes[key]}")
        if not np.isfinite(values).all():
            raise MalformedReply(f"array {key!r} holds non-finite values")
    return ArrayRecord({key: arrays[key] for key in spec.shapes})


@dataclass
class RoundReplies:
    """Every reply of one round, classified, and what the round's metrics row needs."""

    sampled: int
    checked: list[CheckedReply] = field(default_factory=list)

    def count(self, kind: ReplyKind) -> int:
        """How many replies were of `kind` (FAILED includes devices that never answered)."""
        n = sum(1 for c in self.checked if c.kind is kind)
        return n + self.missing if kind is ReplyKind.FAILED else n

    @property
    def missing(self) -> int:
        """Sampled devices without any reply by the timeout."""
        return max(0, self.sampled - len(self.checked))

    @property
    def answered(self) -> int:
        """Replies with content: valid + refused + empty + rejected."""
        return sum(1 for c in self.checked if c.kind is not ReplyKind.FAILED)

    @property
    def valid_messages(self) -> list[Message]:
        """The replies to aggregate."""
        return [c.message for c in self.checked if c.kind is ReplyKind.VALID and c.message is not None]

    @property
    def train_loss(self) -> float | None:
        """Example-weighted mean training loss over the valid replies (None without any)."""
        valid = [c for c in self.checked if c.kind is ReplyKind.VALID]
        total = sum(c.num_examples or 0.0 for c in valid)
        if not valid or total <= 0:
            return None
        return sum((c.num_examples or 0.0) * (c.train_loss or 0.0) for c in valid) / total

    @property
    def epsilons(self) -> dict[int, float]:
        """Epsilon per device that replied in form (valid, refused or empty); may be inf."""
        trusted = (ReplyKind.VALID, ReplyKind.REFUSED, ReplyKind.EMPTY)
        return {c.node_id: c.epsilon for c in self.checked if c.kind in trusted and c.epsilon is not None}


def classify_replies(sampled: int, replies: Iterable[Message], spec: ArraySpec, bound: UpdateBound | None = None) -> RoundReplies:
    """Check every reply of a round that sent `sampled` train messages."""
    result = RoundReplies(sampled=sampled)
    for msg in replies:
        result.checked.append(check_train_reply(msg, spec, bound))
    return result
