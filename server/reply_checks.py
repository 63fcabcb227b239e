"""Checks on what devices send back: every train reply is classified before anything
is aggregated.

A reply speaks for the users of its node that the round sampled (one on a real device,
several on a simulated node holding a shard; server/cohort.py). A reply is exactly one of
- failed   -- an error reply (`msg.has_error()`); devices that did not answer before the
              round's timeout are counted as failed by the round loop;
- rejected -- malformed: records other than one MetricRecord under METRICS (plus, for a
              trained update, one ArrayRecord under ARRAYS), metric keys other than
              exactly TRAIN_REPLY_METRICS (plus SHARED_TRAIN_METRICS from a device
              that shares them: run-config share-metrics), non-numeric or out-of-range values (user
              counts beyond the users sampled, an EPSILON list not one per sampled
              user), arrays whose keys, shapes or dtypes differ from the global model's,
              non-finite weights or loss, or -- with an UpdateBound (run-config
              max-update-norm) -- an update whose L2 norm against the global weights sent
              exceeds it. Rejected replies are counted and never aggregated, and nothing
              they report (not even epsilon) is trusted;
- in form  -- valid when NUM_USERS > 0 (aggregated, weighted by NUM_EXAMPLES); else
              refused (every sampled user declined: privacy budget) or empty (nothing
              to train on).
Counts are of users: a valid reply of a shard may also hold refused and empty users.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedinterest.common.errors import FedinterestError
from fedinterest.common.wire import (
    ARRAYS,
    EPSILON,
    METRICS,
    NUM_EXAMPLES,
    NUM_USERS,
    REFUSED,
    SHARED_TRAIN_METRICS,
    TRAIN_LOSS,
    TRAIN_REPLY_METRICS,
    UNCLIPPED_USERS,
)


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
    """One classified reply for `users` sampled users. The numbers are None / empty when failed or rejected."""

    kind: ReplyKind
    node_id: int
    reason: str = ""
    users: int = 1  # the node's users sampled this round
    trained: int = 0  # users whose updates the arrays combine
    refused: int = 0  # users that declined
    num_examples: float | None = None
    train_loss: float | None = None  # only from a device that shares it (run-config share-metrics)
    epsilons: tuple[float, ...] = ()  # one per sampled user, in the order the server named them
    unclipped: int | None = None  # under adaptive clipping: trained users whose update norm was <= the round's clip
    message: Message | None = None  # valid replies only: arrays in the global model's key order

    @property
    def epsilon(self) -> float | None:
        """The largest epsilon the reply reported (None when it reported none)."""
        return max(self.epsilons) if self.epsilons else None


class MalformedReply(FedinterestError, ValueError):
    """A reply that breaks the wire contract (common/wire.py)."""


def check_train_reply(msg: Message, spec: ArraySpec, bound: UpdateBound | None = None, users: int = 1) -> CheckedReply:
    """Classify one train reply for `users` sampled users against the global model's `spec` (and the update `bound`)."""
    node = int(msg.metadata.src_node_id)
    if msg.has_error():
        return CheckedReply(ReplyKind.FAILED, node, reason=f"error {msg.error.code}: {msg.error.reason}", users=users)
    try:
        return _check_content(msg, node, spec, bound, users)
    except MalformedReply as exc:
        return CheckedReply(ReplyKind.REJECTED, node, reason=str(exc), users=users)


