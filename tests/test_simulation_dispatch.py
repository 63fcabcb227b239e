"""The per-node message index gives what Flower 1.41's own lookup does, on Flower's real in-memory state."""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Iterator

import pytest
from flwr.app import Message, RecordDict
from flwr.common.constant import HEARTBEAT_INTERVAL_INF, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID, SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fedinterest.server import simulation_dispatch

STOCK = InMemoryLinkState.get_message_ins


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Flower's process-wide task identity, which building a Message needs, restored afterwards;
    messages stored through the indexing `store_message_ins`, as `install` arranges (a state
    that never used the index is not affected by it)."""
    monkeypatch.setattr(InMemoryLinkState, "store_message_ins", simulation_dispatch.store_message_ins_indexed)
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def _federation(num_nodes: int) -> tuple[InMemoryLinkState, InMemoryGrid, list[int], int]:
    """A simulation's SuperLink state as Flower builds it: nodes, one run, the ServerApp's grid."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    nodes = []
    for _ in range(num_nodes):
        node = state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, secrets.token_bytes(32), heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        state.acknowledge_node_heartbeat(node_id=node, heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        nodes.append(node)
    run_id = state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, NOOP_FLWR_AID, "train")
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, SUPERLINK_NODE_ID
    grid = InMemoryGrid(factory)
    grid.set_run(state.get_run_info(run_ids=[run_id])[0])
    return state, grid, nodes, run_id


def _push(grid: InMemoryGrid, nodes: list[int], destinations: list[int], ttl: float | None = None, first: int = 0) -> list[str]:
    """One message to nodes[i] for each i in `destinations`, its type naming its position; their ids."""
    messages = []
    for position, index in enumerate(destinations, start=first):
        extra = {} if ttl is None else {"ttl": ttl}
        messages.append(Message(RecordDict(), dst_node_id=nodes[index], message_type=f"train.m{position}", **extra))
    ids = list(grid.push_messages(messages))
    assert len(ids) == len(destinations)
    return ids


def _poll_all(state: InMemoryLinkState, nodes: list[int], lookup, run_id: int | None) -> list[list[tuple[int, str]]]:
    """The engine's pass (limit 1 per node), then what each node still has (no limit), as (node, type)."""
    seen = []
    for limit in (1, 1, None):
        for index, node in enumerate(nodes):
            got = lookup(state, node, limit, run_id=run_id)
            seen.append([(index, m.metadata.message_type) for m in got])
    return seen


def test_returns_and_delivers_what_flowers_lookup_does(task_identity: None) -> None:
    destinations = [0, 2, 2, 5, 0, 0, 7, 3, 2]  # several messages for some nodes, none for others
    results = []
    for lookup in (STOCK, simulation_dispatch.get_message_ins_for_node):
        state, grid, nodes, run_id = _federation(8)
        _push(grid, nodes, destinations)
        results.append(_poll_all(state, nodes, lookup, run_id))
        # Every message was handed out once and is marked delivered.
        assert all(m.metadata.delivered_at != "" for m in state.message_ins_store.values())
    stock, patched = results
    assert patched == stock
    assert sorted(pair for batch in patched for pair in batch) == sorted((d, f"train.m{i}") for i, d in enumerate(destinations))


def test_matches_flowers_lookup_through_stores_polls_and_deletions(task_identity: None) -> None:
    """A random interleaving of pushes, polls (any limit, run filter) and deletions, on two states."""
    logs = []
    for lookup in (STOCK, simulation_dispatch.get_message_ins_for_node):
        rng = random.Random(11)
        state, grid, nodes, run_id = _federation(6)
        log, pushed, ids = [], 0, []
        for _ in range(300):
            action = rng.random()
            if action < 0.3:
                destinations = [rng.randrange(6) for _ in range(rng.randint(1, 4))]
                ids += _push(grid, nodes, destinations, first=pushed)
                pushed += len(destinations)
            elif action < 0.4 and ids:
                state.delete_messages({ids.pop(rng.randrange(len(ids)))})  # a reply pulled, or expired
            else:
                node, limit = rng.randrange(6), rng.choice([1, 1, 2, None])
                got = lookup(state, nodes[node], limit, run_id=rng.choice([run_id, run_id, None, run_id + 1]))
                log.append((node, [m.metadata.message_type for m in got]))
        logs.append(log)
    stock, indexed = logs
    assert indexed == stock
    assert sum(len(types) for _, types in stock) > 50  # the interleaving did deliver


