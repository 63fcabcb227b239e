"""Test helpers for code that plays Flower's ServerApp side without a running SuperLink."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from flwr.app import Message, MetricRecord, RecordDict
from flwr.server import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedinterest.common.wire import CONFIG, METRICS, QUERY_SHARD, SERVER_ROUND, SHARD_FIRST_USER, SHARD_SIZE


@contextmanager
def as_server_task() -> Iterator[None]:
    """Flower stamps instruction messages with the running task's ids; tests play the ServerApp."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class ScriptedGrid(Grid):
    """A Grid whose nodes are functions: message -> reply (or None for silence)."""

    def __init__(self, nodes: dict[int, Callable[[Message], Message | None]] | list[int]):
        # A list of node ids registers nodes that never answer (enough for configure_train).
        self.nodes = dict(nodes) if isinstance(nodes, dict) else {n: (lambda m: None) for n in nodes}
        self.sent: list[tuple[int, int]] = []  # (round, node)
        # Each node holds one user, in the order the nodes were given (the server asks: cohort.survey).
        self.shards = {node: (index, 1) for index, node in enumerate(self.nodes)}

    def set_run(self, run):  # pragma: no cover - not used
        pass

    @property
    def run(self):  # pragma: no cover - not used
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            if message.metadata.message_type == QUERY_SHARD:
                first, size = self.shards[node]
                replies.append(Message(RecordDict({METRICS: MetricRecord({SHARD_FIRST_USER: first, SHARD_SIZE: size})}), reply_to=message))
                continue
            self.sent.append((message.content[CONFIG].get(SERVER_ROUND, 0), node))
            reply = self.nodes[node](message)
            if reply is not None:
                replies.append(reply)
        return replies
