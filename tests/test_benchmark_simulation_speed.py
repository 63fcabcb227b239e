"""The simulation-speed benchmark summarises a run directory and tables the speed-up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedinterest.benchmarks import simulation_speed


def _run_dir(path: Path, seconds: list[float]) -> Path:
    path.mkdir()
    (path / "config.resolved.json").write_text(json.dumps({
        "run": {"dataset": "ml-100k", "clients-per-round": 100}, "federation": {"num-supernodes": 943},
        "command": ["fedinterest", "simulate", "x.toml"], "commit": "abc",
    }))
    (path / "final.json").write_text(json.dumps({"rounds": len(seconds), "wall_seconds": sum(seconds) + 30}))
    (path / "metrics.jsonl").write_text("".join(json.dumps({"round": i + 1, "seconds": s}) + "\n" for i, s in enumerate(seconds)))
    return path


def test_the_first_and_last_rounds_are_left_out_of_the_median(tmp_path: Path) -> None:
    summary = simulation_speed.summarize_run_dir(_run_dir(tmp_path / "run", [60.0, 20.0, 24.0, 22.0, 90.0]), "stock")
    assert summary["seconds_per_round"] == 22.0
    assert summary["seconds_per_device_update"] == pytest.approx(0.22)
    assert summary["round_seconds"] == [60.0, 20.0, 24.0, 22.0, 90.0]


def test_table_gives_the_speed_up_over_flowers_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(simulation_speed, "RESULTS", tmp_path)
    for lookup, seconds in (("stock", [50.0, 24.0, 24.0, 60.0]), ("per-node", [40.0, 8.0, 8.0, 50.0])):
        summary = simulation_speed.summarize_run_dir(_run_dir(tmp_path / lookup, seconds), lookup)
        (tmp_path / f"ml-100k-{lookup}.json").write_text(json.dumps(summary))
    rows = simulation_speed.table().splitlines()[2:]
    assert rows[0] == "| ML-100K | 943 | Flower 1.41 (stock) | 24.0 | 0.240 | 1.0x | - | 4 x 100 | abc |"
    assert rows[1] == "| ML-100K | 943 | per-node (fedinterest) | 8.0 | 0.080 | 3.0x | - | 4 x 100 | abc |"


def test_too_few_rounds_is_refused() -> None:
    with pytest.raises(SystemExit):
        simulation_speed.main(["--rounds", "2", "--table-only"])


def test_local_training_is_timed_on_the_datasets_own_devices() -> None:
    seconds = simulation_speed.local_training_seconds("synthetic", rounds=3, users=3)
    assert seconds > 0
