"""Layer 1's neighbour relation holds for what a device sends (issue 13, defect 1).

Opacus's epsilon is for adding or removing one example at a fixed sample rate, step count
and denominator. Before the fix, a device derived all three from its own window count W
(q = 1 / ceil(W / B)), replied num-examples = W and sent no model when W = 0, so removing
a window was visible: the reported epsilon held only for replace-one, which costs more
(at sigma 1, q = 1: 10.73 after one round, not 4.73). Now the rate, the steps and the
denominator come from the public run-config dp-windows, and nothing a reply holds
depends on W.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from device_helpers import message, partition_context
from opacus.accountants import RDPAccountant

from fedinterest.client.app import app
from fedinterest.client.data_source import load_device_data
from fedinterest.client.ledger import PrivacyLedger
from fedinterest.client.local_training import train_locally
from fedinterest.common import wire
from fedinterest.common.examples import training_windows
from fedinterest.common.model import InterestModel
from fedinterest.common.run_config import RunConfig

torch.set_num_threads(1)
DELTA = 1e-5
MAX_LEN = 10
NUM_ITEMS = 60
SMALL = dict(max_len=MAX_LEN, dim=8, num_blocks=1, dropout=0.0, delta=DELTA, local_epochs=1)
# Histories of 1, 11, 21 and 51 items: W = 0, 1, 2 and 5 windows of up to 10 pairs.
HISTORIES = {w: np.arange(1, 2 + 10 * w) % NUM_ITEMS + 1 if w else np.array([3]) for w in (0, 1, 2, 5)}


def _model(seed: int = 0) -> InterestModel:
    torch.manual_seed(seed)
    return InterestModel(RunConfig(**SMALL).model_config(NUM_ITEMS))


def _opacus_epsilon(sigma: float, q: float, steps: int) -> float:
    accountant = RDPAccountant()
    accountant.history = [(sigma, q, steps)]
    return accountant.get_epsilon(DELTA)


def test_every_window_count_trains_the_same_accounted_round() -> None:
    run = RunConfig(**SMALL, noise_multiplier=1.0, batch_size=2, dp_windows=4)  # q = 1/2, 2 steps, sum / 2
    assert [len(training_windows(h, MAX_LEN)[0]) for h in HISTORIES.values()] == list(HISTORIES)
    outcomes = {}
    for windows, history in HISTORIES.items():
        ledger = PrivacyLedger(":memory:")
        result = train_locally(model=_model(), train_history=history, run=run, ledger=ledger, run_id=1, server_round=1)
        outcomes[windows] = (result.state_dict is not None, result.num_examples, result.refused, result.epsilon, ledger.history())
    # A device without windows trains too (on noise alone): a missing model would reveal W = 0.
    assert len(set(map(repr, outcomes.values()))) == 1, outcomes
    trained, weight, refused, epsilon, history = outcomes[0]
    assert trained and weight == 1 and not refused
    assert history == [(1.0, 0.5, 2)]
    assert epsilon == pytest.approx(_opacus_epsilon(1.0, 0.5, 2)) == pytest.approx(5.3770215, rel=1e-6)


@pytest.mark.parametrize("windows", [0, 5])
def test_the_noised_sum_is_divided_by_the_public_denominator(windows: int) -> None:
    # Plain SGD at lr 1 and a clipping norm so small that the clipped signal (at most C per
    # window drawn) is nothing beside the noise: the update is minus the noise, std sigma C / D
    # per coordinate and step, D = int(dp-windows * q) = 2 here whatever W is (3 steps at q = 1/3).
    sigma, clip = 2.0, 1e-4
    run = RunConfig(**SMALL, noise_multiplier=sigma, max_grad_norm=clip, batch_size=2, dp_windows=6, local_optimizer="sgd", local_lr=1.0)
    model = _model()
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    result = train_locally(model=model, train_history=HISTORIES[windows], run=run, ledger=PrivacyLedger(":memory:"), run_id=1, server_round=1)
    after = torch.cat([result.state_dict[name].reshape(-1) for name, _ in model.named_parameters()])
    step = after - before
    assert step.numel() > 2000
    assert step.std().item() == pytest.approx(sigma * clip / 2 * np.sqrt(3), rel=0.05)


def test_a_round_takes_exactly_the_steps_it_was_charged_for() -> None:
    # Opacus's sampler takes int(1 / q) steps by default: 92 for q = 1/93. The round is
    # charged 93; the device must take 93 (before the fix a device with 93 batches raised).
    run = RunConfig(**SMALL, noise_multiplier=1.0, batch_size=1, dp_windows=93, epsilon_budget=100.0)
    ledger = PrivacyLedger(":memory:")
    result = train_locally(model=_model(), train_history=HISTORIES[1], run=run, ledger=ledger, run_id=1, server_round=1)
    assert result.state_dict is not None and ledger.history() == [(1.0, 1 / 93, 93)]


def test_train_replies_of_devices_with_different_window_counts_say_the_same() -> None:
    run = RunConfig(synthetic_users=20, synthetic_items=200, **SMALL, noise_multiplier=1.0, batch_size=2, dp_windows=2)
    counts = {p: len(training_windows(load_device_data({"partition-id": p}, run).user.train, MAX_LEN)[0]) for p in range(20)}
    first, second = min(counts, key=counts.get), max(counts, key=counts.get)
    assert counts[first] < counts[second]
    model = InterestModel(run.model_config(load_device_data({"partition-id": 0}, run).num_items))
    public = (wire.NUM_EXAMPLES, wire.NUM_USERS, wire.EPSILON, wire.REFUSED)
    said = []
    for partition in (first, second):
        reply = app(message("train", model, {wire.SERVER_ROUND: 1}), partition_context(run, partition))
        assert not reply.has_error() and wire.ARRAYS in reply.content.array_records
        metrics = reply.content.metric_records[wire.METRICS]
        said.append({key: metrics[key] for key in public})
    assert said[0] == said[1]
    assert said[0][wire.NUM_EXAMPLES] == 1
