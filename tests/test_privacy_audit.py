"""The privacy audit's attack: the AUC, the per-user losses, the member split and the table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedinterest.benchmarks import (
    membership_attack,
    privacy_audit,
    privacy_audit_models,
    privacy_audit_results,
    privacy_audit_runs,
)
from fedinterest.benchmarks.federated import VARIANTS
from fedinterest.common.examples import training_windows
from fedinterest.common.interactions import SequenceDataset
from fedinterest.common.model import InterestModel, ModelConfig, sequence_loss
from fedinterest.common.split import UserSplit, leave_one_out

# --------------------------------------------------------------------------- AUC


def test_auc_perfect_separation_is_one() -> None:
    assert membership_attack.roc_auc([3.0, 4.0, 5.0], [0.0, 1.0, 2.0]) == 1.0


def test_auc_reversed_is_zero() -> None:
    assert membership_attack.roc_auc([0.0, 1.0], [2.0, 3.0, 4.0]) == 0.0


def test_auc_all_ties_is_half() -> None:
    assert membership_attack.roc_auc([1.0] * 4, [1.0] * 7) == 0.5


def test_auc_small_case_by_hand() -> None:
    # Member/non-member pairs: 3>1 yes, 3>2 yes, 3=3 half; 2>1 yes, 2=2 half, 2<3 no -> 3.5 + ... of 6.
    # members [3, 2], non-members [1, 2, 3]: (1 + 1 + 0.5) + (1 + 0.5 + 0) = 4 of 6.
    assert membership_attack.roc_auc([3.0, 2.0], [1.0, 2.0, 3.0]) == pytest.approx(4 / 6)


def test_auc_matches_pairwise_count_on_random_scores() -> None:
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 30).astype(float)  # many ties
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert membership_attack.roc_auc(pos, neg) == pytest.approx(pairs / (40 * 30))


def test_auc_refuses_empty_or_nonfinite_scores() -> None:
    with pytest.raises(ValueError):
        membership_attack.roc_auc([], [1.0])
    with pytest.raises(ValueError):
        membership_attack.roc_auc([float("nan")], [1.0])


def test_hanley_mcneil_standard_error_at_half() -> None:
    # At AUC 0.5: Q1 = Q2 = 1/3, variance = (1/4 + (n1 - 1)/12 + (n2 - 1)/12) / (n1 n2).
    n1, n2 = 100, 80
    expected = math.sqrt((0.25 + (n1 - 1) / 12 + (n2 - 1) / 12) / (n1 * n2))
    assert membership_attack.auc_standard_error(0.5, n1, n2) == pytest.approx(expected)
    assert membership_attack.auc_standard_error(1.0, n1, n2) == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------- members


def test_membership_groups_are_the_first_users_and_the_same_size() -> None:
    groups = membership_attack.membership_groups(943, 471)
    assert groups.members == tuple(range(471))
    assert groups.nonmembers == tuple(range(471, 942))
    small = membership_attack.membership_groups(10, 7)
    assert small.members == (0, 1, 2) and small.nonmembers == (7, 8, 9)
    with pytest.raises(ValueError):
        membership_attack.membership_groups(10, 10)


def test_trained_partitions_and_membership_check(tmp_path: Path) -> None:
    devices = tmp_path / "devices"
    devices.mkdir()
    for p in (0, 3, 11):
        (devices / f"partition-{p}.sqlite").write_bytes(b"")
    (tmp_path / "flwr.log").write_text("INFO : fedinterest: 12 of 20 expected nodes registered (unchanged for 15 s); continuing\n")
    assert privacy_audit_runs.trained_partitions(tmp_path) == [0, 3, 11]
    assert privacy_audit_runs.registered_nodes(tmp_path) == 12
    assert privacy_audit_runs.check_membership(tmp_path, 12) == {"partitions_trained": 3, "max_partition_trained": 11, "nodes_registered": 12}
    with pytest.raises(RuntimeError, match="partitions \\[11\\]"):
        privacy_audit_runs.check_membership(tmp_path, 11)


# --------------------------------------------------------------------------- losses


def _tiny_model(num_items: int, max_len: int, seed: int = 0) -> InterestModel:
    torch.manual_seed(seed)
    return InterestModel(ModelConfig(num_items=num_items, max_len=max_len, dim=16, num_blocks=1, num_heads=1, dropout=0.0))


def test_user_loss_is_the_training_loss_over_the_users_pairs(one_thread: None) -> None:
    model = _tiny_model(num_items=12, max_len=4)
    one_window = UserSplit(user=0, train=np.array([1, 2, 3, 4]), valid=5, test=6)  # 3 pairs, 1 window
    three_windows = UserSplit(user=1, train=np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3]), valid=5, test=8)  # 9 pairs
    lonely = UserSplit(user=2, train=np.array([7]), valid=5, test=8)  # no pair
    losses = membership_attack.user_losses(model, [one_window, three_windows, lonely], windows_per_batch=2)

    model.eval()
    with torch.no_grad():
        inputs, targets = (torch.from_numpy(a) for a in training_windows(one_window.train, 4))
        assert losses[0] == pytest.approx(float(sequence_loss(model(inputs), targets)), rel=1e-5)
        # Several windows: the mean over all pairs (the token-weighted mean of the windows' losses).
        inputs, targets = (torch.from_numpy(a) for a in training_windows(three_windows.train, 4))
        per_window = torch.stack([sequence_loss(model(inputs[i : i + 1]), targets[i : i + 1]) for i in range(len(inputs))])
        pairs = (targets != 0).sum(dim=1).double()
        assert losses[1] == pytest.approx(float((per_window.double() * pairs).sum() / pairs.sum()), rel=1e-5)
    assert math.isnan(losses[2])
    # Batching does not change a user's loss.
    again = membership_attack.user_losses(model, [three_windows, one_window], windows_per_batch=64)
    assert again == pytest.approx([losses[1], losses[0]], rel=1e-5)


def test_popularity_losses_count_every_reference_user() -> None:
    users = [UserSplit(0, np.array([1, 1, 2]), 3, 3), UserSplit(1, np.array([2, 3]), 1, 1)]
    losses = membership_attack.popularity_losses(users, users, num_items=3)
    # Counts with add-one: item 1: 3, item 2: 3, item 3: 2, total 8.
    assert losses[0] == pytest.approx(-(math.log(3 / 8) + math.log(3 / 8)) / 2)
    assert losses[1] == pytest.approx(-math.log(2 / 8))


def _synthetic_split(num_users: int, num_items: int, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    sequences = tuple(rng.choice(np.arange(1, num_items + 1), size=int(rng.integers(8, 14)), replace=False).astype(np.int64) for _ in range(num_users))
    dataset = SequenceDataset(
        name="tiny", user_ids=tuple(f"u{u}" for u in range(num_users)), item_ids=tuple(f"i{i}" for i in range(1, num_items + 1)),
        sequences=sequences, reports=(),
    )
    return leave_one_out(dataset)


@pytest.fixture
def one_thread():
    """One torch thread (DESIGN.md): on 2 shared cores more threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_attack_finds_the_members_of_an_overfit_model(one_thread: None) -> None:
    # Random histories carry no pattern to learn: a model fit hard on users 0..7 memorises them,
    # so their training loss is far below that of users 8..15 and the attack separates them.
    split = _synthetic_split(num_users=16, num_items=30, seed=1)
    model = _tiny_model(num_items=split.num_items, max_len=16, seed=0)
    members = 8
    inputs, targets = (torch.from_numpy(np.concatenate(a)) for a in zip(*(training_windows(u.train, 16) for u in split.users[:members])))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(40):
        optimizer.zero_grad()
        sequence_loss(model(inputs), targets).backward()
        optimizer.step()

    result = membership_attack.attack(model, split, members)
    assert result["members"] == result["nonmembers"] == 8
    assert result["loss"]["auc"] > 0.9
    assert result["mean_loss"]["members"] < result["mean_loss"]["nonmembers"]
    assert 0.0 <= result["control_popularity"]["auc"] <= 1.0
    assert set(result["test_ndcg@10"]) == {"members", "nonmembers"}


