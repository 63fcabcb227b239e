"""Strategy construction from the RunConfig, node sampling, and strategy state round trips."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum
from reply_helpers import train_metrics
from scripted_grid import ScriptedGrid, as_server_task

from fedinterest.common.run_config import RunConfig
from fedinterest.common.wire import ARRAYS, METRICS, NUM_EXAMPLES, SERVER_ROUND
from fedinterest.server.strategies import PROXIMAL_MU, build_strategy, fit_sampling, load_strategy_state, strategy_state


@pytest.fixture(autouse=True)
def task_identity():
    with as_server_task():
        yield


BASE = RunConfig(server_lr=0.05, server_tau=1e-8, server_momentum=0.5, proximal_mu=0.3, local_lr=0.002, clients_per_round=3, trim_beta=0.25, num_malicious_nodes=2)


@pytest.mark.parametrize(
    "name, cls, settings",
    [
        ("fedavg", FedAvg, {}),
        ("fedadam", FedAdam, {"eta": 0.05, "tau": 1e-8, "eta_l": 0.002}),
        ("fedyogi", FedYogi, {"eta": 0.05, "tau": 1e-8, "eta_l": 0.002}),
        ("fedprox", FedProx, {"proximal_mu": 0.3}),
        ("fedavgm", FedAvgM, {"server_momentum": 0.5, "server_learning_rate": 0.05}),
        ("fedmedian", FedMedian, {}),
        ("fedtrimmedavg", FedTrimmedAvg, {"beta": 0.25}),
        ("krum", Krum, {"num_malicious_nodes": 2, "num_nodes_to_select": 1}),
    ],
)
def test_each_strategy_is_flowers_own_with_the_run_settings(name, cls, settings):
    strategy = build_strategy(dataclasses.replace(BASE, strategy=name), num_nodes=10)
    assert type(strategy) is cls
    for attr, value in settings.items():
        assert getattr(strategy, attr) == value
    assert strategy.weighted_by_key == NUM_EXAMPLES and strategy.arrayrecord_key == ARRAYS


@pytest.mark.parametrize("nodes, per_round, expected", [(10, 3, 3), (7, 3, 3), (2, 3, 2), (1, 50, 1), (600, 50, 50)])
def test_configure_train_samples_clients_per_round_capped_at_the_nodes(nodes, per_round, expected):
    grid = ScriptedGrid(range(100, 100 + nodes))
    strategy = build_strategy(dataclasses.replace(BASE, clients_per_round=per_round), num_nodes=nodes)
    arrays = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    messages = list(strategy.configure_train(4, arrays, ConfigRecord(), grid))
    assert len(messages) == expected == fit_sampling(strategy, nodes, per_round)
    assert len({m.metadata.dst_node_id for m in messages}) == expected
    assert all(m.content["config"][SERVER_ROUND] == 4 for m in messages)


def test_fedprox_sends_mu_to_the_device():
    strategy = build_strategy(dataclasses.replace(BASE, strategy="fedprox"), num_nodes=3)
    arrays = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    (message, *_) = strategy.configure_train(1, arrays, ConfigRecord(), ScriptedGrid([1, 2, 3]))
    assert message.content["config"][PROXIMAL_MU] == 0.3


def _round(strategy, arrays, server_round, grid, step):
    """One configure/aggregate cycle with every node answering `arrays + step * node`."""
    random.seed(server_round)  # the reply order (hence float summation order) follows the sampling
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    replies = []
    for m in messages:
        node = m.metadata.dst_node_id
        new = {k: a.numpy() + step * node for k, a in arrays.items()}
        content = RecordDict({
            ARRAYS: ArrayRecord({k: Array(v.astype(np.float32)) for k, v in new.items()}),
            METRICS: train_metrics(node, 1.0, 0.1),
        })
        replies.append(Message(content, reply_to=m))
    aggregated, _ = strategy.aggregate_train(server_round, replies)
    return aggregated


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedavgm", "fedavg", "fedprox"])
def test_state_round_trip_makes_resume_exact(name):
    config = dataclasses.replace(BASE, strategy=name, clients_per_round=3)
    grid = ScriptedGrid([1, 2, 3])
    start = ArrayRecord({"w": Array(np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3)), "b": Array(np.ones(2, dtype=np.float32))})

    straight = build_strategy(config, 3)
    arrays = start
    for r in (1, 2, 3):
        arrays = _round(straight, arrays, r, grid, step=0.01 * r)

    first = build_strategy(config, 3)
    resumed_arrays = start
    for r in (1, 2):
        resumed_arrays = _round(first, resumed_arrays, r, grid, step=0.01 * r)
    state = {k: v.copy() for k, v in strategy_state(first).items()}
    if name in ("fedavg", "fedprox"):
        assert state == {}
    else:
        assert state
    second = build_strategy(config, 3)
    load_strategy_state(second, state)
    resumed_arrays = _round(second, resumed_arrays, 3, grid, step=0.03)
    for key in arrays.keys():
        np.testing.assert_array_equal(resumed_arrays[key].numpy(), arrays[key].numpy())


def test_state_of_another_strategy_is_refused():
    adam = build_strategy(dataclasses.replace(BASE, strategy="fedadam"), 3)
    with pytest.raises(ValueError, match="does not fit FedAvgM"):
        load_strategy_state(build_strategy(dataclasses.replace(BASE, strategy="fedavgm"), 3), {"m_t/w": np.zeros(2)})
    with pytest.raises(ValueError, match="does not fit FedAdam"):
        load_strategy_state(adam, {"momentum/00000": np.zeros(2)})


def test_server_lr_zero_keeps_flowers_own_defaults() -> None:
    config = RunConfig(server_lr=0.0, clients_per_round=3)
    assert build_strategy(RunConfig(**{**config.__dict__, "strategy": "fedadam"}), 5).eta == 0.1
    assert build_strategy(RunConfig(**{**config.__dict__, "strategy": "fedadam"}), 5).tau == 1e-3
    assert build_strategy(RunConfig(**{**config.__dict__, "strategy": "fedyogi"}), 5).eta == 0.01
    assert build_strategy(RunConfig(**{**config.__dict__, "strategy": "fedavgm"}), 5).server_learning_rate == 1.0
    assert build_strategy(RunConfig(**{**config.__dict__, "strategy": "fedadam", "server_lr": 0.3}), 5).eta == 0.3
