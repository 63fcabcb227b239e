"""A layer-2 release is counted before it leaves the server (issue 13, defect 2).

In a deployment the round loop sends each newly released model to every device for
federated evaluation. Before the fix the accountant step of that release reached disk
only with the round's checkpoint, after the evaluation: a crash in between resumed from
the previous checkpoint and released the round again with fresh noise, so devices held
two releases of that round and epsilon counted one. Now the step is persisted first
(checkpoints/releases.json) and a resume counts both releases.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from opacus.accountants import RDPAccountant
from scripted_grid import ScriptedGrid, as_server_task

from fedinterest.common import wire
from fedinterest.common.run_config import RunConfig
from fedinterest.server import checkpoint as ckpt
from fedinterest.server.rounds import run

NODES = (1, 2, 3, 4, 5, 6)
RUN = RunConfig(
    dataset="deployed", num_items=30, max_len=8, dim=8, num_blocks=1, dropout=0.0, num_server_rounds=4,
    clients_per_round=3, eval_every=1, round_timeout=5.0, user_noise_multiplier=1.0, user_clip_norm=0.5,
    user_epsilon_budget=1000.0, user_accountant="rdp", user_delta=1 / 6,
)


@pytest.fixture(autouse=True)
def server_task():
    with as_server_task():
        yield


class Devices:
    """Deployed devices that keep every model sent to them for evaluation (as real ones store it).

    They share their metrics (train-loss, hr@10, ndcg@10), as a device of the code before
    the fix always did, so that the same test runs against it."""

    def __init__(self, crash_after_training_round: int | None = None) -> None:
        self.evaluated: dict[int, set[str]] = {}  # round last trained -> digests of the models evaluated after it
        self.crash_after = crash_after_training_round
        self.round = 0

    def node(self, message: Message) -> Message:
        arrays = message.content[wire.ARRAYS]
        if message.metadata.message_type == MessageType.EVALUATE:
            digest = hashlib.sha256(b"".join(a.numpy().tobytes() for a in arrays.values())).hexdigest()
            self.evaluated.setdefault(self.round, set()).add(digest)
            if self.round == self.crash_after:
                raise KeyboardInterrupt("the server process dies after sending the model, before the checkpoint")
            return Message(RecordDict({wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 1, wire.HIT_RATE_10: 0.0, wire.NDCG_10: 0.0})}), reply_to=message)
        self.round = int(message.content[wire.CONFIG][wire.SERVER_ROUND])
        moved = ArrayRecord({k: Array((a.numpy() + 0.001).astype(np.float32)) for k, a in arrays.items()})
        metrics = MetricRecord({wire.NUM_EXAMPLES: 1, wire.NUM_USERS: 1, wire.TRAIN_LOSS: 1.0, wire.EPSILON: [1.0], wire.REFUSED: 0})
        return Message(RecordDict({wire.ARRAYS: moved, wire.METRICS: metrics}), reply_to=message)

    def grid(self) -> ScriptedGrid:
        return ScriptedGrid({n: self.node for n in NODES})


def _epsilon(releases: int) -> float:
    accountant = RDPAccountant()
    accountant.history = [(1.0, 3 / 6, releases)]
    return accountant.get_epsilon(1 / 6)


def test_a_release_sent_before_a_crash_stays_counted_after_resume(tmp_path) -> None:
    cfg = dataclasses.replace(RUN, run_dir=str(tmp_path))
    crashed = Devices(crash_after_training_round=3)  # dies on sending round 3's release for evaluation
    with pytest.raises(KeyboardInterrupt):
        run(crashed.grid(), cfg)
    assert ckpt.latest(tmp_path).round == 2  # the crash came before round 3's checkpoint
    resumed = Devices()
    final = run(resumed.grid(), cfg)

    (first_release_of_round_3,), (second_release_of_round_3,) = crashed.evaluated[3], resumed.evaluated[3]
    assert first_release_of_round_3 != second_release_of_round_3  # round 3 was released twice, with fresh noise
    user = final["privacy"]["user_level"]
    assert user["rounds_accounted"] == 5  # rounds 1, 2, 3 (lost), 3 again, 4
    assert user["epsilon"] == pytest.approx(_epsilon(5))


def test_the_release_is_persisted_before_the_model_is_sent(tmp_path) -> None:
    cfg = dataclasses.replace(RUN, run_dir=str(tmp_path), num_server_rounds=2)
    seen = []  # (round the devices last trained, round of the release on disk) at each evaluation

    def looking(message: Message) -> Message:
        if message.metadata.message_type == MessageType.EVALUATE:
            released = ckpt.last_release(tmp_path)
            seen.append((devices.round, released[0] if released else None))
        return devices.node(message)

    devices = Devices()
    run(ScriptedGrid({n: looking for n in NODES}), cfg)
    assert {trained for trained, _ in seen} == {1, 2}
    assert all(trained == released for trained, released in seen), seen
    assert ckpt.last_release(tmp_path)[1]["history"] == [[1.0, 0.5, 2]]
