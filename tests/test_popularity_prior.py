"""The private popularity prior (server/popularity_prior.py, common/popularity.py): the
per-user bound of the released counts, its step in the accountant, the blend folded into
the model's bias, the weight chosen on validation -- on the real round loop with scripted
nodes, and once through a real Flower simulation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from opacus.accountants import RDPAccountant
from reply_helpers import train_metrics
from scripted_grid import ScriptedGrid, as_server_task
from simulation_helpers import TIMEOUT_MINUTES, TINY, write_sequences
from typer.testing import CliRunner

from fedinterest.common.datasets import load_split
from fedinterest.common.evaluation import model_ranks, offset_ranks
from fedinterest.common.model import InterestModel
from fedinterest.common.popularity import PRIOR_WEIGHTS, log_prior, user_count_vector, with_prior
from fedinterest.common.run_config import RunConfig
from fedinterest.common.run_files import FINAL_FILE
from fedinterest.common.wire import ARRAYS, METRICS, NUM_USERS, POPULARITY_COUNTS, QUERY_POPULARITY
from fedinterest.server import checkpoint as ckpt
from fedinterest.server.cohort import Cohort, NodeShard
from fedinterest.server.evaluation import ServerEvaluator, arrays_from_numpy, arrays_to_numpy, initial_arrays
from fedinterest.server.popularity_prior import PRIOR_FILE, release_counts
from fedinterest.server.rounds import run
from fedinterest.server.user_privacy import UserDPSettings, UserLevelAccountant
from fedinterest.simulations.cli import app

torch.set_num_threads(1)

BASE = RunConfig(
    synthetic_users=6, synthetic_items=160, max_len=8, dim=8, num_blocks=1, dropout=0.0,
    num_server_rounds=3, clients_per_round=6, eval_every=1, round_timeout=5.0, seed=3,
    user_noise_multiplier=1.0, user_clip_norm=0.5, user_epsilon_budget=1000.0, user_accountant="rdp", popularity_prior=True,
)
NODES = (1, 2, 3, 4, 5, 6)
NUM_ITEMS = load_split(BASE.dataset_spec()).num_items


@pytest.fixture(autouse=True)
def task_identity():
    with as_server_task():
        yield


def rdp_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = [(sigma, q, steps)]
    return accountant.get_epsilon(delta)


def node(counts: np.ndarray | None = None):
    """A scripted node: answers a popularity query with `counts` (one user), a train message with the global weights."""

    def respond(message: Message) -> Message:
        if message.metadata.message_type == QUERY_POPULARITY:
            content = RecordDict({METRICS: MetricRecord({NUM_USERS: 1})})
            content[ARRAYS] = ArrayRecord({POPULARITY_COUNTS: Array(counts)})
            return Message(content, reply_to=message)
        arrays = ArrayRecord({k: Array(a.numpy()) for k, a in message.content[ARRAYS].items()})
        return Message(RecordDict({ARRAYS: arrays, METRICS: train_metrics(3, 1.0, 0.5)}), reply_to=message)

    return respond


def unit_counts(items: list[int], num_items: int = NUM_ITEMS) -> np.ndarray:
    return user_count_vector(np.array(items), num_items)


def test_a_users_counts_have_norm_one_whatever_its_history():
    for history in ([5], [3, 3, 3, 7], list(range(1, 120))):
        vector = unit_counts(history)
        assert np.linalg.norm(vector) == pytest.approx(1.0) and vector[0] == 0.0
        assert set(np.flatnonzero(vector)) == set(history)  # repeats count once


def test_one_user_moves_the_released_sum_by_at_most_one_however_large_its_reply():
    def released(nodes: dict[int, np.ndarray]) -> np.ndarray:
        cohort = Cohort(NodeShard(n, i, 1) for i, n in enumerate(nodes))
        settings = UserDPSettings(noise_multiplier=1.0, clip_norm=0.5, delta=1e-3, epsilon_budget=100.0, clients_per_round=len(nodes), noise_seed=5)
        accountant = UserLevelAccountant.start(settings, cohort.population)
        grid = ScriptedGrid({n: node(c) for n, c in nodes.items()})
        return release_counts(grid, cohort, accountant, NUM_ITEMS, timeout=5.0)

    honest = {n: unit_counts([n, n + 10]) for n in (1, 2, 3)}
    attacker = np.zeros(NUM_ITEMS + 1)
    attacker[50] = 1e6  # a device that sends anything: the server's own clip bounds it
    with_attacker = released({**honest, 4: attacker})
    without = released(honest)  # same research noise seed: the difference is the user's alone
    # q = 1 both times (clients-per-round = nodes); noise seeded identically.
    assert np.linalg.norm(with_attacker - without) <= 1.0 + 1e-9
    assert with_attacker[50] - without[50] == pytest.approx(1.0)


def test_the_release_is_one_more_accounted_step_and_calibration_counts_it(tmp_path):
    counts = unit_counts([1, 2, 3])
    final = run(ScriptedGrid({n: node(counts) for n in NODES}), dataclasses.replace(BASE, run_dir=str(tmp_path), research_noise_seed=9))
    user = final["privacy"]["user_level"]
    assert user["rounds_accounted"] == BASE.num_server_rounds + 1
    assert user["epsilon"] == pytest.approx(rdp_epsilon(1.0, 1.0, BASE.num_server_rounds + 1, 6 ** -1.1))
    released = np.load(tmp_path / ckpt.CHECKPOINT_DIR / PRIOR_FILE)
    # Six users' 1/sqrt(3) on items 1-3 (q = 1), plus noise of std 1 on every item.
    assert released[1:4] == pytest.approx(6 / np.sqrt(3), abs=3.0) and np.abs(released[4:]).max() < 5.0
    assert final["popularity_prior"]["chosen_weight"] == final["best_valid"]["prior_weight"]
    assert final["best_valid"]["prior_weight"] in PRIOR_WEIGHTS

    target = dataclasses.replace(BASE, run_dir=str(tmp_path / "target"), user_noise_multiplier=0.0, user_target_epsilon=6.0)
    calibrated = run(ScriptedGrid({n: node(counts) for n in NODES}), target)["privacy"]["user_level"]
    # sigma was chosen for rounds + 1 steps: the prior's release does not push epsilon past the target.
    assert calibrated["rounds_accounted"] == BASE.num_server_rounds + 1
    assert 5.9 <= calibrated["epsilon"] <= 6.0


def test_a_resumed_run_does_not_release_the_counts_again(tmp_path):
    cfg = dataclasses.replace(BASE, run_dir=str(tmp_path), num_server_rounds=2)
    run(ScriptedGrid({n: node(unit_counts([1, 2])) for n in NODES}), cfg)
    grid = ScriptedGrid({n: node(unit_counts([1, 2])) for n in NODES})
    final = run(grid, dataclasses.replace(cfg, num_server_rounds=3))
    assert {r for r, _ in grid.sent} == {3}  # round 0 (the popularity query) not sent again
    assert final["privacy"]["user_level"]["rounds_accounted"] == 4


def test_a_release_before_any_checkpoint_stays_counted(tmp_path):
    # The prior is released and persisted, then the server dies in round 1.
    def dies_in_training(message: Message) -> Message:
        if message.metadata.message_type == QUERY_POPULARITY:
            return node(unit_counts([1]))(message)
        raise KeyboardInterrupt("the server process dies mid-round")

    cfg = dataclasses.replace(BASE, run_dir=str(tmp_path), num_server_rounds=2)
    with pytest.raises(KeyboardInterrupt):
        run(ScriptedGrid({n: dies_in_training for n in NODES}), cfg)
    assert ckpt.latest(tmp_path) is None
    final = run(ScriptedGrid({n: node(unit_counts([1])) for n in NODES}), cfg)
    assert final["privacy"]["user_level"]["rounds_accounted"] == 3


def small_model_and_split():
    cfg = dataclasses.replace(BASE, run_dir="")
    split = load_split(cfg.dataset_spec())
    model_config = cfg.model_config(split.num_items)
    return split, model_config, initial_arrays(model_config, 11)


@pytest.mark.parametrize("weight", [0.5, 4.0])
def test_the_blend_folded_into_the_bias_ranks_as_the_offset_scores(weight):
    split, model_config, arrays = small_model_and_split()
    prior = log_prior(np.random.default_rng(0).exponential(20.0, split.num_items + 1))
    offsets = offset_ranks(_model(model_config, arrays), split.users, "test", torch.from_numpy(weight * prior)[None].float())[0]
    folded = model_ranks(_model(model_config, arrays_from_numpy(with_prior(arrays_to_numpy(arrays), prior, weight))), split.users, "test")
    assert np.array_equal(offsets, folded)
    assert not np.array_equal(folded, model_ranks(_model(model_config, arrays), split.users, "test"))


def test_the_evaluator_keeps_the_weight_validation_prefers_and_tests_with_it():
    split, model_config, arrays = small_model_and_split()
    evaluator = ServerEvaluator(split, model_config)
    evaluator.prior = log_prior(np.random.default_rng(1).exponential(20.0, split.num_items + 1))
    valid = evaluator.evaluate(arrays, "valid")
    by_weight = evaluator.valid_by_weight
    assert set(by_weight) == set(PRIOR_WEIGHTS)
    assert valid["ndcg@10"] == max(m["ndcg@10"] for m in by_weight.values())
    chosen = evaluator.prior_weight
    folded = _model(model_config, arrays_from_numpy(with_prior(arrays_to_numpy(arrays), evaluator.prior, chosen)))
    assert np.array_equal(evaluator.ranks(arrays, "test"), model_ranks(folded, split.users, "test"))
    report = evaluator.blend_report(arrays)
    assert report["prior_weight"] == chosen and set(report["valid_ndcg_by_weight"]) == {f"{w:g}" for w in PRIOR_WEIGHTS}


def _model(model_config, arrays: ArrayRecord) -> InterestModel:
    model = InterestModel(model_config)
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


@pytest.mark.parametrize("changes, message", [
    ({"user_noise_multiplier": 0.0}, "needs user-level DP"),
    ({"aggregation": "secagg+"}, 'aggregation "plain"'),
])
def test_the_prior_needs_layer_two_in_the_clear(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(BASE, **changes)


def test_a_simulation_releases_blends_and_reports_the_prior(tmp_path: Path) -> None:
    write_sequences(tmp_path / "tiny.seq")
    (tmp_path / "tiny.toml").write_text(TINY)
    sets = ["user-noise-multiplier=1.0", "user-delta=0.01", "user-epsilon-budget=50.0", "user-accountant=rdp", "popularity-prior=true", "noise-multiplier=0.0"]
    result = CliRunner().invoke(app, [
        "simulate", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "runs"), "--json", "--timeout-minutes", TIMEOUT_MINUTES,
        *(x for item in sets for x in ("--set", item)),
    ])
    assert result.exit_code == 0, result.output
    run_dir = Path(json.loads(result.stdout)["run_dir"])
    final = json.loads((run_dir / FINAL_FILE).read_text())
    # Two rounds and the prior's release, each a step at q = 1 (4 of 4 devices), sigma 1.
    assert final["privacy"]["user_level"]["rounds_accounted"] == 3
    assert final["privacy"]["user_level"]["epsilon"] == pytest.approx(rdp_epsilon(1.0, 1.0, 3, 0.01))
    released = np.load(run_dir / ckpt.CHECKPOINT_DIR / PRIOR_FILE)
    assert released.shape == (load_split(RunConfig(dataset="sequences", data_path=str(tmp_path / "tiny.seq")).dataset_spec()).num_items + 1,)
    assert np.count_nonzero(released[1:]) == released.size - 1  # every item got noise
    assert final["best_valid"]["prior_weight"] in PRIOR_WEIGHTS and "test_model_alone" in final["best_valid"]