def test_attack_on_an_untrained_model_learns_little() -> None:
    split = _synthetic_split(num_users=40, num_items=30, seed=2)
    model = _tiny_model(num_items=split.num_items, max_len=16, seed=3)
    result = membership_attack.attack(model, split, 20)
    assert 0.2 < result["loss"]["auc"] < 0.8  # no training: only chance separates the groups


# --------------------------------------------------------------------------- runs and table


def test_overrides_reuse_the_federated_variants() -> None:
    no_dp = privacy_audit_models.overrides_for("no-dp", members=471, rounds=20, clients_per_round=100)
    assert no_dp[:3] == VARIANTS["no-dp"] and "num-supernodes=471" in no_dp and "num-server-rounds=20" in no_dp
    layer1 = privacy_audit_models.overrides_for("layer-1", members=471, rounds=20, clients_per_round=100)
    assert layer1[: len(VARIANTS["dp-2.0"])] == VARIANTS["dp-2.0"]
    layer2 = privacy_audit_models.overrides_for("layer-2", members=471, rounds=20, clients_per_round=100)
    assert layer2[:3] == VARIANTS["no-dp"] and any(o.startswith("user-noise-multiplier=") for o in layer2)
    with pytest.raises(ValueError):
        privacy_audit_models.overrides_for("layer-3", members=471, rounds=20, clients_per_round=100)