class _CountingStore(dict):
    """A message store that counts how often it is read whole."""

    reads = 0

    def items(self):  # noqa: ANN201
        type(self).reads += 1
        return super().items()

    def keys(self):  # noqa: ANN201
        type(self).reads += 1
        return super().keys()

    def __iter__(self):  # noqa: ANN204
        type(self).reads += 1
        return super().__iter__()


def test_a_poll_reads_only_its_own_nodes_messages(task_identity: None) -> None:
    """After the index is built, no poll reads the whole store (the scan it replaces read it every time)."""
    state, grid, nodes, run_id = _federation(50)
    state.message_ins_store = _CountingStore(state.message_ins_store)
    _push(grid, nodes, [i % 50 for i in range(200)])
    lookup = simulation_dispatch.get_message_ins_for_node
    assert lookup(state, nodes[0], 1, run_id=run_id) != []  # builds the index: one read of the store
    _CountingStore.reads = 0
    _push(grid, nodes, [3, 7])
    for _ in range(5):  # nodes 3 and 7 have five messages each, the others four
        for node in nodes:
            lookup(state, node, 1, run_id=run_id)
    assert _CountingStore.reads == 0
    assert all(m.metadata.delivered_at != "" for m in state.message_ins_store.values())


def test_respects_the_run_filter_and_the_limit(task_identity: None) -> None:
    state, grid, nodes, run_id = _federation(3)
    _push(grid, nodes, [1, 1, 1])
    lookup = simulation_dispatch.get_message_ins_for_node
    assert lookup(state, nodes[1], 1, run_id=run_id + 1) == []
    assert len(lookup(state, nodes[1], 2, run_id=run_id)) == 2
    assert len(lookup(state, nodes[1], None)) == 1
    assert lookup(state, nodes[1], None) == []
    with pytest.raises(AssertionError, match="limit"):
        lookup(state, nodes[1], 0)


def test_drops_an_expired_message_when_its_node_polls(task_identity: None) -> None:
    state, grid, nodes, run_id = _federation(2)
    _push(grid, nodes, [0], ttl=0.05)
    _push(grid, nodes, [1])
    time.sleep(0.1)
    lookup = simulation_dispatch.get_message_ins_for_node
    assert lookup(state, nodes[1], 1, run_id=run_id) != []
    assert len(state.message_ins_store) == 2  # node 0's expired message waits for node 0's poll
    assert lookup(state, nodes[0], 1, run_id=run_id) == []
    assert len(state.message_ins_store) == 1


def test_install_patches_only_the_pinned_flower_and_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(InMemoryLinkState, "get_message_ins", STOCK)  # restored after the test
    monkeypatch.setenv(simulation_dispatch.SWITCH, "stock")
    assert simulation_dispatch.install() is False
    assert InMemoryLinkState.get_message_ins is STOCK
    monkeypatch.delenv(simulation_dispatch.SWITCH)
    monkeypatch.setattr(simulation_dispatch.flwr, "__version__", "1.99.0")
    assert simulation_dispatch.install() is False
    assert InMemoryLinkState.get_message_ins is STOCK
    monkeypatch.setattr(simulation_dispatch.flwr, "__version__", simulation_dispatch.PATCHED_FLOWER)
    monkeypatch.setattr(InMemoryLinkState, "store_message_ins", simulation_dispatch.FLOWER_STORE_MESSAGE_INS)
    assert simulation_dispatch.install() is True
    assert InMemoryLinkState.get_message_ins is simulation_dispatch.get_message_ins_for_node
    assert InMemoryLinkState.store_message_ins is simulation_dispatch.store_message_ins_indexed
