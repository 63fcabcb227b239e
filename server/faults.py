"""Simulated device faults: which sampled devices of a round misbehave, and the mark that tells them.

With run-config `fault-fraction` f > 0, each round the server picks round(f * sampled)
of the sampled devices, deterministically from (seed, round), and sends them a train
config carrying SIMULATED_FAULT = fault-mode. A simulated ClientApp then raises
("fail") or stalls past round-timeout ("timeout"); a real device ignores the mark
(client/faults.py). The rest of the round goes on as usual: the faulty devices count
as failed, the others are aggregated when at least `min-replies` are valid.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from flwr.app import ConfigRecord, Message, RecordDict

from fedinterest.common.wire import ARRAYS, CONFIG, SIMULATED_FAULT


def pick_faulty(node_ids: Sequence[int], fraction: float, seed: int, server_round: int) -> list[int]:
    """The round's faulty devices: round(fraction * len(node_ids)) of them, the same for the same (seed, round)."""
    count = round(fraction * len(node_ids))
    if count <= 0:
        return []
    # A generator of its own: the node sampler's global `random` state must not shift.
    rng = random.Random(f"fedinterest-faults/{seed}/{server_round}")
    return sorted(rng.sample(sorted(node_ids), count))


def mark_faults(messages: Sequence[Message], faulty: Sequence[int], mode: str) -> list[Message]:
    """`messages` with those to `faulty` nodes replaced by copies whose train config carries the mark.

    Flower's strategies send one shared RecordDict to every node, so a marked message
    gets its own RecordDict and ConfigRecord (the ArrayRecord is shared, never written).
    """
    targets = set(faulty)
    marked = []
    for message in messages:
        node = message.metadata.dst_node_id
        if node not in targets:
            marked.append(message)
            continue
        config = ConfigRecord({**dict(message.content.config_records[CONFIG]), SIMULATED_FAULT: mode})
        content = RecordDict({ARRAYS: message.content[ARRAYS], CONFIG: config})
        marked.append(Message(content=content, message_type=message.metadata.message_type, dst_node_id=node))
    return marked
