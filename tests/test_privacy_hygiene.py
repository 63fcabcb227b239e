"""The smaller points of issue 13 (defect 6): one population per round for layer 2's q,
secret checkpoint files, logs without the sampled node ids, device noise that follows no
generator state the server could know, and docs that say what is not hardened."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from device_helpers import message, partition_context
from flwr.app import Error, Message
from reply_helpers import deployed_device
from scripted_grid import ScriptedGrid, as_server_task

from fedinterest.client.app import app
from fedinterest.client.data_source import load_device_data
from fedinterest.common import wire
from fedinterest.common.model import InterestModel
from fedinterest.common.run_config import RunConfig
from fedinterest.server import checkpoint as ckpt
from fedinterest.server.rounds import run
from fedinterest.server.user_privacy import UserLevelAccountant

torch.set_num_threads(1)
PRIVACY_MD = Path(__file__).resolve().parents[1] / "docs" / "privacy.md"
LAYER_2 = RunConfig(
    dataset="deployed", num_items=30, max_len=8, dim=8, num_blocks=1, dropout=0.0, num_server_rounds=4,
    clients_per_round=3, eval_every=4, round_timeout=5.0, user_noise_multiplier=1.0, user_epsilon_budget=1000.0,
)


@pytest.fixture
def server_task():
    with as_server_task():
        yield


_trainer = deployed_device(step=0.001, ndcg=0.0)


class ComingAndGoing(ScriptedGrid):
    """Devices that come and go: every look at the registered nodes sees 6, then 4, then 6, ..."""

    def __init__(self) -> None:
        super().__init__({n: _trainer for n in range(1, 7)})
        self.looks = 0

    def get_node_ids(self):
        self.looks += 1
        return list(self.nodes) if self.looks % 2 else list(self.nodes)[:4]


def test_layer_two_accounts_each_round_at_the_population_it_sampled(tmp_path, monkeypatch, server_task) -> None:
    # The budget check, the sample and the release of a round must see one population
    # (q = K / N read once): with N read again between them, the release would be
    # accounted at another q than the sample was drawn with.
    calls = []
    for name in ("would_exceed", "sample", "record_release"):
        original = getattr(UserLevelAccountant, name)

        def spy(self, population, *args, _name=name, _original=original):
            calls.append((_name, population))
            return _original(self, population, *args)

        monkeypatch.setattr(UserLevelAccountant, name, spy)
    final = run(ComingAndGoing(), dataclasses.replace(LAYER_2, run_dir=str(tmp_path)))
    assert final["rounds"] == 4
    rounds = [calls[i : i + 3] for i in range(0, len(calls), 3)]
    assert [[name for name, _ in r] for r in rounds] == [["would_exceed", "sample", "record_release"]] * 4
    assert all(len({population for _, population in r}) == 1 for r in rounds), rounds
    assert len({r[0][1] for r in rounds}) > 1  # the population did change between rounds


def test_checkpoint_files_are_readable_by_their_owner_only(tmp_path, server_task) -> None:
    run(ScriptedGrid({n: _trainer for n in range(1, 7)}), dataclasses.replace(LAYER_2, run_dir=str(tmp_path), num_server_rounds=1))
    files = sorted((tmp_path / ckpt.CHECKPOINT_DIR).iterdir())
    assert {ckpt.MANIFEST, ckpt.RELEASES} <= {f.name for f in files}
    assert "sampling_seed" in (tmp_path / ckpt.CHECKPOINT_DIR / ckpt.MANIFEST).read_text()
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, (path.name, oct(path.stat().st_mode))


def test_failed_and_rejected_replies_are_logged_without_node_ids(tmp_path, caplog, server_task) -> None:
    def broken(message: Message) -> Message:
        return Message(Error(code=2, reason="device crashed"), reply_to=message)

    nodes = {987654: broken, 876543: broken, 765432: _trainer}
    # Under layer 2, whose amplification by sampling assumes the sample stays hidden.
    cfg = dataclasses.replace(LAYER_2, num_server_rounds=1, eval_every=1, run_dir=str(tmp_path))
    with caplog.at_level(logging.INFO, logger="flwr.fedinterest"):
        final = run(ScriptedGrid(nodes), cfg)
    assert final["counts"]["failed"] == 2
    assert "device crashed" in caplog.text
    assert not any(str(node) in caplog.text for node in nodes)


def _update_digest(run_config: RunConfig) -> str:
    """A digest of virtual node 3's update of round 1 from a fixed global model; torch's global generator at seed 0."""
    torch.manual_seed(0)
    model = InterestModel(run_config.model_config(load_device_data({"partition-id": 0}, run_config).num_items))
    reply = app(message("train", model, {wire.SERVER_ROUND: 1}), partition_context(run_config, 3))
    assert not reply.has_error()
    return hashlib.sha256(b"".join(a.numpy().tobytes() for a in reply.content[wire.ARRAYS].values())).hexdigest()


def test_device_noise_follows_no_generator_state_the_server_could_know() -> None:
    # Whatever torch's global generator holds (a fixed default seed in older torch, or a
    # state reached from known seeds), the device's DP noise comes from OS entropy.
    private = RunConfig(synthetic_users=20, synthetic_items=160, max_len=10, dim=8, num_blocks=1, dropout=0.0, batch_size=4)
    assert len({_update_digest(private) for _ in range(2)}) == 2
    seeded = dataclasses.replace(private, research_noise_seed=7)  # the research switch does make it reproducible
    assert len({_update_digest(seeded) for _ in range(2)}) == 1


WORKER = """
import sys
sys.path.insert(0, {tests!r})
from test_privacy_hygiene import _update_digest
from fedinterest.common.model import InterestModel
from fedinterest.common.run_config import RunConfig
print(_update_digest(RunConfig(synthetic_users=20, synthetic_items=160, max_len=10, dim=8, num_blocks=1, dropout=0.0, batch_size=4)))
"""


def test_fresh_device_processes_draw_different_noise() -> None:
    # Measured on torch 2.13 here: torch.initial_seed() already differs between fresh
    # processes; the device does not rely on it (it seeds from `secrets`).
    script = WORKER.format(tests=str(Path(__file__).parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    digests = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env).stdout.split()[-1] for _ in range(2)}
    assert len(digests) == 2


def test_the_privacy_docs_state_what_is_not_hardened() -> None:
    text = " ".join(PRIVACY_MD.read_text(encoding="utf-8").split())
    for phrase in (
        "PCG64", "not a cryptographically secure", "Mironov", "float64", "releases.json", "sampling seed",
        "must stay secret", "str(exception)", "never the node ids",
    ):
        assert phrase in text, phrase
