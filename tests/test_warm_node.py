"""A simulation process keeps each node's ledger open and one model between messages
(client/warm_node.py): the same replies and the same ledger entries as opening, closing and
building per message, and a ledger replaced on disk or a model changed by a message is never reused."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import DEFAULT_TTL, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from fedinterest.client import warm_node
from fedinterest.client.app import app
from fedinterest.client.data_source import load_device_data
from fedinterest.client.ledger import PrivacyLedger
from fedinterest.common import wire
from fedinterest.common.model import InterestModel
from fedinterest.common.run_config import RunConfig

torch.set_num_threads(1)
SMALL = dict(synthetic_users=12, synthetic_items=160, max_len=10, dim=8, num_blocks=1, dropout=0.1, batch_size=16, seed=3)
RECIPES = {
    "fedsgd": dict(local_optimizer="sgd", local_lr=1.0, local_epochs=1, noise_multiplier=0.0, users_per_node=3),
    "local-adam": dict(local_optimizer="adam", local_lr=0.01, local_epochs=2, noise_multiplier=0.0, users_per_node=3),
    "dp-sgd": dict(local_optimizer="sgd", local_lr=0.1, local_epochs=1, noise_multiplier=1.0, max_grad_norm=1.0, users_per_node=1),
}


@pytest.fixture(autouse=True)
def fresh_process_cache() -> Iterator[None]:
    warm_node.forget_all()
    yield
    warm_node.forget_all()


def _message(model: InterestModel, server_round: int, users: list[int], run_id: int = 7) -> Message:
    metadata = Metadata(
        run_id=run_id, message_id=f"train-{time.monotonic_ns()}", src_node_id=1, dst_node_id=100, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=DEFAULT_TTL, message_type="train",
    )
    config = ConfigRecord({wire.SERVER_ROUND: server_round, wire.SHARD_USERS: users})
    return Message(RecordDict({wire.ARRAYS: ArrayRecord(model.state_dict()), wire.CONFIG: config}), metadata=metadata)


def _rounds(run: RunConfig, schedule: list[tuple[int, int, list[int]]], run_id: int = 7) -> list[Message]:
    """Train messages (round, partition, users) in order; round r's global model seeded by r."""
    replies = []
    for server_round, partition, users in schedule:
        torch.manual_seed(server_round)
        model = InterestModel(run.model_config(load_device_data({"partition-id": 0}, run).num_items))
        context = Context(run_id=run_id, node_id=100 + partition, node_config={"partition-id": partition, "num-partitions": 4}, state=RecordDict(), run_config=run.to_flower())
        reply = app(_message(model, server_round, users, run_id), context)
        assert not reply.has_error(), reply.error
        replies.append(reply)
    return replies


def _ledger_rows(run_dir: Path) -> dict[str, list[tuple]]:
    """Every ledger file's rows without their clock column."""
    rows = {}
    for path in sorted((run_dir / "devices").glob("*.sqlite")):
        with sqlite3.connect(path) as conn:
            rows[path.name] = conn.execute(
                "SELECT user, run_id, server_round, noise_multiplier, sample_rate, steps FROM ledger_steps ORDER BY user, run_id, server_round"
            ).fetchall()
    return rows


