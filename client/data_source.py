"""Where a device's data and privacy ledger come from, given its Flower node config.

In simulation a virtual node gets only `partition-id` and `num-partitions`: partition
`i` is user `LeaveOneOut.users[i]` of the run's dataset. One simulation process serves
many virtual devices, so the loaded split is cached per process, keyed by the frozen
`DatasetSpec`. A real device will name its own store with `history-db` (a later issue).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from fedinterest.common.datasets import DatasetSpec, load_split
from fedinterest.common.run_config import RunConfig
from fedinterest.common.split import LeaveOneOut, UserSplit

# Node-config keys.
PARTITION_ID = "partition-id"  # set by Flower's simulation engine
HISTORY_DB = "history-db"  # a real device's store (deployment; not supported yet)


@dataclass(frozen=True)
class DeviceData:
    """One device's user, the catalogue size its model needs, and where its ledger lives."""

    user: UserSplit
    num_items: int
    ledger_path: Path | None  # None: keep the ledger in the node's Context.state (simulation only)


@lru_cache(maxsize=4)
def _cached_split(spec: DatasetSpec) -> LeaveOneOut:
    return load_split(spec)


def load_device_data(node_config: Mapping[str, object], run: RunConfig) -> DeviceData:
    """The device's data as its node config names it; ValueError when the config does not."""
    if HISTORY_DB in node_config:
        raise ValueError(
            f"node config {HISTORY_DB!r} (an on-device history store) is not supported yet; "
            f"this version only runs in simulation, where the node config has {PARTITION_ID!r}"
        )
    if PARTITION_ID not in node_config:
        raise ValueError(
            f"node config needs {PARTITION_ID!r} (simulation) or {HISTORY_DB!r} (device); "
            f"it has {sorted(node_config)}"
        )
    partition = node_config[PARTITION_ID]
    if not isinstance(partition, int) or isinstance(partition, bool):
        raise ValueError(f"node config {PARTITION_ID!r} must be an integer, got {partition!r}")
    split = _cached_split(run.dataset_spec())
    if not 0 <= partition < len(split.users):
        raise ValueError(
            f"partition-id {partition} is out of range: dataset {run.dataset_spec().label!r} has "
            f"{len(split.users)} users with a leave-one-out split (partitions 0..{len(split.users) - 1}); "
            "run the simulation with at most that many supernodes"
        )
    return DeviceData(user=split.users[partition], num_items=split.num_items, ledger_path=simulation_ledger_path(run.run_dir, partition))


def simulation_ledger_path(run_dir: str, partition_id: int) -> Path | None:
    """`{run_dir}/devices/partition-{id}.sqlite`, or None when the run has no directory."""
    return Path(run_dir) / "devices" / f"partition-{partition_id}.sqlite" if run_dir else None
