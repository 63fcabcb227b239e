"""Small real inputs for the device tests: a catalogue, a device directory, a history file, a tiny run."""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import DEFAULT_TTL, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from fedinterest.client.data_source import HISTORY_DB
from fedinterest.client.device_dir import DeviceDir, init_device_dir
from fedinterest.common import wire
from fedinterest.common.catalogue import write_catalogue
from fedinterest.common.model import InterestModel
from fedinterest.common.run_config import RunConfig

# A model small enough to train in a test, big enough to have every kind of layer.
TINY_RUN = dict(max_len=10, dim=8, num_blocks=1, num_heads=1, dropout=0.0, batch_size=4)


def item_ids(n: int) -> list[str]:
    return [f"m{i}" for i in range(1, n + 1)]


def make_device(tmp_path: Path, num_items: int = 40, name: str = "device") -> DeviceDir:
    """An initialised device directory over a catalogue of `num_items` ids m1..mN."""
    catalogue = write_catalogue(tmp_path / f"{name}-catalogue.txt", item_ids(num_items))
    return init_device_dir(tmp_path / name, catalogue)


def write_csv(path: Path, rows: list[tuple[str, str, float]]) -> Path:
    """A user,item,timestamp CSV."""
    path.write_text("user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows), encoding="utf-8")
    return path


def user_rows(user: str, items: list[str], start: float = 1000.0) -> list[tuple[str, str, float]]:
    """One row per item, one second apart, in list order."""
    return [(user, item, start + k) for k, item in enumerate(items)]


def tiny_run(num_items: int, **overrides: object) -> RunConfig:
    """A deployed run of the tiny model over a catalogue of `num_items` items."""
    return RunConfig(**{**TINY_RUN, "dataset": "deployed", "num_items": num_items, **overrides})


def store_context(store_path: Path, run: RunConfig, run_id: int = 7) -> Context:
    """The Context a SuperNode started by `device start` gives the ClientApp."""
    return Context(run_id=run_id, node_id=100, node_config={HISTORY_DB: str(store_path)}, state=RecordDict(), run_config=run.to_flower())


def partition_context(run: RunConfig, partition: int, num_partitions: int = 20) -> Context:
    """The Context Flower's simulation engine gives the ClientApp of virtual node `partition`."""
    node_config = {"partition-id": partition, "num-partitions": num_partitions}
    return Context(run_id=7, node_id=100 + partition, node_config=node_config, state=RecordDict(), run_config=run.to_flower())


def message(kind: str, model: InterestModel, config: dict, run_id: int = 7) -> Message:
    """A real Flower message of `kind` carrying `model`'s weights and `config`."""
    metadata = Metadata(
        run_id=run_id, message_id=f"{kind}-{time.monotonic_ns()}", src_node_id=1, dst_node_id=100, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=DEFAULT_TTL, message_type=kind,
    )
    content = RecordDict({wire.ARRAYS: ArrayRecord(model.state_dict()), wire.CONFIG: ConfigRecord(config)})
    return Message(content, metadata=metadata)
