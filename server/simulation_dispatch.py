"""A per-node lookup of pending messages for Flower 1.41's in-memory SuperLink state.

Flower's simulation engine (`flwr/server/superlink/fleet/vce/vce_api.py`,
`add_messages_to_queue`) polls every virtual node in turn, every 0.1 s, with
`InMemoryLinkState.get_message_ins(node_id, limit=1)`. That method validates every
stored message (expiry, federation) before it looks at the message's destination, so
one pass costs nodes x messages-in-flight validations, each under the state's lock. In
a simulation of one device per user this loop is most of the server process's CPU
(docs/simulations.md, "Where a simulation's time goes") and it takes the cores the
devices should train on.

`install` replaces that one method, on the simulation's in-memory state only, with one
that first keeps the stored messages addressed to `node_id` (an attribute read each)
and runs Flower's own validation and delivery logic on those alone. It returns and
marks delivered exactly what Flower's method would. The difference: an expired message
is now deleted when its own node polls (every node is polled every pass) rather than
when any node does.

Only Flower 1.41.0, whose method this mirrors, is patched; with any other version, or
with FEDINTEREST_FLOWER_DISPATCH=stock (to measure against Flower's own), nothing is.
"""

from __future__ import annotations

import logging
import os

import flwr
from flwr.app import Message
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.date import now

LOG = logging.getLogger("flwr.fedinterest")
PATCHED_FLOWER = "1.41.0"
SWITCH = "FEDINTEREST_FLOWER_DISPATCH"  # "stock" keeps Flower's method


def get_message_ins_for_node(
    self: InMemoryLinkState, node_id: int, limit: int | None, *, run_id: int | None = None
) -> list[Message]:
    """Flower 1.41's `InMemoryLinkState.get_message_ins`, scanning only `node_id`'s messages."""
    if limit is not None and limit < 1:
        raise AssertionError("`limit` must be >= 1")
    message_ins_list: list[Message] = []
    with self.lock:
        addressed = [msg_id for msg_id, msg in self.message_ins_store.items() if msg.metadata.dst_node_id == node_id]
        for msg_id in addressed:
            self._check_stored_messages({msg_id})  # Flower's expiry and federation checks, as before
            msg_ins = self.message_ins_store.get(msg_id)
            if msg_ins and (run_id is None or msg_ins.metadata.run_id == run_id) and msg_ins.metadata.delivered_at == "":
                message_ins_list.append(msg_ins)
            if limit and len(message_ins_list) == limit:
                break
    delivered_at = now().isoformat()
    for msg_ins in message_ins_list:
        msg_ins.metadata.delivered_at = delivered_at
    return message_ins_list


def install() -> bool:
    """Patch the in-memory state's lookup (see the module docstring); True if it now is patched."""
    if os.environ.get(SWITCH) == "stock":
        LOG.info("fedinterest: %s=stock, Flower's own message lookup kept", SWITCH)
        return False
    if flwr.__version__ != PATCHED_FLOWER:
        LOG.info("fedinterest: Flower %s is not %s, its own message lookup kept", flwr.__version__, PATCHED_FLOWER)
        return False
    InMemoryLinkState.get_message_ins = get_message_ins_for_node
    LOG.info("fedinterest: per-node message lookup installed on the simulation's link state (server/simulation_dispatch.py)")
    return True
