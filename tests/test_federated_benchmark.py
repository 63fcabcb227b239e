"""The federated benchmark names variants from their overrides and tables stored results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedinterest.benchmarks import federated
from fedinterest.common.run_files import RoundRow


@pytest.mark.parametrize(
    "overrides, variant",
    [(["noise-multiplier=0", "local-epochs=5"], "no-dp"), (["noise-multiplier=1.0"], "dp-1.0"), (["noise-multiplier=2"], "dp-2.0"), ([], "config-default"),
     (["noise-multiplier=0", "strategy=fedavgm"], "no-dp-fedavgm"),
     (["noise-multiplier=2", "local-optimizer=sgd", "strategy=fedavgm"], "dp-2.0-sgd-fedavgm"), (["strategy=fedadam", "strategy=fedavg", "noise-multiplier=0"], "no-dp")],
)
def test_variant_of(overrides: list[str], variant: str) -> None:
    assert federated.variant_of(overrides) == variant


def test_table_puts_runs_beside_popularity_and_centralized(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results, quality = tmp_path / "federated", tmp_path / "quality"
    results.mkdir()
    quality.mkdir()
    monkeypatch.setattr(federated, "RESULTS", results)
    monkeypatch.setattr(federated, "QUALITY", quality)
    (quality / "ml-100k-sasrec-seed0.json").write_text(json.dumps({
        "test": {"ndcg@10": 0.08, "hr@10": 0.15}, "popularity_test": {"ndcg@10": 0.04, "hr@10": 0.09},
        "train_seconds": 600, "commit": "abc",
    }))
    summary = {
        "dataset": "ml-100k", "variant": "dp-1.0", "test": {"ndcg@10": 0.06, "hr@10": 0.12},
        "privacy": {"dp": True, "device_epsilon_max": 7.5, "delta": 1e-5}, "rounds": 30, "clients_per_round": 100,
        "wall_seconds": 120.0, "seconds_per_device_update": 0.04, "commit": "def", "layer1_window_count_hidden": True,
    }
    (results / "ml-100k-dp-1.0.json").write_text(json.dumps(summary))
    rows = federated.table().splitlines()
    assert rows[2].startswith("| ML-100K | popularity | 0.0400 | 0.0900 | 50% |")
    assert "| ML-100K | centralized (no DP) | 0.0800 |" in rows[3]
    assert rows[4] == "| ML-100K | FedAvg dp-1.0 (last round) | 0.0600 | 0.1200 | 75% | 0.0600 | 7.50 (1e-05) | 30 x 100 | 2.0 min | 0.04 | def |"


def test_table_reports_the_round_validation_picks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(federated, "RESULTS", tmp_path)
    monkeypatch.setattr(federated, "QUALITY", tmp_path / "none")
    summary = {
        "dataset": "ml-100k", "variant": "no-dp", "test": {"ndcg@10": 0.05, "hr@10": 0.10},
        "best_valid": {"round": 20, "valid": {"ndcg@10": 0.07}, "test": {"ndcg@10": 0.065, "hr@10": 0.13}},
        "privacy": {"dp": False, "delta": 1e-5}, "rounds": 30, "clients_per_round": 100,
        "wall_seconds": 60.0, "seconds_per_device_update": 0.02, "commit": "abc",
    }
    (tmp_path / "ml-100k-no-dp-30x100.json").write_text(json.dumps(summary))
    (row,) = federated.table().splitlines()[2:]
    assert row == "| ML-100K | FedAvg no-dp (round 20) | 0.0650 | 0.1300 | - | 0.0500 | no DP | 30 x 100 | 1.0 min | 0.02 | abc |"


def test_table_names_a_server_optimizer_and_its_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(federated, "RESULTS", tmp_path)
    monkeypatch.setattr(federated, "QUALITY", tmp_path / "none")
    run = {"strategy": "fedavgm", "server-momentum": 0.9, "server-lr": 0.3, "local-lr": 0.005}
    summary = {
        "dataset": "ml-100k", "variant": "no-dp-fedavgm", "strategy": "fedavgm", "server": federated._server_settings(run),
        "test": {"ndcg@10": 0.05, "hr@10": 0.10}, "privacy": {"dp": False, "delta": 1e-5}, "rounds": 30,
        "clients_per_round": 100, "wall_seconds": 60.0, "seconds_per_device_update": 0.02, "commit": "abc",
    }
    (tmp_path / "ml-100k-no-dp-fedavgm-30x100.json").write_text(json.dumps(summary))
    (row,) = federated.table().splitlines()[2:]
    assert row.startswith("| ML-100K | FedAvgM (momentum 0.9, server lr 0.3) no-dp (last round) | 0.0500 |")
    adam = {**summary, "variant": "no-dp-sgd-fedadam", "strategy": "fedadam",
            "server": federated._server_settings({"strategy": "fedadam", "server-lr": 0.001, "server-tau": 1e-8})}
    assert federated._model_label(adam) == "FedAdam (server lr 0.001, tau 1e-08) no-dp (device SGD)"


def test_progress_line_names_the_round_and_its_figures(capsys: pytest.CaptureFixture[str]) -> None:
    federated.print_progress(RoundRow(round=3, raw={"round": 3, "answered": 90, "refused": 10, "ndcg@10": 0.05}))
    line = capsys.readouterr().err
    assert line.startswith("  round 3: answered 90 refused 10 train_loss None ndcg@10 0.05")


def test_every_variant_is_named_back_from_its_overrides() -> None:
    # A stored result is filed under variant_of(its overrides): it must be the variant that ran.
    assert {name: federated.variant_of(overrides) for name, overrides in federated.VARIANTS.items()} == {
        name: name for name in federated.VARIANTS
    }
