"""The round loop on a scripted Grid: real strategies, records, checkpoints and evaluation;
the devices are small functions of the message they get (the real ClientApp is tested by
the end-to-end simulation test)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
from reply_helpers import train_metrics
from scripted_grid import ScriptedGrid, as_server_task

from fedinterest.common.datasets import load_split
from fedinterest.common.evaluation import model_ranks
from fedinterest.common.metrics import hit_rate, ndcg
from fedinterest.common.model import InterestModel
from fedinterest.common.run_config import RunConfig
from fedinterest.common.run_files import FINAL_FILE, METRICS_FILE, ROW_FIELDS, read_jsonl
from fedinterest.common.wire import (
    ARRAYS,
    CONFIG,
    EPSILON,
    HIT_RATE_10,
    METRICS,
    NDCG_10,
    NUM_EXAMPLES,
    SERVER_ROUND,
)
from fedinterest.server import checkpoint as ckpt
from fedinterest.server.evaluation import STAGE, ServerEvaluator, federated_evaluate, initial_arrays
from fedinterest.server.rounds import run, wait_for_nodes

torch.set_num_threads(1)

BASE = RunConfig(
    synthetic_users=4, synthetic_items=160, max_len=8, dim=8, num_blocks=1, dropout=0.0,
    num_server_rounds=3, clients_per_round=10, eval_every=2, round_timeout=5.0, seed=3,
)


@pytest.fixture(autouse=True)
def task_identity():
    with as_server_task():
        yield


def metrics(n, loss, eps, refused=0.0):
    return train_metrics(n, loss, eps, refused)


def trainer(node: int, crash_at: int | None = None):
    """Deterministic pseudo-training: weights move by a node- and round-dependent step."""

    def respond(message: Message) -> Message:
        server_round = message.content[CONFIG][SERVER_ROUND]
        if crash_at is not None and server_round == crash_at:
            raise KeyboardInterrupt("the server process dies mid-round")
        rng = np.random.default_rng(node * 100 + server_round)
        new = {}
        for key, array in message.content[ARRAYS].items():
            value = array.numpy()
            new[key] = (value + 0.05 * rng.standard_normal(value.shape)).astype(np.float32)
        content = RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in new.items()}), METRICS: metrics(node, 1.0 / server_round + node, 0.5 * server_round)})
        return Message(content, reply_to=message)

    return respond


def refuser(message):
    return Message(RecordDict({METRICS: metrics(0, float("nan"), 9.0, refused=1.0)}), reply_to=message)


def idle(message):
    return Message(RecordDict({METRICS: metrics(0, float("nan"), 0.0)}), reply_to=message)


def broken(message):
    return Message(Error(code=1, reason="device crashed"), reply_to=message)


def malformed(message):
    arrays = message.content[ARRAYS]
    content = RecordDict({ARRAYS: arrays, METRICS: train_metrics(1000, 0.1, 0.1, **{"history-length": 7.0})})
    return Message(content, reply_to=message)


def silent(message):
    return None


def config(tmp_path, **changes) -> RunConfig:
    return dataclasses.replace(BASE, run_dir=str(tmp_path), **changes)


def test_rounds_write_metrics_final_and_checkpoints(tmp_path):
    nodes = {1: trainer(1), 2: trainer(2), 3: trainer(3), 4: refuser, 5: idle, 6: broken, 7: malformed, 8: silent}
    final = run(ScriptedGrid(nodes), config(tmp_path))

    rows = read_jsonl(tmp_path / METRICS_FILE)
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert tuple(r) == ROW_FIELDS
        assert (r["sampled"], r["answered"], r["refused"], r["failed"], r["rejected"], r["empty"]) == (8, 6, 1, 2, 1, 1)
        assert r["train_loss"] == pytest.approx(sum(n * (1.0 / r["round"] + n) for n in (1, 2, 3)) / 6)
        assert r["epsilon_max"] == 9.0 and r["dp"] is True
        assert r["epsilon_mean"] == pytest.approx((3 * 0.5 * r["round"] + 9.0 + 0.0) / 5)
    assert rows[0][HIT_RATE_10] is None and rows[1][HIT_RATE_10] is not None and rows[2][NDCG_10] is not None

    on_disk = json.loads((tmp_path / FINAL_FILE).read_text())
    assert on_disk == final
    assert final["rounds"] == 3 and final["resumed_after_round"] == 0
    assert final["valid"]["hr@10"] == rows[2][HIT_RATE_10] and final["test"]["users"] == 4
    assert final["counts"] == {"sampled": 24, "answered": 18, "refused": 3, "failed": 6, "rejected": 3, "empty": 3, "aggregated": 9, "rounds_without_update": 0}
    assert final["privacy"]["device_epsilon_max"] == 9.0 and final["privacy"]["devices_reporting"] == 5
    assert ckpt.latest(tmp_path).round == 3


def test_best_validation_round_is_chosen_on_validation_and_carries_its_test(tmp_path):
    nodes = {n: trainer(n) for n in (1, 2, 3, 4)}
    final = run(ScriptedGrid(nodes), config(tmp_path, num_server_rounds=5, eval_every=1))
    rows = read_jsonl(tmp_path / METRICS_FILE)
    scores = [r[NDCG_10] for r in rows]
    best = final["best_valid"]
    assert best["round"] == 1 + scores.index(max(scores))  # the first round with the best validation
    assert best["valid"][NDCG_10] == max(scores)
    assert set(best["test"]) == set(final["test"]) and best["test"]["users"] == 4
    if best["round"] == 5:
        assert best["test"] == final["test"]


def deployed_device(node: int, ndcg: float):
    """A device of a deployed run: trains like `trainer`, evaluates its own user as `ndcg`."""
    train = trainer(node)

    def respond(message: Message) -> Message:
        if message.metadata.message_type == MessageType.EVALUATE:
            record = MetricRecord({NUM_EXAMPLES: 1, HIT_RATE_10: float(ndcg > 0), NDCG_10: ndcg})
            return Message(RecordDict({METRICS: record}), reply_to=message)
        return train(message)

    return respond


def test_deployed_run_loads_no_data_and_evaluates_through_the_devices(tmp_path):
    cfg = config(tmp_path, dataset="deployed", num_items=50, num_server_rounds=2, eval_every=1, clients_per_round=3)
    grid = ScriptedGrid({1: deployed_device(1, 0.5), 2: deployed_device(2, 0.25), 3: deployed_device(3, 0.0)})
    final = run(grid, cfg)
    assert final["dataset"] == {"label": "deployed", "users": None, "items": 50}
    assert final["valid"][NDCG_10] == pytest.approx(0.25) and final["test"]["users"] == 3
    assert final["rounds"] == 2 and final["counts"]["aggregated"] == 6
    assert ckpt.latest(tmp_path).arrays["item_emb.weight"].shape[0] == 51  # PAD + 50 items


@pytest.mark.parametrize("changes, message", [
    ({"dataset": "deployed"}, "needs num-items"),
    ({"num_items": 10}, "num-items is only for"),
])
def test_deployed_run_config_is_checked(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(BASE, **changes)


def test_round_without_valid_update_keeps_the_model(tmp_path):
    cfg = config(tmp_path, num_server_rounds=2, noise_multiplier=0.0)
    nodes = {1: refuser, 2: idle, 3: broken, 4: malformed}
    final = run(ScriptedGrid(nodes), cfg)
    saved = ckpt.latest(tmp_path)
    start = initial_arrays(cfg.model_config(load_split(cfg.dataset_spec()).num_items), cfg.seed)
    for key, array in start.items():
        np.testing.assert_array_equal(saved.arrays[key], array.numpy())
    rows = read_jsonl(tmp_path / METRICS_FILE)
    assert [r["train_loss"] for r in rows] == [None, None]
    assert final["counts"]["rounds_without_update"] == 2 and final["counts"]["aggregated"] == 0


def test_dp_off_devices_give_null_epsilon(tmp_path):
    def no_dp(message):
        reply = trainer(1)(message)
        reply.content[METRICS][EPSILON] = [float("inf")]
        return reply

    run(ScriptedGrid({1: no_dp, 2: no_dp, 3: no_dp, 4: no_dp}), config(tmp_path, num_server_rounds=1))
    (row,) = read_jsonl(tmp_path / METRICS_FILE)
    assert (row["epsilon_max"], row["epsilon_mean"], row["dp"]) == (None, None, False)
    assert json.loads((tmp_path / FINAL_FILE).read_text())["privacy"]["dp"] is False


def _strip_times(rows):
    return [{k: v for k, v in r.items() if k not in ("seconds", "time")} for r in rows]


@pytest.mark.parametrize("strategy", ["fedadam", "fedavgm"])
def test_crash_and_resume_continue_exactly(tmp_path, strategy):
    def nodes(crash_at=None):
        return {n: trainer(n, crash_at) for n in (1, 2, 3, 4, 5)}

    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    cfg = dict(strategy=strategy, server_lr=0.01, clients_per_round=3, num_server_rounds=4)
    run(ScriptedGrid(nodes()), config(straight_dir, **cfg))

    # First 2 rounds as a complete run, then more rounds in the same directory, crashing in round 3.
    run(ScriptedGrid(nodes()), config(resumed_dir, **{**cfg, "num_server_rounds": 2}))
    with pytest.raises(KeyboardInterrupt):
        run(ScriptedGrid(nodes(crash_at=3)), config(resumed_dir, **cfg))
    assert ckpt.latest(resumed_dir).round == 2
    with open(resumed_dir / METRICS_FILE, "a") as handle:
        handle.write('{"round": 3, "sampled"')  # a torn row from the crash
    grid = ScriptedGrid(nodes())
    final = run(grid, config(resumed_dir, **cfg))

    assert {r for r, _ in grid.sent} == {3, 4}  # no round repeated
    assert final["resumed_after_round"] == 2 and final["rounds"] == 4
    expected, got = ckpt.latest(straight_dir), ckpt.latest(resumed_dir)
    for key in expected.arrays:
        np.testing.assert_array_equal(got.arrays[key], expected.arrays[key])
    for key in expected.strategy_state:
        np.testing.assert_array_equal(got.strategy_state[key], expected.strategy_state[key])
    assert got.privacy == expected.privacy and got.counts == expected.counts
    assert _strip_times(read_jsonl(resumed_dir / METRICS_FILE)) == _strip_times(read_jsonl(straight_dir / METRICS_FILE))
    straight_final = json.loads((straight_dir / FINAL_FILE).read_text())
    assert final["test"] == straight_final["test"] and final["valid"] == straight_final["valid"]
    assert final["best_valid"] == straight_final["best_valid"]  # the best round survives the resume


def test_lost_metrics_row_is_restored_from_the_checkpoint(tmp_path):
    nodes = {n: trainer(n) for n in (1, 2, 3, 4)}
    run(ScriptedGrid(nodes), config(tmp_path, num_server_rounds=2))
    rows = read_jsonl(tmp_path / METRICS_FILE)
    # A crash after round 2's checkpoint but before its row was appended.
    (tmp_path / METRICS_FILE).write_text(json.dumps(rows[0]) + "\n")
    run(ScriptedGrid(nodes), config(tmp_path, num_server_rounds=3))
    assert [r["round"] for r in read_jsonl(tmp_path / METRICS_FILE)] == [1, 2, 3]
    assert read_jsonl(tmp_path / METRICS_FILE)[1] == rows[1]


def test_resume_with_another_config_is_refused(tmp_path):
    nodes = {n: trainer(n) for n in (1, 2, 3, 4)}
    run(ScriptedGrid(nodes), config(tmp_path, num_server_rounds=1))
    with pytest.raises(ckpt.ConfigMismatchError, match="clients-per-round"):
        run(ScriptedGrid(nodes), config(tmp_path, num_server_rounds=2, clients_per_round=2))


def test_empty_run_dir_uses_a_temporary_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    final = run(ScriptedGrid({n: trainer(n) for n in (1, 2, 3, 4)}), dataclasses.replace(BASE, num_server_rounds=1))
    assert final["run_dir"].startswith(str(tmp_path)) and (tmp_path / final["run_dir"] / FINAL_FILE).exists()


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_wait_for_nodes_polls_until_registered_or_timeout():
    grid = ScriptedGrid({})
    clock = Clock()
    arrivals = iter([1, 2, 3, 4, 5])

    def sleep(seconds):
        clock.sleep(seconds)
        grid.nodes[next(arrivals)] = silent

    assert wait_for_nodes(grid, 4, timeout=60, clock=clock, sleep=sleep) == 4 and clock.now == 4.0
    clock = Clock()
    assert wait_for_nodes(ScriptedGrid({1: silent}), 3, timeout=5, clock=clock, sleep=clock.sleep) == 1
    # Fewer supernodes than users: the count stops moving, and the wait ends long before the timeout.
    clock = Clock()
    assert wait_for_nodes(ScriptedGrid({1: silent, 2: silent}), 5, timeout=600, settle=15, clock=clock, sleep=clock.sleep) == 2
    assert 15 <= clock.now <= 16
    with pytest.raises(RuntimeError, match="no node registered"):
        clock = Clock()
        wait_for_nodes(ScriptedGrid({}), 3, timeout=5, clock=clock, sleep=clock.sleep)


def test_server_evaluation_equals_the_federated_path():
    """Each node ranks for its own user alone, as a device does; the server ranks all at once."""
    split = load_split(BASE.dataset_spec())
    model_config = BASE.model_config(split.num_items)
    torch.manual_seed(11)
    trained = InterestModel(model_config)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p))  # spread the scores: a fresh init ranks almost at random
    arrays = ArrayRecord(trained.state_dict())

    def device(user):
        def respond(message):
            model = InterestModel(model_config)
            model.load_state_dict(message.content[ARRAYS].to_torch_state_dict())
            ranks = model_ranks(model, [user], message.content[CONFIG][STAGE])
            reply = MetricRecord({NUM_EXAMPLES: 1, HIT_RATE_10: float(hit_rate(ranks, 10)[0]), NDCG_10: float(ndcg(ranks, 10)[0])})
            return Message(RecordDict({METRICS: reply}), reply_to=message)

        return respond

    grid = ScriptedGrid({100 + i: device(u) for i, u in enumerate(split.users)})
    evaluator = ServerEvaluator(split, model_config)
    for stage in ("valid", "test"):
        server = evaluator.evaluate(arrays, stage)
        devices = federated_evaluate(grid, arrays, stage, server_round=1, timeout=5)
        assert devices["users"] == server["users"] == len(split.users) and devices["failed"] == 0
        assert devices[HIT_RATE_10] == pytest.approx(server["hr@10"], abs=1e-12)
        assert devices[NDCG_10] == pytest.approx(server["ndcg@10"], abs=1e-12)
