"""Layer 2, user-level DP-FedAvg (server/user_privacy.py): clipping, the noise on the
aggregate, Poisson sampling, the accountant, the budget stop and resume -- on the real
round loop with scripted devices, and once through a real Flower simulation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, RecordDict
from opacus.accountants import RDPAccountant
from reply_helpers import train_metrics
from scripted_grid import ScriptedGrid, as_server_task
from simulation_helpers import TIMEOUT_MINUTES, TINY, write_sequences
from typer.testing import CliRunner

from fedinterest.common.datasets import load_split
from fedinterest.common.run_config import RunConfig
from fedinterest.common.run_files import FINAL_FILE, METRICS_FILE, read_jsonl
from fedinterest.common.wire import ARRAYS, CONFIG, METRICS, SERVER_ROUND
from fedinterest.server import checkpoint as ckpt
from fedinterest.server.evaluation import initial_arrays
from fedinterest.server.round_callbacks import STOPPED_AT_USER_BUDGET
from fedinterest.server.rounds import run
from fedinterest.server.user_privacy import UserDPSettings, UserLevelAccountant, clip_update, noised_mean_update
from fedinterest.simulations.cli import app

torch.set_num_threads(1)

BASE = RunConfig(
    synthetic_users=6, synthetic_items=160, max_len=8, dim=8, num_blocks=1, dropout=0.0,
    num_server_rounds=3, clients_per_round=3, eval_every=3, round_timeout=5.0, seed=3,
    user_noise_multiplier=1.0, user_clip_norm=0.5, user_epsilon_budget=1000.0, user_accountant="rdp",
)
NODES = (1, 2, 3, 4, 5, 6)


@pytest.fixture(autouse=True)
def task_identity():
    with as_server_task():
        yield


@pytest.fixture
def fixed_sampling_seed(monkeypatch):
    """The per-run sampling seed is secret and random; fixing it makes the loop tests
    deterministic (with q = 0.5 over 6 nodes a random seed leaves a round empty 1 time in 64)."""
    monkeypatch.setattr("fedinterest.server.user_privacy.secrets.randbits", lambda bits: 2024)


def config(tmp_path, **changes) -> RunConfig:
    return dataclasses.replace(BASE, run_dir=str(tmp_path), **changes)


def reply(message: Message, arrays: dict[str, np.ndarray]) -> Message:
    metrics = train_metrics(3, 1.0, 0.5)
    return Message(RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}), METRICS: metrics}), reply_to=message)


def shifter(step: float, crash_at: int | None = None):
    """A device whose update adds `step` to every weight (norm step * sqrt(parameters))."""

    def respond(message: Message) -> Message:
        if crash_at is not None and message.content[CONFIG][SERVER_ROUND] == crash_at:
            raise KeyboardInterrupt("the server process dies mid-round")
        return reply(message, {k: (a.numpy() + step).astype(np.float32) for k, a in message.content[ARRAYS].items()})

    return respond


def opacus_epsilon(sigma: float, q: float, rounds: int, delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = [(sigma, q, rounds)]
    return accountant.get_epsilon(delta)


# --- the mechanism ------------------------------------------------------------------------


def test_clip_bounds_the_whole_update_and_keeps_small_ones():
    update = {"a": np.full((10,), 3.0), "b": np.full((6,), 4.0)}
    clipped, norm = clip_update(update, 2.0)
    assert norm == pytest.approx(np.sqrt(10 * 9 + 6 * 16))
    assert np.sqrt(sum(np.sum(v**2) for v in clipped.values())) == pytest.approx(2.0)
    np.testing.assert_allclose(clipped["a"] / clipped["b"][0], update["a"] / 4.0)  # direction kept
    small, _ = clip_update({"a": np.full((4,), 0.1)}, 2.0)
    np.testing.assert_array_equal(small["a"], np.full((4,), 0.1))


def test_aggregate_is_the_clipped_sum_over_the_expected_size_plus_noise_of_the_stated_scale():
    global_arrays = {"w": np.zeros((200_000,), dtype=np.float32)}
    replies = [{"w": np.full((200_000,), 1.0, dtype=np.float32)}, {"w": np.full((200_000,), 1e-4, dtype=np.float32)}]
    sigma, clip, size = 2.0, 1.5, 4.0
    new, norms = noised_mean_update(global_arrays, [(r, 1) for r in replies], clip_norm=clip, noise_multiplier=sigma, expected_size=size, rng=np.random.default_rng(0))
    assert new["w"].dtype == np.float32
    assert norms == pytest.approx([np.sqrt(200_000), 1e-4 * np.sqrt(200_000)], rel=1e-5)
    # The first update is clipped to norm 1.5, the second (norm 0.045) passes whole.
    signal = (clip / np.sqrt(200_000) + 1e-4) / size
    noise = new["w"] - signal
    assert abs(noise.mean()) < 5 * sigma * clip / size / np.sqrt(200_000)
    assert noise.std() == pytest.approx(sigma * clip / size, rel=0.02)


def test_one_user_moves_the_mean_by_at_most_clip_over_expected_size():
    global_arrays = {"w": np.zeros((50,), dtype=np.float32)}
    others = [{"w": np.full((50,), 0.01, dtype=np.float32)}] * 3
    hostile = {"w": np.full((50,), 1e6, dtype=np.float32)}
    kwargs = dict(clip_norm=1.0, noise_multiplier=1.0, expected_size=10.0)
    with_user, _ = noised_mean_update(global_arrays, [(r, 1) for r in [*others, hostile]], rng=np.random.default_rng(1), **kwargs)
    without, _ = noised_mean_update(global_arrays, [(r, 1) for r in others], rng=np.random.default_rng(1), **kwargs)
    assert np.linalg.norm(with_user["w"] - without["w"]) == pytest.approx(1.0 / 10.0, rel=1e-4)


def test_accountant_matches_opacus_and_survives_json():
    settings = UserDPSettings(noise_multiplier=1.1, clip_norm=1.0, delta=0.0, epsilon_budget=5.0, clients_per_round=30, accountant="rdp")
    accountant = UserLevelAccountant.start(settings, population=300)
    assert accountant.delta == pytest.approx(300 ** -1.1) and accountant.epsilon() == 0.0
    epsilons = []
    for _ in range(4):
        accountant.record_release(300)
        epsilons.append(accountant.epsilon())
    assert epsilons == sorted(epsilons) and epsilons[0] > 0
    assert epsilons[-1] == pytest.approx(opacus_epsilon(1.1, 0.1, 4, 300 ** -1.1))
    restored = UserLevelAccountant.from_json(settings, json.loads(json.dumps(accountant.to_json())))
    assert restored.epsilon() == epsilons[-1] and restored.rounds == 4
    assert restored.sample(300, 9) == accountant.sample(300, 9)
    # The budget check looks one release ahead.
    assert restored.would_exceed(300) == (opacus_epsilon(1.1, 0.1, 5, 300 ** -1.1) > 5.0)


def test_poisson_sample_has_rate_q_and_varies_in_size():
    settings = UserDPSettings(noise_multiplier=1.0, clip_norm=1.0, delta=1e-3, epsilon_budget=8.0, clients_per_round=20)
    accountant = UserLevelAccountant.start(settings, population=200)
    sizes = [len(accountant.sample(200, r)) for r in range(1, 301)]
    assert np.mean(sizes) == pytest.approx(20, rel=0.05)
    assert len(set(sizes)) > 5  # not a fixed-size sample
    other = UserLevelAccountant.start(settings, population=200)  # a new run: a new secret seed
    assert [other.sample(200, r) for r in (1, 2, 3)] != [accountant.sample(200, r) for r in (1, 2, 3)]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(strategy="fedmedian"), "needs a mean aggregate"),
        (dict(strategy="krum"), "needs a mean aggregate"),
        (dict(min_replies=2), "min-replies must stay 1"),
        (dict(user_noise_multiplier=-1.0), "user-noise-multiplier must be >= 0"),
        (dict(user_clip_norm=0.0), "user-clip-norm must be positive"),
        (dict(user_delta=1.0), "user-delta must be in [0, 1)"),
        (dict(user_epsilon_budget=0.0), "user-epsilon-budget must be positive"),
    ],
)
def test_invalid_user_level_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        dataclasses.replace(BASE, **changes)


# --- the round loop -----------------------------------------------------------------------


def test_rounds_report_growing_user_epsilon_and_noise_reaches_the_model(fixed_sampling_seed, tmp_path):
    # Devices send the global weights back unchanged: whatever moves the model is the noise.
    cfg = config(tmp_path, num_server_rounds=2)
    final = run(ScriptedGrid({n: shifter(0.0) for n in NODES}), cfg)
    rows = read_jsonl(tmp_path / METRICS_FILE)
    q = 3 / 6
    expected = [opacus_epsilon(1.0, q, r, 6 ** -1.1) for r in (1, 2)]
    assert [r["user_epsilon"] for r in rows] == pytest.approx(expected)
    user = final["privacy"]["user_level"]
    assert user["epsilon"] == pytest.approx(expected[-1]) and user["delta"] == pytest.approx(6 ** -1.1)
    assert user["rounds_accounted"] == 2 and user["sampling"] == "poisson" and final["stopped_early"] is None

    start = initial_arrays(cfg.model_config(load_split(cfg.dataset_spec()).num_items), cfg.seed)
    moved = np.concatenate([(ckpt.latest(tmp_path).arrays[k] - start[k].numpy()).ravel() for k in start.keys()])
    # Two releases of noise with std sigma C / E = 1.0 * 0.5 / 3 each.
    assert moved.std() == pytest.approx(np.sqrt(2) * 0.5 / 3, rel=0.1)


def test_failed_and_refusing_devices_still_give_an_accounted_release(tmp_path):
    def broken(message):
        return Message(Error(code=1, reason="device crashed"), reply_to=message)

    def refuser(message):
        return Message(RecordDict({METRICS: train_metrics(0, float("nan"), 9.0, refused=1.0)}), reply_to=message)

    cfg = config(tmp_path, num_server_rounds=2, clients_per_round=6)  # q = 1: everyone sampled
    final = run(ScriptedGrid({1: broken, 2: refuser, 3: broken, 4: refuser, 5: broken, 6: refuser}), cfg)
    assert final["rounds"] == 2 and final["counts"]["rounds_without_update"] == 0
    assert final["privacy"]["user_level"]["epsilon"] == pytest.approx(opacus_epsilon(1.0, 1.0, 2, 6 ** -1.1))


def test_run_stops_before_the_round_that_would_exceed_the_user_budget(fixed_sampling_seed, tmp_path):
    q = 3 / 6
    budget = (opacus_epsilon(1.0, q, 2, 6 ** -1.1) + opacus_epsilon(1.0, q, 3, 6 ** -1.1)) / 2
    grid = ScriptedGrid({n: shifter(0.001) for n in NODES})
    final = run(grid, config(tmp_path, num_server_rounds=5, user_epsilon_budget=budget))
    assert final["rounds"] == 2 and final["stopped_early"] == STOPPED_AT_USER_BUDGET
    assert {r for r, _ in grid.sent} == {1, 2}
    assert final["privacy"]["user_level"]["epsilon"] <= budget
    assert json.loads((tmp_path / FINAL_FILE).read_text())["stopped_early"] == STOPPED_AT_USER_BUDGET


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_resume_continues_the_same_composition_and_sample(fixed_sampling_seed, tmp_path, strategy):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cfg = dict(strategy=strategy, num_server_rounds=4)
    run(ScriptedGrid({n: shifter(0.001) for n in NODES}), config(straight, **cfg))

    crashing = ScriptedGrid({n: shifter(0.001, crash_at=3) for n in NODES})
    run(ScriptedGrid({n: shifter(0.001) for n in NODES}), config(resumed, **{**cfg, "num_server_rounds": 2}))
    with pytest.raises(KeyboardInterrupt):
        run(crashing, config(resumed, **cfg))
    assert ckpt.latest(resumed).round == 2
    grid = ScriptedGrid({n: shifter(0.001) for n in NODES})
    final = run(grid, config(resumed, **cfg))

    assert {r for r, _ in grid.sent} == {3, 4}  # no round repeated or lost
    # The crashed attempt at round 3 and the resumed round 3 drew the same devices (seed restored).
    first_node_of_crash = crashing.sent[0][1]
    assert (3, first_node_of_crash) in grid.sent
    expected = json.loads((straight / FINAL_FILE).read_text())["privacy"]["user_level"]["epsilon"]
    assert final["privacy"]["user_level"]["epsilon"] == pytest.approx(expected)
    assert final["privacy"]["user_level"]["rounds_accounted"] == 4
    rows = read_jsonl(resumed / METRICS_FILE)
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["user_epsilon"] == pytest.approx(expected)


def test_without_layer_two_nothing_changes(tmp_path):
    final = run(ScriptedGrid({n: shifter(0.001) for n in NODES}), config(tmp_path, user_noise_multiplier=0.0, num_server_rounds=1))
    assert final["privacy"]["user_level"] is None
    assert read_jsonl(tmp_path / METRICS_FILE)[0]["user_epsilon"] is None


# --- a real Flower simulation -------------------------------------------------------------


def test_simulation_with_both_layers_reports_user_and_device_epsilon(tmp_path: Path) -> None:
    write_sequences(tmp_path / "tiny.seq")
    (tmp_path / "tiny.toml").write_text(TINY)
    sets = ["user-noise-multiplier=1.0", "user-clip-norm=0.5", "user-delta=0.01", "user-epsilon-budget=50.0", "user-accountant=rdp"]
    result = CliRunner().invoke(app, [
        "simulate", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "runs"), "--json", "--timeout-minutes", TIMEOUT_MINUTES,
        *(x for item in sets for x in ("--set", item)),
    ])
    assert result.exit_code == 0, result.output
    run_dir = Path(json.loads(result.stdout)["run_dir"])
    final = json.loads((run_dir / FINAL_FILE).read_text())
    user, device = final["privacy"]["user_level"], final["privacy"]
    # clients-per-round 4 of 4 devices: q = 1, two releases at sigma 1.
    assert user["epsilon"] == pytest.approx(opacus_epsilon(1.0, 1.0, 2, 0.01)) and user["delta"] == 0.01
    assert device["dp"] is True and device["device_epsilon_max"] > 0  # layer 1 still on the devices
    rows = read_jsonl(run_dir / METRICS_FILE)
    assert rows[0]["user_epsilon"] < rows[1]["user_epsilon"]


def test_the_default_prv_accountant_is_opacus_prv_and_tighter_than_rdp():
    from opacus.accountants import PRVAccountant

    settings = UserDPSettings(noise_multiplier=0.9, clip_norm=1.0, delta=0.0, epsilon_budget=50.0, clients_per_round=100)
    prv = UserLevelAccountant.start(settings, population=1000)
    rdp = UserLevelAccountant.start(UserDPSettings(**{**settings.__dict__, "accountant": "rdp"}), population=1000)
    for _ in range(50):
        prv.record_release(1000)
        rdp.record_release(1000)
    reference = PRVAccountant()
    reference.history = [(0.9, 0.1, 50)]
    assert prv.delta == pytest.approx(1000 ** -1.1)
    assert prv.epsilon() == pytest.approx(reference.get_epsilon(delta=1000 ** -1.1))
    assert prv.epsilon() < rdp.epsilon() == pytest.approx(opacus_epsilon(0.9, 0.1, 50, 1000 ** -1.1))
    assert prv.summary()["accountant"] == "opacus prv"


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_a_target_epsilon_calibrates_the_noise_to_spend_it_over_the_rounds(accountant):
    settings = UserDPSettings(
        noise_multiplier=0.0, clip_norm=1.0, delta=0.0, epsilon_budget=8.0, clients_per_round=300,
        accountant=accountant, target_epsilon=8.0, rounds=40,
    )
    user_dp = UserLevelAccountant.start(settings, population=3000)
    assert 0.5 < user_dp.noise_multiplier < 5
    assert user_dp.epsilon_after(3000, 40) == pytest.approx(8.0, abs=0.02) and user_dp.epsilon_after(3000, 40) <= 8.0
    assert user_dp.epsilon_after(3000, 41) > 8.0  # the budget stop ends the run after the planned rounds
    restored = UserLevelAccountant.from_json(settings, json.loads(json.dumps(user_dp.to_json())))
    assert restored.noise_multiplier == user_dp.noise_multiplier  # a resume keeps the calibrated sigma


def test_full_participation_is_calibrated_and_accounted_without_a_numpy_warning():
    # q = 1 (every user every round, as ml-100k-private.toml): PRV takes log(1 - q) = -inf by
    # design; the server's calibration and epsilon must not print numpy's divide-by-zero warning.
    settings = UserDPSettings(noise_multiplier=0.0, clip_norm=1.0, delta=0.0, epsilon_budget=8.0, clients_per_round=50, target_epsilon=8.0, rounds=5)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        accountant = UserLevelAccountant.start(settings, population=50)
        accountant.record_release(50)
        assert 0 < accountant.epsilon() <= 8.0 + 0.05
