"""A Flower Grid whose nodes are fedinterest's real ClientApp, called in this process.

For tests and the secure-aggregation benchmark: the ServerApp's round code and Flower's
workflows run unchanged on it, each node keeps its own Context (its state persists
between messages, as a SuperNode's does; Flower's SecAgg+ mod keeps its keys there),
and every message crosses as Flower would send it: serialized to its protobuf and back
(so no object is shared between nodes, and `traffic` counts the bytes on the wire). An
exception in the ClientApp becomes an error reply, as in Flower's runtime. What it does
not model: the network, concurrency (nodes answer one after another), and time-outs;
`drop(stage, node_id)` makes a node fall silent instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

PLAIN_STAGE = "plain"
CLIENT_APP_RAISED_EXCEPTION = 2  # Flower's ErrorCode for a handler that raised


@dataclass
class Traffic:
    """Messages and protobuf bytes each way, by protocol stage ("plain" outside SecAgg+)."""

    messages: dict[str, int] = field(default_factory=dict)
    bytes_to_nodes: dict[str, int] = field(default_factory=dict)
    bytes_from_nodes: dict[str, int] = field(default_factory=dict)
    node_seconds: float = 0.0  # time spent inside the ClientApp (all nodes, one after another)

    def add(self, stage: str, sent: int, received: int | None) -> None:
        self.messages[stage] = self.messages.get(stage, 0) + 1 + (received is not None)
        self.bytes_to_nodes[stage] = self.bytes_to_nodes.get(stage, 0) + sent
        self.bytes_from_nodes[stage] = self.bytes_from_nodes.get(stage, 0) + (received or 0)

    def totals(self) -> dict[str, int]:
        """Messages and bytes over every stage."""
        return {"messages": sum(self.messages.values()), "bytes_to_nodes": sum(self.bytes_to_nodes.values()), "bytes_from_nodes": sum(self.bytes_from_nodes.values())}


def stage_of(message: Message) -> str:
    """The SecAgg+ stage an instruction belongs to, or "plain"."""
    if message.has_content() and RECORD_KEY_CONFIGS in message.content.config_records:
        return str(message.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, PLAIN_STAGE))
    return PLAIN_STAGE


class InProcessGrid(Grid):
    """A Grid of `contexts` (node id -> Context), each answered by `app` in this process."""

    def __init__(
        self, app: ClientApp, contexts: dict[int, Context], drop: Callable[[str, int], bool] | None = None, *, keep_replies: bool = True,
    ) -> None:
        self.app, self.contexts, self.keep_replies = app, contexts, keep_replies
        self.drop = drop or (lambda stage, node_id: False)
        self.traffic = Traffic()
        self.replies: list[Message] = []  # every reply the server received, as it received it (keep_replies)

    def set_run(self, run):  # pragma: no cover - the round code never calls it
        self._run = run

    @property
    def run(self):  # pragma: no cover
        return getattr(self, "_run", None)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages):  # pragma: no cover - send_and_receive is the only path used
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            node_id, stage = message.metadata.dst_node_id, stage_of(message)
            message.metadata.__dict__["_message_id"] = str(uuid4())  # as Grid.push_messages does
            wire_in = message_to_proto(message)
            if self.drop(stage, node_id):
                self.traffic.add(stage, wire_in.ByteSize(), None)
                continue
            delivered = message_from_proto(wire_in)
            started = time.perf_counter()
            try:
                reply = self.app(delivered, self.contexts[node_id])
            except Exception as exc:  # noqa: BLE001 -- Flower's runtime turns any handler exception into an error reply
                reply = Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc)}:<'{exc}'>"), reply_to=delivered)
            self.traffic.node_seconds += time.perf_counter() - started
            wire_out = message_to_proto(reply)
            self.traffic.add(stage, wire_in.ByteSize(), wire_out.ByteSize())
            received = message_from_proto(wire_out)
            if self.keep_replies:
                self.replies.append(received)
            replies.append(received)
        return replies


def node_contexts(run_config: dict, partitions: int, *, first_node_id: int = 101, run_id: int = 7) -> dict[int, Context]:
    """One simulated node per partition (node config partition-id / num-partitions), with a fresh state."""
    return {
        first_node_id + p: Context(
            run_id=run_id, node_id=first_node_id + p, node_config={"partition-id": p, "num-partitions": partitions},
            state=RecordDict(), run_config=dict(run_config),
        )
        for p in range(partitions)
    }


@contextmanager
def server_task(run_id: int = 7) -> Iterator[None]:
    """Play the ServerApp's task: Flower stamps every new Message with the running task's ids."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
