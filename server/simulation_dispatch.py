"""A per-node index of pending messages for Flower 1.41's in-memory SuperLink state.

Flower's simulation engine (`flwr/server/superlink/fleet/vce/vce_api.py`,
`add_messages_to_queue`) polls every virtual node in turn, every 0.1 s, with
`InMemoryLinkState.get_message_ins(node_id, limit=1)`. That method validates every
stored message (expiry, federation) before it looks at the message's destination, so
one pass costs nodes x messages-in-flight validations, each under the state's lock. In
a simulation of one device per user this loop is most of the server process's CPU
(docs/simulations.md, "Offline and process notes", Dispatch) and it takes the cores the
devices should train on. An earlier version of this module kept Flower's scan but
skipped other nodes' messages early; it still read every stored message on every poll
(47% of the engine's samples at 2,999 nodes, docs/benchmarks.md).

`install` replaces two methods, on the simulation's in-memory state only:

- `store_message_ins` runs Flower's own, then adds the stored message's id to an index
  of ids by destination node (kept in the state, in the store's insertion order);
- `get_message_ins` reads only `node_id`'s entry of that index and runs Flower's own
  validation and delivery logic on those messages alone: a node with nothing pending
  costs a dictionary look-up. Ids whose message has left the store (reply pulled,
  expired, run stopped: Flower deletes in several places) are dropped from the index
  when their node is next polled, so deletion needs no hook.

It returns and marks delivered exactly what Flower's method would, in the same order.
The one difference: an expired message is deleted when its own node polls (every node is
polled every pass) rather than when any node does.

Only Flower 1.41.0, whose methods this mirrors, is patched; with any other version, or
with FEDINTEREST_FLOWER_DISPATCH=stock (to measure against Flower's own), nothing is;
with FEDINTEREST_FLOWER_DISPATCH=scan the earlier per-node scan is installed instead (kept
only so that benchmarks/cohort_speed.py can measure this index against it).
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
SWITCH = "FEDINTEREST_FLOWER_DISPATCH"  # "stock" keeps Flower's methods, "scan" the earlier lookup
FLOWER_STORE_MESSAGE_INS = InMemoryLinkState.store_message_ins
_INDEX = "_fedinterest_ids_by_node"  # the state's attribute holding the index

IdsByNode = dict[int, dict[str, None]]  # node id -> ids of its stored messages, oldest first (a dict keeps the order)


def _index(state: InMemoryLinkState) -> IdsByNode:
    """The state's index, built from what is stored the first time it is needed (call under the lock)."""
    index = state.__dict__.get(_INDEX)
    if index is None:
        index = {}
        for msg_id, msg in state.message_ins_store.items():
            index.setdefault(msg.metadata.dst_node_id, {})[msg_id] = None
        state.__dict__[_INDEX] = index
    return index


def store_message_ins_indexed(self: InMemoryLinkState, message: Message) -> str | None:
    """Flower 1.41's `store_message_ins`, then the stored message's id added to its node's index."""
    with self.lock:  # re-entrant: Flower's method takes it again
        stored_before = message.metadata.message_id in self.message_ins_store  # then Flower stores nothing new
        message_id = FLOWER_STORE_MESSAGE_INS(self, message)
        index = self.__dict__.get(_INDEX)
        if index is not None and message_id is not None and not stored_before and message_id in self.message_ins_store:
            ids = index.setdefault(self.message_ins_store[message_id].metadata.dst_node_id, {})
            ids.pop(message_id, None)  # stored again after a deletion: it is now the newest, as in the store
            ids[message_id] = None
    return message_id


def get_message_ins_for_node(
    self: InMemoryLinkState, node_id: int, limit: int | None, *, run_id: int | None = None
) -> list[Message]:
    """Flower 1.41's `InMemoryLinkState.get_message_ins`, reading only `node_id`'s messages."""
    if limit is not None and limit < 1:
        raise AssertionError("`limit` must be >= 1")
    message_ins_list: list[Message] = []
    with self.lock:
        index = _index(self)
        ids = index.get(node_id)
        if not ids:
            return message_ins_list  # nothing to mark delivered
        for msg_id in list(ids):
            self._check_stored_messages({msg_id})  # Flower's expiry and federation checks, as before
            msg_ins = self.message_ins_store.get(msg_id)
            if msg_ins is None or msg_ins.metadata.dst_node_id != node_id:
                del ids[msg_id]  # deleted since it was stored
                continue
            if (run_id is None or msg_ins.metadata.run_id == run_id) and msg_ins.metadata.delivered_at == "":
                message_ins_list.append(msg_ins)
            if limit and len(message_ins_list) == limit:
                break
        if not ids:
            del index[node_id]
    if message_ins_list:
        delivered_at = now().isoformat()
        for msg_ins in message_ins_list:
            msg_ins.metadata.delivered_at = delivered_at
    return message_ins_list


def get_message_ins_scanning(
    self: InMemoryLinkState, node_id: int, limit: int | None, *, run_id: int | None = None
) -> list[Message]:
    """The earlier lookup: Flower's scan of every stored message, validating only `node_id`'s."""
    if limit is not None and limit < 1:
        raise AssertionError("`limit` must be >= 1")
    message_ins_list: list[Message] = []
    with self.lock:
        addressed = [msg_id for msg_id, msg in self.message_ins_store.items() if msg.metadata.dst_node_id == node_id]
        for msg_id in addressed:
            self._check_stored_messages({msg_id})
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
    """Patch the in-memory state's store and lookup (see the module docstring); True if they now are."""
    if os.environ.get(SWITCH) == "stock":
        LOG.info("fedinterest: %s=stock, Flower's own message lookup kept", SWITCH)
        return False
    if flwr.__version__ != PATCHED_FLOWER:
        LOG.info("fedinterest: Flower %s is not %s, its own message lookup kept", flwr.__version__, PATCHED_FLOWER)
        return False
    if os.environ.get(SWITCH) == "scan":
        InMemoryLinkState.get_message_ins = get_message_ins_scanning  # type: ignore[method-assign]  # the patch itself
        LOG.info("fedinterest: %s=scan, the earlier per-node message scan installed", SWITCH)
        return True
    InMemoryLinkState.store_message_ins = store_message_ins_indexed  # type: ignore[method-assign]  # the patch itself
    InMemoryLinkState.get_message_ins = get_message_ins_for_node  # type: ignore[method-assign]
    LOG.info("fedinterest: per-node message index installed on the simulation's link state (server/simulation_dispatch.py)")
    return True
