"""The device's privacy floor: an operator's run config cannot turn DP off, weaken delta,
or make the device spend more epsilon than its own policy allows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from device_helpers import make_device, message, store_context, tiny_run, user_rows, write_csv
from typer.testing import CliRunner

from fedinterest.client.app import app as client_app
from fedinterest.client.budget import privacy_budget
from fedinterest.client.ingest import ingest_file
from fedinterest.client.ledger import PrivacyLedger
from fedinterest.client.privacy_policy import PrivacyPolicy, apply_policy, load_policy, save_policy
from fedinterest.common import wire
from fedinterest.common.model import InterestModel
from fedinterest.simulations.cli import app as cli_app

NUM_ITEMS = 40
HISTORY = [f"m{i}" for i in (3, 9, 1, 22, 17, 5, 8, 30, 2, 11, 14, 6, 25, 33, 12, 19, 27, 4, 38, 21, 16, 7)]


def _device(tmp_path: Path, policy: PrivacyPolicy | None = None):
    device = make_device(tmp_path, num_items=NUM_ITEMS)
    with device.store() as store:
        ingest_file(store, write_csv(tmp_path / "h.csv", user_rows("u1", HISTORY)))
        if policy is not None:
            save_policy(store, policy)
    return device


def _train(device, run, server_round: int):
    torch.manual_seed(0)
    model = InterestModel(run.model_config(NUM_ITEMS))
    reply = client_app(message("train", model, {wire.SERVER_ROUND: server_round}), store_context(device.store_path, run))
    return reply.content[wire.METRICS]


def test_policy_refuses_no_dp_and_a_larger_delta_and_caps_the_budget() -> None:
    policy = PrivacyPolicy(max_epsilon=2.0, max_delta=1e-5)
    _, reason = apply_policy(policy, tiny_run(NUM_ITEMS, noise_multiplier=0.0))
    assert reason is not None and "turns DP off" in reason
    _, reason = apply_policy(policy, tiny_run(NUM_ITEMS, delta=1e-3))
    assert reason is not None and "delta 0.001 is above" in reason
    run, reason = apply_policy(policy, tiny_run(NUM_ITEMS, epsilon_budget=1000.0))
    assert reason is None and run.epsilon_budget == 2.0
    run, _ = apply_policy(policy, tiny_run(NUM_ITEMS, epsilon_budget=1.0))
    assert run.epsilon_budget == 1.0  # a stricter run budget stands


@pytest.mark.parametrize("bad", [{"max_epsilon": 0.0}, {"max_epsilon": float("inf")}, {"max_delta": 1.0}, {"max_delta": 0.0}])
def test_policy_values_are_checked(bad: dict) -> None:
    with pytest.raises(ValueError, match="the device's max"):
        PrivacyPolicy(**bad)


def test_a_run_without_dp_is_refused_by_the_clientapp_and_charges_nothing(tmp_path: Path) -> None:
    device = _device(tmp_path)
    metrics = _train(device, tiny_run(NUM_ITEMS, noise_multiplier=0.0), server_round=1)
    assert metrics[wire.REFUSED] == 1.0 and metrics[wire.NUM_EXAMPLES] == 0
    with PrivacyLedger(device.store_path) as ledger:
        assert ledger.entries() == []


def test_the_device_never_spends_more_than_its_own_maximum(tmp_path: Path) -> None:
    device = _device(tmp_path, PrivacyPolicy(max_epsilon=8.0))
    run = tiny_run(NUM_ITEMS, noise_multiplier=1.0, epsilon_budget=1000.0)  # the operator asks for far more
    refused_at = None
    for server_round in range(1, 12):
        metrics = _train(device, run, server_round)
        assert metrics[wire.EPSILON][0] <= 8.0
        if metrics[wire.REFUSED] == 1:
            refused_at = server_round
            break
    assert refused_at is not None and refused_at > 1, "the device trained until its own maximum, then refused"
    with device.store() as store:
        report = privacy_budget(store)
        assert report.budget == 8.0 and report.epsilon <= 8.0


def test_policy_command_shows_and_changes_the_policy(tmp_path: Path) -> None:
    runner = CliRunner()
    catalogue = tmp_path / "catalogue.txt"
    catalogue.write_text("".join(f"m{i}\n" for i in range(1, NUM_ITEMS + 1)))
    made = runner.invoke(cli_app, ["device", "init", str(tmp_path / "d"), "--catalogue", str(catalogue), "--max-epsilon", "4", "--json"])
    assert made.exit_code == 0, made.output
    assert json.loads(made.stdout)["privacy_policy"] == {"max_epsilon": 4.0, "max_delta": 1e-5, "share_metrics": False}
    changed = runner.invoke(cli_app, ["device", "policy", "--dir", str(tmp_path / "d"), "--max-delta", "1e-6", "--json"])
    assert changed.exit_code == 0 and json.loads(changed.stdout) == {"max_epsilon": 4.0, "max_delta": 1e-6, "share_metrics": False}
    shared = runner.invoke(cli_app, ["device", "policy", "--dir", str(tmp_path / "d"), "--share-metrics", "--json"])
    assert shared.exit_code == 0 and json.loads(shared.stdout) == {"max_epsilon": 4.0, "max_delta": 1e-6, "share_metrics": True}
    bad = runner.invoke(cli_app, ["device", "policy", "--dir", str(tmp_path / "d"), "--max-epsilon", "-1"])
    assert bad.exit_code == 2 and "max epsilon must be a positive number" in bad.output
    from fedinterest.client.device_dir import open_device_dir

    with open_device_dir(tmp_path / "d").store() as store:
        assert load_policy(store) == PrivacyPolicy(max_epsilon=4.0, max_delta=1e-6, share_metrics=True)  # the bad value changed nothing
    refused = runner.invoke(cli_app, ["device", "init", str(tmp_path / "e"), "--catalogue", str(catalogue), "--max-delta", "2"])
    assert refused.exit_code == 2 and not (tmp_path / "e").exists()  # nothing written for a bad policy
