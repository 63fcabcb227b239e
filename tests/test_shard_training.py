"""A node standing for a shard of users (run-config users-per-node) trains each sampled user
as its own device: the same aggregate as one node per user, the batched FedSGD pass equal
to the per-user loop, one ledger account per user, reproducible without DP noise."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import DEFAULT_TTL, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedinterest.client.app import app
from fedinterest.client.data_source import load_device_data
from fedinterest.client.ledger import PrivacyLedger
from fedinterest.client.shard_training import _fedsgd_round, _loop_round, train_shard
from fedinterest.common import wire
from fedinterest.common.model import InterestModel
from fedinterest.common.run_config import RunConfig
from fedinterest.common.run_files import FinalReport
from fedinterest.server.evaluation import arrays_to_numpy
from fedinterest.server.user_privacy import noised_mean_update

torch.set_num_threads(1)
# FedSGD devices (docs/simulations.md, "Matching the centralized model"), no DP noise, no dropout.
FEDSGD = dict(
    synthetic_users=20, synthetic_items=160, max_len=10, dim=8, num_blocks=1, dropout=0.0, batch_size=16,
    local_optimizer="sgd", local_lr=1.0, local_epochs=1, noise_multiplier=0.0,
)


def _context(run: RunConfig, partition: int) -> Context:
    return Context(run_id=7, node_id=100 + partition, node_config={"partition-id": partition, "num-partitions": 20}, state=RecordDict(), run_config=run.to_flower())


def _message(kind: str, model: InterestModel, config: dict) -> Message:
    metadata = Metadata(
        run_id=7, message_id=f"{kind}-{time.monotonic_ns()}", src_node_id=1, dst_node_id=100, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=DEFAULT_TTL, message_type=kind,
    )
    return Message(RecordDict({wire.ARRAYS: ArrayRecord(model.state_dict()), wire.CONFIG: ConfigRecord(config)}), metadata=metadata)


def _global(run: RunConfig, seed: int = 0) -> InterestModel:
    torch.manual_seed(seed)
    return InterestModel(run.model_config(load_device_data({"partition-id": 0}, run).num_items))


def _train(run: RunConfig, model: InterestModel, partition: int, users: list[int], server_round: int = 1) -> Message:
    reply = app(_message("train", model, {wire.SERVER_ROUND: server_round, wire.SHARD_USERS: users}), _context(run, partition))
    assert not reply.has_error(), reply.error
    return reply


@pytest.mark.parametrize("user_dp", [False, True])
def test_k_users_on_one_node_give_the_aggregate_of_k_nodes(tmp_path: Path, user_dp: bool) -> None:
    dp = dict(user_noise_multiplier=1.0, user_clip_norm=0.05) if user_dp else {}
    sharded = RunConfig(**FEDSGD, **dp, users_per_node=5, run_dir=str(tmp_path / "sharded"))
    single = RunConfig(**FEDSGD, **dp, users_per_node=1, run_dir=str(tmp_path / "single"))
    model = _global(sharded)
    users = [5, 6, 8, 9]  # node 1 of the sharded run holds users 5..9; it trains four of them
    one = _train(sharded, model, partition=1, users=[u - 5 for u in users])
    many = [_train(single, model, partition=u, users=[0]) for u in users]
    one_metrics = one.content[wire.METRICS]
    assert one_metrics[wire.NUM_USERS] == 4 and one_metrics[wire.REFUSED] == 0 and len(one_metrics[wire.EPSILON]) == 4
    assert one_metrics[wire.NUM_EXAMPLES] == sum(m.content[wire.METRICS][wire.NUM_EXAMPLES] for m in many)
    base = {k: v.numpy() for k, v in model.state_dict().items()}
    got = arrays_to_numpy(one.content[wire.ARRAYS])
    if user_dp:
        # Clipped updates, every user alike: the server adds up n * (reply - global).
        expected = {k: sum(arrays_to_numpy(m.content[wire.ARRAYS])[k] - base[k] for m in many) for k in base}
        norms = [np.sqrt(sum(np.sum((arrays_to_numpy(m.content[wire.ARRAYS])[k] - base[k]) ** 2) for k in base)) for m in many]
        assert max(norms) == pytest.approx(0.05, rel=1e-4)  # the clip really bit
        for key in base:
            np.testing.assert_allclose(4 * (got[key] - base[key]), expected[key], atol=2e-6)
    else:
        expected, _ = FedAvg(weighted_by_key=wire.NUM_EXAMPLES).aggregate_train(1, [_for_fedavg(m) for m in many])
        for key, value in arrays_to_numpy(expected).items():
            np.testing.assert_allclose(got[key], value, atol=2e-6)


def _for_fedavg(reply: Message) -> Message:
    metrics = reply.content[wire.METRICS]
    reply.content = RecordDict({wire.ARRAYS: reply.content[wire.ARRAYS], wire.METRICS: type(metrics)({wire.NUM_EXAMPLES: metrics[wire.NUM_EXAMPLES]})})
    return reply


def test_server_noise_does_not_depend_on_how_users_are_grouped() -> None:
    rng = np.random.default_rng(3)
    base = {"w": np.zeros(1000, dtype=np.float32)}
    updates = [rng.normal(0, 0.01, 1000).astype(np.float32) for _ in range(4)]
    singles = [({"w": u}, 1) for u in updates]
    shard = [({"w": (sum(u.astype(np.float64) for u in updates) / 4).astype(np.float32)}, 4)]
    kwargs = dict(clip_norm=1.0, noise_multiplier=2.0, expected_size=8.0)
    a, _ = noised_mean_update(base, singles, rng=np.random.default_rng(0), **kwargs)
    b, _ = noised_mean_update(base, shard, rng=np.random.default_rng(0), **kwargs)
    np.testing.assert_allclose(a["w"], b["w"], atol=1e-6)


@pytest.mark.parametrize("clip", [None, 0.05])
def test_the_batched_fedsgd_pass_equals_training_each_user_alone(clip: float | None) -> None:
    run = RunConfig(**FEDSGD, users_per_node=6, **({"user_noise_multiplier": 1.0, "user_clip_norm": clip} if clip else {}))
    device = load_device_data({"partition-id": 0}, run)
    histories = [u.train for u in device.users]
    assert max(len(h) for h in histories) > run.max_len + 1  # some users have several windows
    model = _global(run, seed=1)
    batched = _fedsgd_round(model, histories, _accounts(6), run, run_id=1, server_round=1, clip=clip)
    looped = _loop_round(model, histories, _accounts(6), run, run_id=1, server_round=1, proximal_mu=0.0, generator=None, clip=clip)
    assert (batched.num_users, batched.num_examples) == (looped.num_users, looped.num_examples) == (6, batched.num_examples)
    assert batched.train_loss == pytest.approx(looped.train_loss, rel=1e-5)
    for key in batched.state_dict:
        torch.testing.assert_close(batched.state_dict[key], looped.state_dict[key], atol=2e-6, rtol=1e-5, msg=key)


def _accounts(users: int) -> list[PrivacyLedger]:
    ledger = PrivacyLedger(":memory:")
    return [ledger.for_user(str(u)) for u in range(users)]


def test_each_user_has_its_own_ledger_account_and_a_retried_round_trains_none(tmp_path: Path) -> None:
    run = RunConfig(**FEDSGD, users_per_node=5, run_dir=str(tmp_path))
    model = _global(run)
    first = _train(run, model, partition=2, users=[0, 3])
    retried = _train(run, model, partition=2, users=[0, 3, 4])
    assert first.content[wire.METRICS][wire.NUM_USERS] == 2
    metrics = retried.content[wire.METRICS]
    assert (metrics[wire.NUM_USERS], metrics[wire.REFUSED]) == (1, 2)  # users 10 and 13 were charged already
    with PrivacyLedger(tmp_path / "devices" / "partition-2.sqlite") as node:
        assert node.users() == ["10", "13", "14"]
        assert [len(node.for_user(u).entries()) for u in node.users()] == [1, 1, 1]


def test_without_dp_noise_a_round_is_reproducible_and_with_it_is_not() -> None:
    run = RunConfig(**{**FEDSGD, "dropout": 0.3}, users_per_node=4)
    model = _global(run)
    a, b = (arrays_to_numpy(_train(run, model, 0, [0, 1, 2]).content[wire.ARRAYS]) for _ in range(2))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    other_round = arrays_to_numpy(_train(run, model, 0, [0, 1, 2], server_round=2).content[wire.ARRAYS])
    assert not all(np.array_equal(a[k], other_round[k]) for k in a)  # dropout differs by round
    private = RunConfig(**{**FEDSGD, "noise_multiplier": 1.0, "local_optimizer": "adam", "local_lr": 1e-3, "epsilon_budget": 1e9}, users_per_node=4)
    c, d = (arrays_to_numpy(_train(private, model, 0, [0]).content[wire.ARRAYS]) for _ in range(2))
    assert not all(np.array_equal(c[k], d[k]) for k in c)  # DP noise from OS entropy
    seeded = RunConfig(**{**FEDSGD, "noise_multiplier": 1.0, "local_optimizer": "adam", "local_lr": 1e-3, "epsilon_budget": 1e9}, users_per_node=4, research_noise_seed=5)
    e, f = (arrays_to_numpy(_train(seeded, model, 0, [0]).content[wire.ARRAYS]) for _ in range(2))
    assert all(np.array_equal(e[k], f[k]) for k in e)


def test_a_train_message_naming_users_outside_the_shard_is_an_error() -> None:
    run = RunConfig(**FEDSGD, users_per_node=4)
    with pytest.raises(ValueError, match="outside this node's 4"):  # Flower's runtime makes it an error reply
        app(_message("train", _global(run), {wire.SERVER_ROUND: 1, wire.SHARD_USERS: [1, 4]}), _context(run, 0))
    with pytest.raises(ValueError, match="distinct indices"):
        train_shard(model=_global(run), device=load_device_data({"partition-id": 0}, run), sampled=[1, 1], run=run, ledger=PrivacyLedger(":memory:"), run_id=1, server_round=1)


def test_the_shard_query_names_the_first_user_and_the_size() -> None:
    run = RunConfig(**FEDSGD, users_per_node=6)  # 20 users: nodes of 6, 6, 6 and 2
    reply = app(_message(wire.QUERY_SHARD, _global(run), {}), _context(run, 3))
    metrics = reply.content[wire.METRICS]
    assert (metrics[wire.SHARD_FIRST_USER], metrics[wire.SHARD_SIZE]) == (18, 2)


def test_a_seeded_noise_run_says_its_privacy_figures_do_not_hold() -> None:
    from fedinterest.simulations.privacy_report import privacy_markdown, privacy_report
    from fedinterest.simulations.simulation_config import FederationConfig, SimulationConfig

    for seed, warned in ((0, False), (9, True)):
        config = SimulationConfig("x", RunConfig(**FEDSGD, research_noise_seed=seed), FederationConfig(num_supernodes=2))
        report = privacy_report(config, [], FinalReport({}))
        assert ("warning" in report) is warned
        assert ("do not hold" in privacy_markdown(report)) is warned
