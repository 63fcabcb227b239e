"""A real Flower simulation through `fedinterest simulate`: SuperLink, Ray, the ServerApp and
four ClientApps training with Opacus DP-SGD, on a tiny dataset (about a minute per run).

It runs in CI (not marked slow): it is the one test that the apps work together in
Flower's simulation engine, and that the runner notices when they do not.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from simulation_helpers import TIMEOUT_MINUTES, TINY, write_sequences
from typer.testing import CliRunner

from fedinterest.common.run_config import RunConfig
from fedinterest.simulations.cli import app

runner = CliRunner()
@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    """One successful run shared by the assertions below: (run dir, --json payload, output)."""
    root = tmp_path_factory.mktemp("e2e")
    write_sequences(root / "tiny.seq")
    (root / "tiny.toml").write_text(TINY)
    result = runner.invoke(app, ["simulate", str(root / "tiny.toml"), "--out", str(root / "runs"), "--json", "--timeout-minutes", TIMEOUT_MINUTES])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    return Path(payload["run_dir"]), payload, result.output


def test_every_round_trained_and_was_recorded(finished: tuple[Path, dict, str]) -> None:
    run_dir, payload, _ = finished
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["sampled"] == 4 and row["answered"] > 0 and row["failed"] == 0, row
        # The server rejects any reply holding more than one ArrayRecord of the model's
        # shape and a MetricRecord of exactly the documented keys (server/reply_checks.py).
        assert row["rejected"] == 0, row
        # No device shares its training loss by default (docs/privacy.md); the server evaluates.
        assert row["train_loss"] is None and row["ndcg@10"] is not None
    final = json.loads((run_dir / "final.json").read_text())
    assert final["rounds"] == 2 and final["counts"]["aggregated"] > 0
    assert set(final["test"]) >= {"hr@10", "ndcg@10"}
    assert payload["success"] and payload["rounds"] == 2 and payload["test"]["ndcg@10"] == final["test"]["ndcg@10"]
    # The popularity baseline stands beside the federated figure, on the same split.
    assert payload["popularity_test"]["users"] == final["test"]["users"] == 4
    assert json.loads((run_dir / "flower_run.json").read_text())["status"] == "finished:completed"


def test_device_epsilon_grows_from_round_to_round(finished: tuple[Path, dict, str]) -> None:
    run_dir, payload, _ = finished
    first, second = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    assert 0 < first["epsilon_max"] < second["epsilon_max"]
    assert 0 < first["epsilon_mean"] < second["epsilon_mean"]
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert report["dp"] and report["delta"] == RunConfig.delta and report["epsilon_budget"] == 1000.0
    assert report["device_epsilon"]["max"] == pytest.approx(second["epsilon_max"])
    assert report["ledgers"]["devices_trained"] == 4  # one ledger per device, under the run dir
    assert report["ledgers"]["epsilon_max"] == pytest.approx(report["device_epsilon"]["max"])
    assert "epsilon" in (run_dir / "privacy_report.md").read_text()


def test_the_global_model_moved(finished: tuple[Path, dict, str]) -> None:
    from fedinterest.server.evaluation import arrays_to_numpy, initial_arrays

    run_dir, _, _ = finished
    run = RunConfig.from_flower({k: v for k, v in json.loads((run_dir / "config.resolved.json").read_text())["run"].items()})
    manifest = json.loads((run_dir / "checkpoints" / "manifest.json").read_text())
    assert manifest["round"] == 2
    final = load_file(str(run_dir / "checkpoints" / manifest["weights"]))
    num_items = json.loads((run_dir / "final.json").read_text())["dataset"]["items"]
    initial = arrays_to_numpy(initial_arrays(run.model_config(num_items), run.seed))
    assert set(final) == set(initial)
    moved = [key for key in final if not np.array_equal(final[key], initial[key])]
    assert moved, "the checkpoint after round 2 still holds the initial model"


def test_run_dir_holds_plots_logs_and_resolved_config(finished: tuple[Path, dict, str]) -> None:
    run_dir, _, _ = finished
    for name in ("ndcg.png", "epsilon.png"):
        assert (run_dir / name).read_bytes()[:4] == b"\x89PNG"
    for name in ("config.resolved.toml", "config.resolved.json", "flwr.log", "superlink.log", "privacy_report.md"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "flwr-home" / "config.toml").is_file()


def test_an_error_inside_the_server_app_fails_the_command(tmp_path: Path) -> None:
    # The runner leaves the data to the apps when num-supernodes is given, so this bad file
    # is first read by the ServerApp: the Flower run ends finished:failed (flwr run exits 0).
    write_sequences(tmp_path / "tiny.seq", duplicate_user=True)
    (tmp_path / "tiny.toml").write_text(TINY)
    result = runner.invoke(app, ["simulate", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "runs"), "--timeout-minutes", TIMEOUT_MINUTES])
    assert result.exit_code == 1, result.output
    assert "finished:failed" in result.output
    assert "appears again" in result.output  # the ServerApp's own error, with file and line
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "flower_run.json").read_text())["status"] == "finished:failed"
    assert not (run_dir / "privacy_report.json").exists()


def test_federated_benchmark_reads_a_real_run_dir(finished: tuple[Path, dict, str]) -> None:
    from fedinterest.benchmarks.federated import summarize_run_dir

    run_dir, payload, _ = finished
    summary = summarize_run_dir(run_dir)
    assert summary["rounds"] == 2 and summary["devices"] == 4
    assert summary["test"]["ndcg@10"] == payload["test"]["ndcg@10"]
    assert summary["privacy"]["dp"] and summary["seconds_per_device_update"] > 0
