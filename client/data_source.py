"""Where a device's data and privacy ledger come from, given its Flower node config.

In simulation a virtual node gets only `partition-id` and `num-partitions`: partition
`i` holds users `i*k .. i*k + k - 1` of the run's dataset (`LeaveOneOut.users`), k =
run-config users-per-node (1 by default: partition i is user i), each trained as the
device it stands for. One simulation process serves many virtual nodes, so the loaded
split is cached per process, keyed by the frozen `DatasetSpec`.

A real device names its store with `history-db=PATH` (client/device_store.py): its
history is mapped to the store's catalogue (items outside it are kept in the store but
not used), split leave-one-out exactly as in simulation, and the privacy ledger lives in
the same SQLite file, so it survives a restart of the SuperNode.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from fedinterest.client.device_store import DeviceStore
from fedinterest.client.ledger import DEVICE_USER
from fedinterest.common.constants import MIN_INTERACTIONS_FOR_SPLIT
from fedinterest.common.datasets import DatasetSpec, load_split
from fedinterest.common.interactions import SequenceDataset
from fedinterest.common.run_config import RunConfig
from fedinterest.common.run_files import DEVICES_DIR
from fedinterest.common.split import LeaveOneOut, UserSplit, leave_one_out

LOG = logging.getLogger("flwr.fedinterest")

# Node-config keys.
PARTITION_ID = "partition-id"  # set by Flower's simulation engine
HISTORY_DB = "history-db"  # a real device's store file (deployment)


@dataclass(frozen=True)
class DeviceData:
    """The users a node stands for, the catalogue size its model needs, and where its ledger lives.

    A real device holds one user (`users` = (its user,), or (None,) while its history is
    too short to split: it then has no window and no held-out item); a simulated node holds a shard.
    """

    users: tuple[UserSplit | None, ...]
    num_items: int
    ledger_path: Path | None  # None: keep the ledger in the node's Context.state (simulation only)
    store_path: Path | None = None  # the device store (history-db mode), where received models are kept
    unknown_items: int = 0  # history rows whose item is not in the catalogue (kept in the store, not used)
    first_user: int = -1  # the dataset index of users[0] in simulation; -1 on a real device
    item_ids: tuple[str, ...] = ()  # the catalogue's item ids, item index i = item_ids[i - 1]

    @property
    def user(self) -> UserSplit | None:
        """The node's first user (a real device's only one)."""
        return self.users[0]

    def ledger_user(self, index: int) -> str:
        """The ledger account of users[index]: the device's own, or the user's dataset index."""
        return DEVICE_USER if self.first_user < 0 else str(self.first_user + index)


@lru_cache(maxsize=4)
def _cached_split(spec: DatasetSpec) -> LeaveOneOut:
    return load_split(spec)


def load_device_data(node_config: Mapping[str, object], run: RunConfig) -> DeviceData:
    """The device's data as its node config names it; ValueError when the config does not."""
    if HISTORY_DB in node_config:
        return load_store_data(node_config[HISTORY_DB], run)
    if PARTITION_ID not in node_config:
        raise ValueError(
            f"node config needs {PARTITION_ID!r} (simulation) or {HISTORY_DB!r} (device); "
            f"it has {sorted(node_config)}"
        )
    partition = node_config[PARTITION_ID]
    if not isinstance(partition, int) or isinstance(partition, bool):
        raise ValueError(f"node config {PARTITION_ID!r} must be an integer, got {partition!r}")
    split = _cached_split(run.dataset_spec())
    per_node = run.users_per_node
    nodes = -(-len(split.users) // per_node)
    if not 0 <= partition < nodes:
        raise ValueError(
            f"partition-id {partition} is out of range: dataset {run.dataset_spec().label!r} has "
            f"{len(split.users)} users with a leave-one-out split, {per_node} per node (partitions 0..{nodes - 1}); "
            "run the simulation with at most that many supernodes"
        )
    first = partition * per_node
    return DeviceData(
        users=tuple(split.users[first : first + per_node]), num_items=split.num_items,
        ledger_path=simulation_ledger_path(run.run_dir, partition), first_user=first, item_ids=split.dataset.item_ids,
    )


def load_store_data(path: object, run: RunConfig) -> DeviceData:
    """The user of the device store at `path`, split leave-one-out over the store's catalogue."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"node config {HISTORY_DB!r} must be the path of the device store file, got {path!r}")
    store_path = Path(path).expanduser()
    with DeviceStore(store_path) as store:
        catalogue = store.catalogue()
        history = store.history(catalogue)
        user_id = store.user_id() or ""
    if run.num_items and run.num_items != len(catalogue):
        raise ValueError(
            f"{store_path}: the device's catalogue has {len(catalogue)} items but the run's num-items is {run.num_items}; "
            "the device was initialised with another catalogue than the operator's"
        )
    # The same split function as simulation, so the evaluate handler sees the same protocol.
    dataset = SequenceDataset(name=str(store_path), user_ids=(user_id,), item_ids=catalogue.ids, sequences=(history.indices,))
    split = leave_one_out(dataset)
    if not split.users:
        # A new device with too little history: it takes part (with DP-SGD a noise-only
        # update, as any device without a window; no held-out item to rank) rather than
        # failing every message.
        LOG.info(
            "%s: %d interactions with catalogue items (%d with unknown items); leave-one-out needs at least %d: "
            "this device trains on no window and ranks nothing until more history is ingested",
            store_path, len(history.indices), history.unknown, MIN_INTERACTIONS_FOR_SPLIT,
        )
    return DeviceData(
        users=(split.users[0] if split.users else None,), num_items=len(catalogue), ledger_path=store_path, store_path=store_path,
        unknown_items=history.unknown, item_ids=tuple(catalogue.ids),
    )


def simulation_ledger_path(run_dir: str, partition_id: int) -> Path | None:
    """`{run_dir}/devices/partition-{id}.sqlite` (one account per user of the shard), or None when the run has no directory."""
    return Path(run_dir) / DEVICES_DIR / f"partition-{partition_id}.sqlite" if run_dir else None
