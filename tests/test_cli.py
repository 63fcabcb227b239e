"""Smoke tests of the `fedinterest` command through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fedinterest.simulations.cli import app

runner = CliRunner()
TINY = ["--synthetic-users", "60", "--synthetic-items", "200", "--epochs", "2", "--dim", "8", "--max-len", "20", "--blocks", "1"]


def test_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "centralized" in result.output


def test_centralized_writes_results_and_model(tmp_path: Path) -> None:
    result = runner.invoke(app, ["centralized", *TINY, "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert set(payload["test"]) >= {"hr@10", "ndcg@10", "ndcg@20", "mrr"}
    assert payload["dataset"]["users"] == 60
    (run_dir,) = tmp_path.iterdir()
    saved = json.loads((run_dir / "results.json").read_text())
    assert len(saved["history"]) == saved["epochs_run"] == 2
    assert (run_dir / "model.safetensors").is_file() and (run_dir / "model.json").is_file()


def test_malformed_data_fails_with_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "u.data"
    bad.write_text("1\t2\t5\t881250949\n1\t3\tfive\t881250950\n")
    result = runner.invoke(app, ["centralized", "--dataset", "ml-100k", "--data", str(bad), "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2
    assert f"{bad}:2" in result.output
    assert not (tmp_path / "runs").exists()  # nothing written for a failed run


def test_bad_options_are_named() -> None:
    result = runner.invoke(app, ["centralized", "--dataset", "ml-100k"])
    assert result.exit_code != 0
    assert "needs a path" in result.output
    result = runner.invoke(app, ["centralized", "--dataset", "nope"])
    assert "unknown dataset 'nope'" in result.output
    result = runner.invoke(app, ["centralized", "--heads", "3", "--dim", "8", *TINY[:4]])
    assert result.exit_code != 0 and "num_heads" in result.output
