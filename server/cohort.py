"""The federation's users, the nodes that hold them, and the sample of users of a round.

The unit the server samples, clips and accounts for is a user. A node holds a shard of
users: a real device its own user, a simulated node a contiguous range of the dataset's
users (run-config users-per-node; client/data_source.py). Before round 1 of a simulation
the server asks every node which users it holds (`survey`, one QUERY_SHARD message per
node); in a deployment every registered node is one user (`of_devices`).

Users are ordered by their dataset index (simulation) or by node id (deployment), so a
seeded sample names the same users in every run of the same config, whatever node ids
Flower assigns. A round's sample of users is turned into one train message per node
that holds any of them, naming them in its config (SHARD_USERS, indices within the shard).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedinterest.common.wire import CONFIG, METRICS, QUERY_SHARD, SHARD_FIRST_USER, SHARD_SIZE, SHARD_USERS

LOG = logging.getLogger("flwr.fedinterest")


@dataclass(frozen=True)
class NodeShard:
    """The users one node holds: `size` users from dataset index `first_user` (-1: a device)."""

    node_id: int
    first_user: int
    size: int


class Cohort:
    """Every user of the federation in a fixed order, and the node that holds each."""

    def __init__(self, shards: Iterable[NodeShard]) -> None:
        self.shards = sorted(shards, key=lambda s: (s.first_user < 0, s.first_user, s.node_id))
        if not self.shards:
            raise ValueError("a cohort needs at least one node")
        known = [s for s in self.shards if s.first_user >= 0]
        for before, after in zip(known, known[1:]):
            if before.first_user + before.size > after.first_user:
                raise ValueError(f"nodes {before.node_id} and {after.node_id} both hold user {after.first_user}: shards overlap")
        self.starts = []  # position of each shard's first user in the cohort's order
        position = 0
        for shard in self.shards:
            self.starts.append(position)
            position += shard.size
        self.population = position
        self._by_node = {shard.node_id: index for index, shard in enumerate(self.shards)}

    @classmethod
    def of_devices(cls, node_ids: Iterable[int]) -> Cohort:
        """A deployment: every node is one device with one user."""
        return cls(NodeShard(int(node), -1, 1) for node in node_ids)

    def assign(self, users: Iterable[int]) -> dict[int, list[int]]:
        """Cohort positions of sampled users -> {node id: sorted indices within its shard}."""
        chosen: dict[int, list[int]] = {}
        for user in sorted(set(users)):
            if not 0 <= user < self.population:
                raise ValueError(f"user {user} is outside the cohort of {self.population}")
            index = bisect.bisect_right(self.starts, user) - 1
            chosen.setdefault(self.shards[index].node_id, []).append(user - self.starts[index])
        return chosen

    def rank(self, node_id: int) -> int:
        """The node's place in the cohort's order (replies are combined in this order)."""
        return self._by_node[node_id]

    def user_key(self, node_id: int, local: int) -> str:
        """A user's stable name in reports: its dataset index, or the node id of a device."""
        shard = self.shards[self._by_node[node_id]]
        return str(shard.first_user + local) if shard.first_user >= 0 else f"node-{node_id}"


def addressed(messages: list[Message], assignment: dict[int, list[int]]) -> list[Message]:
    """The strategy's train messages, each naming the sampled users of its node (order of the cohort kept)."""
    out = []
    for message in messages:
        node = message.metadata.dst_node_id
        content = message.content
        config = ConfigRecord({**dict(content.config_records[CONFIG]), SHARD_USERS: assignment[node]})
        records = {key: content[key] for key in content.keys() if key != CONFIG}
        out.append(Message(content=RecordDict({**records, CONFIG: config}), dst_node_id=node, message_type=message.metadata.message_type))
    return out


def survey(grid: Grid, node_ids: Iterable[int], *, timeout: float) -> Cohort:
    """Ask every node which users it holds; nodes that do not answer in form are left out (logged)."""
    nodes = sorted(int(n) for n in node_ids)
    messages = [Message(content=RecordDict({CONFIG: ConfigRecord()}), dst_node_id=n, message_type=QUERY_SHARD) for n in nodes]
    shards, problems = [], {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = int(reply.metadata.src_node_id)
        try:
            shards.append(_shard_of(node, reply))
        except ValueError as err:
            problems[node] = str(err)
    silent = len(nodes) - len(shards) - len(problems)
    if problems or silent:
        LOG.warning(
            "fedinterest: %d of %d nodes did not say which users they hold (%d silent; %s); they take no part",
            len(problems) + silent, len(nodes), silent, "; ".join(f"{n}: {p}" for n, p in sorted(problems.items())[:5]) or "-",
        )
    if not shards:
        raise RuntimeError(f"none of the {len(nodes)} nodes said which users it holds within {timeout:g} s")
    cohort = Cohort(shards)
    LOG.info("fedinterest: %d users on %d nodes (up to %d a node)", cohort.population, len(shards), max(s.size for s in shards))
    return cohort


def _shard_of(node: int, reply: Message) -> NodeShard:
    if reply.has_error():
        raise ValueError(f"error {reply.error.code}: {reply.error.reason}")
    metrics = reply.content.metric_records.get(METRICS)
    if metrics is None or set(metrics.keys()) != {SHARD_FIRST_USER, SHARD_SIZE}:
        raise ValueError(f"the reply needs exactly {SHARD_FIRST_USER!r} and {SHARD_SIZE!r} under {METRICS!r}")
    first, size = metrics[SHARD_FIRST_USER], metrics[SHARD_SIZE]
    if isinstance(first, bool) or not isinstance(first, int) or isinstance(size, bool) or not isinstance(size, int) or first < -1 or size < 1:
        raise ValueError(f"shard ({first!r}, {size!r}) is not a first user >= -1 and a size >= 1")
    return NodeShard(node, int(first), int(size))