# Rounds 1-3 over partitions 0-2; partition 1 is asked for round 2 twice (a retried round: refused).
SCHEDULE = [(1, 0, [0]), (1, 1, [0]), (2, 1, [0]), (2, 1, [0]), (2, 2, [0]), (3, 0, [0]), (3, 1, [0])]


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_warm_node_gives_the_replies_and_ledger_entries_of_the_cold_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recipe: str) -> None:
    results = {}
    for mode in ("off", "on"):
        monkeypatch.setenv(warm_node.SWITCH, mode)
        run = RunConfig(**SMALL, **RECIPES[recipe], run_dir=str(tmp_path / mode))
        schedule = [(r, p, [0, 2] if RECIPES[recipe]["users_per_node"] > 1 else u) for r, p, u in SCHEDULE]
        results[mode] = (_rounds(run, schedule), _ledger_rows(tmp_path / mode))
        warm_node.forget_all()
    (cold, cold_rows), (warm, warm_rows) = results["off"], results["on"]
    assert warm_rows == cold_rows and sum(len(r) for r in warm_rows.values()) > 0
    for a, b in zip(cold, warm):
        assert dict(a.content[wire.METRICS]) == dict(b.content[wire.METRICS])
        assert (wire.ARRAYS in a.content) == (wire.ARRAYS in b.content)
        if wire.ARRAYS in a.content and recipe != "dp-sgd":  # DP noise is drawn from OS entropy
            for key, value in a.content[wire.ARRAYS].to_torch_state_dict().items():
                assert torch.equal(value, b.content[wire.ARRAYS].to_torch_state_dict()[key]), key
    assert cold[3].content[wire.METRICS][wire.REFUSED] >= 1  # the retried round


def test_a_node_opens_its_ledger_once_and_the_process_builds_one_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened, built = [], []
    ledger_init, model_init = PrivacyLedger.__init__, InterestModel.__init__
    monkeypatch.setattr(PrivacyLedger, "__init__", lambda self, *a, **k: (opened.append(a[0]), ledger_init(self, *a, **k))[1])
    run = RunConfig(**SMALL, **RECIPES["fedsgd"], run_dir=str(tmp_path))
    schedule = [(1, 0, [0, 1]), (1, 1, [2]), (2, 0, [1]), (2, 1, [0]), (3, 0, [2])]
    models = {}
    for server_round, _partition, _users in schedule:
        torch.manual_seed(server_round)
        models[server_round] = InterestModel(run.model_config(load_device_data({"partition-id": 0}, run).num_items))
    monkeypatch.setattr(InterestModel, "__init__", lambda self, *a, **k: (built.append(1), model_init(self, *a, **k))[1])
    for server_round, partition, users in schedule:
        context = Context(run_id=7, node_id=100 + partition, node_config={"partition-id": partition, "num-partitions": 4}, state=RecordDict(), run_config=run.to_flower())
        assert not app(_message(models[server_round], server_round, users), context).has_error()
    assert sorted(Path(p).name for p in opened) == ["partition-0.sqlite", "partition-1.sqlite"]
    assert len(built) == 1


def test_a_ledger_deleted_or_of_another_run_is_opened_afresh(tmp_path: Path) -> None:
    run = RunConfig(**SMALL, **RECIPES["fedsgd"], run_dir=str(tmp_path))
    ledger_file = tmp_path / "devices" / "partition-0.sqlite"
    _rounds(run, [(1, 0, [0])])
    for suffix in ("", "-wal", "-shm"):  # the run directory's ledger removed between two messages
        Path(f"{ledger_file}{suffix}").unlink(missing_ok=True)
    _rounds(run, [(2, 0, [0])])
    _rounds(run, [(2, 0, [1])], run_id=8)
    assert _ledger_rows(tmp_path)["partition-0.sqlite"] == [("0", "7", 2, 0.0, 1.0, 1), ("1", "8", 2, 0.0, 1.0, 1)]


def test_a_model_a_message_changed_is_not_handed_out_again() -> None:
    run = RunConfig(**SMALL, **RECIPES["fedsgd"])
    config = run.model_config(160)
    first = warm_node.fresh_model(config)
    first.eval()
    first.head.weight.grad = torch.ones_like(first.head.weight)
    second = warm_node.fresh_model(config)
    assert second is first and second.training and second.head.weight.grad is None  # reset as a new model is
    handle = second.blocks[0].register_forward_hook(lambda *args: None)
    third = warm_node.fresh_model(config)
    assert third is not second
    handle.remove()
    third.item_emb.weight.requires_grad_(False)
    fourth = warm_node.fresh_model(config)
    assert fourth is not third and all(p.requires_grad for p in fourth.parameters())
    assert warm_node.fresh_model(run.model_config(170)) is not fourth  # another catalogue, another model