def _check_content(msg: Message, node: int, spec: ArraySpec, bound: UpdateBound | None, users: int) -> CheckedReply:
    content = msg.content
    metrics, epsilons = _metrics(content, users)
    # _metrics checked that the reply holds exactly TRAIN_REPLY_METRICS: only the shared loss and unclipped may be missing.
    num_examples, trained, refused = metrics[NUM_EXAMPLES], metrics[NUM_USERS], metrics[REFUSED]
    loss, unclipped = metrics.get(TRAIN_LOSS), metrics.get(UNCLIPPED_USERS)
    has_arrays = ARRAYS in content.array_records
    if unclipped is not None and unclipped > trained:
        raise MalformedReply(f"{UNCLIPPED_USERS} {unclipped:g} exceeds {NUM_USERS} {int(trained)}")
    common: dict[str, Any] = dict(
        users=users, trained=int(trained), refused=int(refused), num_examples=num_examples, epsilons=epsilons,
        unclipped=int(unclipped) if unclipped is not None else None,
    )
    if trained == 0:
        if has_arrays and refused == users:
            raise MalformedReply("a refused reply must not carry arrays")
        # Arrays beside no trained user (a device with nothing to train on) are ignored.
        kind = ReplyKind.REFUSED if refused == users else ReplyKind.EMPTY
        return CheckedReply(kind, node, **common)
    if not has_arrays:
        raise MalformedReply(f"{NUM_USERS} is {int(trained)} but the reply carries no arrays")
    if num_examples < trained:
        raise MalformedReply(f"{NUM_EXAMPLES} {num_examples:g} is below {NUM_USERS} {int(trained)}: a trained user has a window")
    if loss is not None and not math.isfinite(loss):
        raise MalformedReply(f"{TRAIN_LOSS} is {loss} for a trained update")
    ordered = _checked_arrays(content.array_records[ARRAYS], spec)
    if bound is not None:
        norm = bound.norm(ordered)
        if not norm <= bound.max_norm:  # also catches an overflow to inf
            raise MalformedReply(f"update norm {norm:.4g} exceeds max-update-norm {bound.max_norm:g}")
    # What the strategy aggregates: the arrays in the global model's key order (FedAvgM pairs
    # arrays by position) and the weight; the round loop keeps the other metrics itself.
    msg.content = RecordDict({ARRAYS: ordered, METRICS: MetricRecord({NUM_EXAMPLES: num_examples})})
    return CheckedReply(ReplyKind.VALID, node, train_loss=loss, message=msg, **common)


def _metrics(content: RecordDict, users: int) -> tuple[dict[str, float], tuple[float, ...]]:
    """The reply's train metrics, checked: exactly TRAIN_REPLY_METRICS (and maybe the shared ones), in range; and the epsilons."""
    others = set(content.keys()) - {ARRAYS, METRICS}
    if others:
        raise MalformedReply(f"unexpected records {sorted(others)}")
    if set(content.metric_records) != {METRICS}:
        raise MalformedReply(f"expected one MetricRecord under {METRICS!r}, got {sorted(content.metric_records)}")
    if ARRAYS in content and ARRAYS not in content.array_records:
        raise MalformedReply(f"record {ARRAYS!r} is not an ArrayRecord")
    record = content.metric_records[METRICS]
    # UNCLIPPED_USERS comes only under adaptive clipping; the others as the wire says.
    if set(record.keys()) - {UNCLIPPED_USERS} not in (set(TRAIN_REPLY_METRICS), set(TRAIN_REPLY_METRICS + SHARED_TRAIN_METRICS)):
        raise MalformedReply(
            f"metric keys {sorted(record.keys())} are not exactly {sorted(TRAIN_REPLY_METRICS)} "
            f"(or with {sorted(SHARED_TRAIN_METRICS)}, and {UNCLIPPED_USERS!r} under adaptive clipping)"
        )
    values = {}
    for key in (NUM_EXAMPLES, NUM_USERS, TRAIN_LOSS, REFUSED, UNCLIPPED_USERS):
        if key not in record:  # a shared metric the device did not send
            continue
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MalformedReply(f"metric {key!r} must be a number, got {value!r}")
        values[key] = float(value)
    for key in (NUM_EXAMPLES, NUM_USERS, REFUSED, UNCLIPPED_USERS):
        if key not in values:
            continue
        n = values[key]
        if not (math.isfinite(n) and n >= 0 and n == int(n)):
            raise MalformedReply(f"{key} must be a whole number >= 0, got {n}")
    if values[NUM_USERS] + values[REFUSED] > users:
        raise MalformedReply(f"{NUM_USERS} {values[NUM_USERS]:g} and {REFUSED} {values[REFUSED]:g} exceed the {users} user(s) sampled")
    epsilons = record[EPSILON]
    if not isinstance(epsilons, list) or len(epsilons) != users:
        raise MalformedReply(f"{EPSILON} must be a list of one number per sampled user ({users}), got {epsilons!r}")
    for eps in epsilons:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or math.isnan(eps) or eps < 0:
            raise MalformedReply(f"{EPSILON} values must be >= 0 (inf when DP is off), got {eps!r}")
    return values, tuple(float(e) for e in epsilons)


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
    """Every reply of one round, classified, and what the round's metrics row needs (counts of users)."""

    sampled: int  # users sampled
    checked: list[CheckedReply] = field(default_factory=list)

    def count(self, kind: ReplyKind) -> int:
        """How many sampled users were of `kind` (FAILED includes the users of nodes that never answered)."""
        if kind is ReplyKind.FAILED:
            return sum(c.users for c in self.checked if c.kind is kind) + self.missing
        if kind is ReplyKind.REJECTED:
            return sum(c.users for c in self.checked if c.kind is kind)
        in_form = [c for c in self.checked if c.kind in _IN_FORM]
        if kind is ReplyKind.VALID:
            return sum(c.trained for c in in_form)
        if kind is ReplyKind.REFUSED:
            return sum(c.refused for c in in_form)
        return sum(c.users - c.trained - c.refused for c in in_form)

    @property
    def missing(self) -> int:
        """Sampled users whose node sent no reply by the timeout."""
        return max(0, self.sampled - sum(c.users for c in self.checked))

    @property
    def answered(self) -> int:
        """Users of replies with content: valid + refused + empty + rejected."""
        return sum(c.users for c in self.checked if c.kind is not ReplyKind.FAILED)

    @property
    def valid(self) -> list[CheckedReply]:
        """The replies to aggregate."""
        return [c for c in self.checked if c.kind is ReplyKind.VALID and c.message is not None]

    @property
    def valid_messages(self) -> list[Message]:
        """The messages to aggregate."""
        return [c.message for c in self.valid if c.message is not None]

    @property
    def train_loss(self) -> float | None:
        """Weighted mean training loss over the valid replies that shared one (None without any)."""
        shared = [c for c in self.valid if c.train_loss is not None]
        total = sum(c.num_examples or 0.0 for c in shared)
        if not shared or total <= 0:
            return None
        return sum((c.num_examples or 0.0) * c.train_loss for c in shared if c.train_loss is not None) / total

    @property
    def epsilons(self) -> dict[tuple[int, int], float]:
        """Epsilon per (node, i-th sampled user of it) that replied in form; may be inf."""
        return {(c.node_id, i): e for c in self.checked if c.kind in _IN_FORM for i, e in enumerate(c.epsilons)}


