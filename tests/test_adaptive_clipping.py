"""Adaptive clipping of layer 2 (server/adaptive_clipping.py, Andrew et al. 2021): the noise
split the accountant relies on, the geometric step on a centred noised count, the clip norm
travelling to the devices and back as a count, and its state surviving the checkpoint."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict
from reply_helpers import train_metrics
from scripted_grid import ScriptedGrid, as_server_task
from test_shard_training import FEDSGD, _context, _global, _message

from fedinterest.client.app import app
from fedinterest.client.device_errors import MessageError
from fedinterest.common import wire
from fedinterest.common.datasets import load_split
from fedinterest.common.run_config import RunConfig
from fedinterest.server import checkpoint as ckpt
from fedinterest.server.adaptive_clipping import AdaptiveClip
from fedinterest.server.evaluation import initial_arrays
from fedinterest.server.reply_checks import ArraySpec, ReplyKind, check_train_reply
from fedinterest.server.rounds import run
from fedinterest.server.user_privacy import UserDPSettings, UserLevelAccountant

torch.set_num_threads(1)

BASE = RunConfig(
    synthetic_users=6, synthetic_items=160, max_len=8, dim=8, num_blocks=1, dropout=0.0,
    num_server_rounds=3, clients_per_round=6, eval_every=3, round_timeout=5.0, seed=3,
    user_noise_multiplier=0.5, user_clip_norm=0.5, user_epsilon_budget=1e6, user_accountant="rdp",
    user_clip_quantile=0.5, user_clip_count_stddev=1.0,
)
NODES = (1, 2, 3, 4, 5, 6)


def test_the_update_and_the_count_share_the_calibrated_noise_as_one_gaussian_mechanism():
    clip = AdaptiveClip.start(clip_norm=1.0, quantile=0.5, lr=0.2, count_stddev=0.0, noise_multiplier=0.9, expected_size=3000)
    assert clip.count_stddev == pytest.approx(3000 / 20)  # the paper's (and Flower's) default
    # Theorem 1 of Andrew et al.: z^-2 = z_update^-2 + (2 sigma_b)^-2, so the accountant's z covers both.
    assert clip.update_noise_multiplier ** -2 + (2 * clip.count_stddev) ** -2 == pytest.approx(0.9 ** -2)
    assert clip.update_noise_multiplier > 0.9
    with pytest.raises(ValueError, match="user-clip-count-stddev"):
        AdaptiveClip.start(clip_norm=1.0, quantile=0.5, lr=0.2, count_stddev=0.2, noise_multiplier=0.9, expected_size=10)


def test_the_clip_norm_grows_when_most_updates_are_clipped_and_shrinks_when_few_are():
    def step(unclipped: int, users: int) -> tuple[float, float]:
        clip = AdaptiveClip(clip_norm=2.0, quantile=0.5, lr=0.2, count_stddev=3.0, update_noise_multiplier=1.0)
        fraction = clip.step([(unclipped, users)], 100.0, np.random.default_rng(7))
        return fraction, clip.clip_norm

    noise = np.random.default_rng(7).normal(0.0, 3.0)
    fraction, grown = step(10, 100)  # 90 of 100 clipped: the norm must rise toward the median
    assert fraction == pytest.approx((10 - 50 + noise) / 100 + 0.5)  # the bits centred on 1/2, then noised
    assert grown == pytest.approx(2.0 * math.exp(-0.2 * (fraction - 0.5))) and grown > 2.0
    _, shrunk = step(95, 100)
    assert shrunk < 2.0


def test_adaptive_state_survives_the_checkpoint_json():
    settings = UserDPSettings(noise_multiplier=0.9, clip_norm=1.0, delta=1e-5, epsilon_budget=8.0, clients_per_round=100, clip_quantile=0.3)
    accountant = UserLevelAccountant.start(settings, population=1000)
    accountant.adaptive.step([(80, 100)], 100.0, np.random.default_rng(0))
    restored = UserLevelAccountant.from_json(settings, accountant.to_json())
    assert restored.clip_norm == accountant.clip_norm != 1.0
    assert restored.update_noise_multiplier == accountant.update_noise_multiplier > 0.9
    assert UserLevelAccountant.from_json(dataclasses.replace(settings, clip_quantile=0.0), {**accountant.to_json(), "adaptive_clip": None}).clip_norm == 1.0


def _device(step: float, unclipped_of: dict[int, int], seen: list[float]):
    """A scripted device whose update adds `step` to every weight; it reports its bit as the wire asks."""

    def respond(message: Message) -> Message:
        config = message.content[wire.CONFIG]
        seen.append(config[wire.CLIP_NORM])
        arrays = {k: Array((a.numpy() + step).astype(np.float32)) for k, a in message.content[wire.ARRAYS].items()}
        norm = step * math.sqrt(sum(a.numpy().size for a in message.content[wire.ARRAYS].values()))
        metrics = train_metrics(3, 1.0, 0.5, **{wire.UNCLIPPED_USERS: int(norm <= config[wire.CLIP_NORM])})
        unclipped_of[config[wire.SERVER_ROUND]] = unclipped_of.get(config[wire.SERVER_ROUND], 0) + int(norm <= config[wire.CLIP_NORM])
        return Message(RecordDict({wire.ARRAYS: ArrayRecord(arrays), wire.METRICS: metrics}), reply_to=message)

    return respond


def test_the_round_loop_sends_the_clip_moves_it_from_the_replies_and_noises_with_the_update_share(tmp_path, monkeypatch):
    monkeypatch.setattr("fedinterest.server.user_privacy.secrets.randbits", lambda bits: 2024)
    seen: list[float] = []
    counts: dict[int, int] = {}
    # Every update has norm 0 < C: all unclipped, so the clip norm must fall round after round.
    with as_server_task():
        final = run(ScriptedGrid({n: _device(0.0, counts, seen) for n in NODES}), dataclasses.replace(BASE, run_dir=str(tmp_path), num_server_rounds=2))
    first, second = seen[:6], seen[6:]
    assert set(first) == {0.5} and len(set(second)) == 1 and second[0] < 0.5
    assert counts == {1: 6, 2: 6}
    user = final["privacy"]["user_level"]
    assert user["adaptive_clip"]["target_quantile"] == 0.5 and user["adaptive_clip"]["last_clip_norm"] < second[0]
    z_update = user["adaptive_clip"]["update_noise_multiplier"]
    assert z_update > user["noise_multiplier"] == 0.5
    # The devices send the weights back: what moved the model is noise of std z_update C_t / E per round.
    cfg = dataclasses.replace(BASE, run_dir=str(tmp_path))
    start = initial_arrays(cfg.model_config(load_split(cfg.dataset_spec()).num_items), cfg.seed)
    moved = np.concatenate([(ckpt.latest(tmp_path).arrays[k] - start[k].numpy()).ravel() for k in start.keys()])
    expected = math.sqrt((z_update * first[0] / 6) ** 2 + (z_update * second[0] / 6) ** 2)
    assert moved.std() == pytest.approx(expected, rel=0.1)


def test_a_device_counts_its_unclipped_users_against_the_round_clip(tmp_path):
    run_config = RunConfig(**FEDSGD, user_noise_multiplier=1.0, user_clip_norm=1.0, user_clip_quantile=0.5, users_per_node=5, run_dir=str(tmp_path))
    model = _global(run_config)

    def unclipped(clip: float, partition: int) -> tuple[int, int]:
        config = {wire.SERVER_ROUND: 1, wire.SHARD_USERS: [0, 1, 2, 3], wire.CLIP_NORM: clip}
        reply = app(_message("train", model, config), _context(run_config, partition))
        assert not reply.has_error(), reply.error
        metrics = reply.content[wire.METRICS]
        return metrics[wire.UNCLIPPED_USERS], metrics[wire.NUM_USERS]

    assert unclipped(1e6, partition=0) == (4, 4)
    assert unclipped(1e-6, partition=1) == (0, 4)
    with pytest.raises(MessageError, match=wire.CLIP_NORM):  # Flower turns it into the reply's error
        app(_message("train", model, {wire.SERVER_ROUND: 1, wire.SHARD_USERS: [0], wire.CLIP_NORM: -1.0}), _context(run_config, 2))


def test_a_reply_claiming_more_unclipped_users_than_it_trained_is_rejected():
    with as_server_task():
        _check_claims()


def _check_claims() -> None:
    arrays = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    spec = ArraySpec.of(arrays)
    sent = Message(RecordDict({wire.ARRAYS: arrays}), dst_node_id=1, message_type="train")
    honest = Message(RecordDict({wire.ARRAYS: arrays, wire.METRICS: train_metrics(3, 1.0, 0.5, **{wire.UNCLIPPED_USERS: 1})}), reply_to=sent)
    lying = Message(RecordDict({wire.ARRAYS: arrays, wire.METRICS: train_metrics(3, 1.0, 0.5, **{wire.UNCLIPPED_USERS: 2})}), reply_to=sent)
    assert check_train_reply(honest, spec).unclipped == 1
    checked = check_train_reply(lying, spec)
    assert checked.kind is ReplyKind.REJECTED and wire.UNCLIPPED_USERS in checked.reason


@pytest.mark.parametrize("changes, message", [
    ({"user_clip_quantile": 1.0}, "user-clip-quantile"),
    ({"user_clip_lr": 0.0}, "user-clip-lr"),
    ({"user_clip_count_stddev": -1.0}, "user-clip-count-stddev"),
    ({"user_noise_multiplier": 0.0}, "needs user-level DP"),
    ({"aggregation": "secagg+"}, "does not carry"),
])
def test_bad_adaptive_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(BASE, **changes)