def test_layers_1_and_2_overrides_are_a_valid_simulation_config() -> None:
    from fedinterest.simulations.simulation_config import resolve_config

    overrides = privacy_audit_models.overrides_for("layers-1+2", members=50, rounds=10, clients_per_round=10)
    config = resolve_config(privacy_audit.CONFIGS / "ml-100k.toml", overrides)
    assert config.federation.num_supernodes == 50
    assert config.run.noise_multiplier == 2.0 and config.run.max_len == 10  # layer 1 as in dp-2.0
    assert config.run.user_noise_multiplier > 0 and config.run.user_delta == pytest.approx(1 / 50)
    assert config.run.user_epsilon_budget == pytest.approx(8.05)


def test_layer2_noise_is_calibrated_for_the_target_epsilon() -> None:
    from opacus.accountants import RDPAccountant

    sigma = privacy_audit_models.user_noise_multiplier(target_epsilon=8.0, delta=1 / 50, sample_rate=0.2, rounds=10)
    accountant = RDPAccountant()
    accountant.history = [(sigma, 0.2, 10)]
    assert 7.5 < accountant.get_epsilon(delta=1 / 50) <= 8.0


def _summary(model: str, auc: float, user_epsilon: float | None = None) -> dict:
    entry = {"auc": auc, "se": 0.02}
    return {
        "dataset": "ml-100k", "model": model, "num_members": 471, "rounds": 20, "clients_per_round": 100,
        "attack": {
            "members": 471, "nonmembers": 471, "loss": entry, "calibrated": entry, "control_popularity": {"auc": 0.5, "se": 0.02},
            "test_ndcg@10": {"members": 0.05, "nonmembers": 0.04},
        },
        "test": {"ndcg@10": 0.03}, "best_valid": {"round": 15, "test": {"ndcg@10": 0.04}},
        "privacy": {"dp": model != "no-dp", "device_epsilon_max": 4.2, "delta": 1e-5},
        "user_level": None if user_epsilon is None else {"epsilon": user_epsilon, "delta": 1 / 471},
        "wall_seconds": 600.0, "commit": "abc1234",
    }


def test_table_rows_and_target_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(privacy_audit_results, "RESULTS", tmp_path)
    monkeypatch.setattr(privacy_audit_results, "QUALITY", tmp_path / "no-quality-results")
    for s in (_summary("layers-1+2", 0.52, 7.99) | {"stopped_early": "user-epsilon-budget"}, _summary("no-dp", 0.61)):
        (tmp_path / f"{s['model']}.json").write_text(json.dumps(s))
    text = privacy_audit_results.table()
    rows = [line for line in text.splitlines() if line.startswith("| no DP") or line.startswith("| layers")]
    assert rows[0].startswith("| no DP | 0.610 ± 0.020 | 0.610 ± 0.020 | 0.500 ± 0.020 | 471 / 471 | 0.0400 (round 15) | 0.0300 |")
    assert rows[1].startswith("| layers 1+2") and "| 7.99 (0.00212) |" in rows[1]
    assert "| 20 x 100 (stopped at the user-level budget) |" in rows[1] and "| 20 x 100 |" in rows[0]
    assert "python -m fedinterest.benchmarks.privacy_audit" in text
    assert "**met**" in text and "AUC 0.520 at ε 7.99" in text
    assert "Without DP the attack detects membership: AUC 0.610 (95% interval 0.571–0.649)" in text


def test_target_verdict_names_a_model_that_does_not_beat_popularity() -> None:
    below = _summary("layers-1+2", 0.50, 7.99) | {"test": {"ndcg@10": 0.003}}
    text = privacy_audit_results.target_sentence([below, _summary("layer-2", 0.53, 7.98)], popularity=0.0439)
    assert "**met**" in text and "does not learn: its test NDCG@10 0.0030 is below popularity's 0.0439" in text
    assert "Layer 2 alone (devices train without DP) at user-level ε 7.98: attack AUC 0.530" in text
    assert "(popularity 0.0439)." in text and "1 − control AUC = 0.500 here" in text
    assert "does not learn" not in privacy_audit_results.target_sentence([_summary("layers-1+2", 0.50, 7.99)], popularity=0.02)


def test_target_verdict_missed_and_not_measured() -> None:
    assert "**missed**" in privacy_audit_results.target_sentence([_summary("layers-1+2", 0.57, 8.0)])
    assert "**missed**" in privacy_audit_results.target_sentence([_summary("layers-1+2", 0.50, 12.0)])
    assert "not measured yet" in privacy_audit_results.target_sentence([_summary("no-dp", 0.7)])