_IN_FORM = (ReplyKind.VALID, ReplyKind.REFUSED, ReplyKind.EMPTY)


def classify_replies(
    sampled: int | Mapping[int, int], replies: Iterable[Message], spec: ArraySpec, bound: UpdateBound | None = None
) -> RoundReplies:
    """Check every reply of a round; `sampled` maps each node messaged to its users sampled (an int: nodes of one user)."""
    users = dict(sampled) if isinstance(sampled, Mapping) else {}
    # An empty Mapping is a round whose Poisson sample drew no user: 0 sampled, not int({}).
    result = RoundReplies(sampled=sum(users.values()) if isinstance(sampled, Mapping) else int(sampled))
    for msg in replies:
        result.checked.append(check_train_reply(msg, spec, bound, users.get(int(msg.metadata.src_node_id), 1)))
    return result


def check_masked_reply(msg: Message, users: int = 1) -> CheckedReply:
    """Classify a secure round's masked-vector reply by its train metrics alone (server/secure_rounds.py).

    Its update is masked and summed by Flower's SecAgg+, never seen here, so no array is
    checked and `message` stays None: a reply in form is valid when it trained a user.
    """
    node = int(msg.metadata.src_node_id)
    if msg.has_error():
        return CheckedReply(ReplyKind.FAILED, node, reason=f"error {msg.error.code}: {msg.error.reason}", users=users)
    record = msg.content.metric_records.get(METRICS)
    try:
        if record is None:
            raise MalformedReply(f"expected a MetricRecord under {METRICS!r} beside the masked vector")
        metrics, epsilons = _metrics(RecordDict({METRICS: record}), users)
    except MalformedReply as exc:
        return CheckedReply(ReplyKind.REJECTED, node, reason=str(exc), users=users)
    trained, refused = int(metrics[NUM_USERS]), int(metrics[REFUSED])
    kind = ReplyKind.VALID if trained > 0 else ReplyKind.REFUSED if refused == users else ReplyKind.EMPTY
    return CheckedReply(
        kind, node, users=users, trained=trained, refused=refused, num_examples=metrics[NUM_EXAMPLES],
        train_loss=metrics.get(TRAIN_LOSS), epsilons=epsilons,
    )
