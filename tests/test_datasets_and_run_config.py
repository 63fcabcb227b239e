"""The dataset front door and the run config parse and check their input once."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedinterest.common.datasets import DatasetSpec, load_dataset, load_split
from fedinterest.common.interactions import DataFormatError
from fedinterest.common.run_config import RunConfig
from fedinterest.common.synthetic import SyntheticConfig


def test_spec_checks() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'movies'"):
        DatasetSpec(kind="movies")
    with pytest.raises(ValueError, match="needs a path"):
        DatasetSpec(kind="ml-1m")
    with pytest.raises(ValueError, match="takes no path"):
        DatasetSpec(path="x.csv")
    with pytest.raises(ValueError, match="k_core"):
        DatasetSpec(kind="csv", path="x.csv", k_core=0)


def test_generic_file_with_filters_reports_every_step(tmp_path: Path) -> None:
    data = tmp_path / "events.csv"
    rows = ["uid,iid,ts,stars"] + [f"u{u},i{(u + k) % 7},{1000 + k},{1 + k % 5}" for u in range(6) for k in range(6)]
    data.write_text("\n".join(rows) + "\n")
    from fedinterest.common.column_values import ColumnMap

    spec = DatasetSpec(kind="csv", path=str(data), columns=ColumnMap(user="uid", item="iid", timestamp="ts", rating="stars"), min_rating=2, k_core=2)
    dataset, truth = load_dataset(spec)
    assert truth is None
    assert dataset.reports[0].startswith(str(data))
    assert any(r.startswith("min_rating: removed 12 rows") for r in dataset.reports)
    assert any(r.startswith("k_core") for r in dataset.reports)
    assert all(len(s) == 4 for s in dataset.sequences)


def test_synthetic_split_has_planted_truth() -> None:
    dataset, truth = load_dataset(DatasetSpec(synthetic=SyntheticConfig(num_users=20, num_items=60, min_length=5, max_length=10)))
    assert truth is not None and truth.user_interests.shape[0] == 20
    assert len(load_split(DatasetSpec(synthetic=SyntheticConfig(num_users=20, num_items=60, min_length=5, max_length=10)))) == 20


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="nothere.dat"):
        load_split(DatasetSpec(kind="ml-1m", path=str(tmp_path / "nothere.dat")))


def test_run_config_round_trip_and_errors() -> None:
    config = RunConfig.from_flower({"num-server-rounds": 3, "local-lr": 1, "strategy": "fedadam"})
    assert config.local_lr == 1.0 and RunConfig.from_flower(config.to_flower()) == config
    with pytest.raises(ValueError, match="unknown run-config keys \\['bogus'\\]"):
        RunConfig.from_flower({"bogus": 1})
    with pytest.raises(ValueError, match="'batch-size' must be int"):
        RunConfig.from_flower({"batch-size": "8"})
    with pytest.raises(ValueError, match="strategy must be one of"):
        RunConfig(strategy="fedsgd")
    with pytest.raises(ValueError, match="delta must be in"):
        RunConfig(delta=0.0)
    with pytest.raises(ValueError, match="num_heads"):
        RunConfig(dim=10, num_heads=3)
    assert RunConfig(noise_multiplier=0.0).private is False
