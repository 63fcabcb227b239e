"""`fedinterest simulate` with aggregation = "secagg+" through Flower's real simulation engine:
Flower's SecAgg+ workflow and mod over virtual nodes, a device failing after the key
exchange every round, user-level DP with the noise added on the devices, and the run's
reports naming the mechanism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from simulation_helpers import TIMEOUT_MINUTES, write_sequences
from typer.testing import CliRunner

from fedinterest.simulations.cli import app

runner = CliRunner()

SECURE = """
[run]
dataset = "sequences"
data-path = "tiny.seq"
num-server-rounds = 2
clients-per-round = 4
local-optimizer = "sgd"
local-lr = 1.0
local-epochs = 1
batch-size = 8
noise-multiplier = 0.0
user-noise-multiplier = 1.0
user-clip-norm = 0.1
user-delta = 0.001
user-epsilon-budget = 1000.0
aggregation = "secagg+"
fault-fraction = 0.25   # one of the four nodes fails in the masked-vector stage, after sharing its keys
max-len = 10
dim = 8
num-blocks = 1
dropout = 0.0
eval-every = 1
round-timeout = 120.0

[federation]
num-supernodes = 4
"""


@pytest.mark.slow  # about 90 s: Flower's engine, four protocol stages a round
def test_a_secure_simulation_survives_a_dropout_each_round_and_reports_its_mechanism(tmp_path: Path) -> None:
    write_sequences(tmp_path / "tiny.seq")
    (tmp_path / "secure.toml").write_text(SECURE)
    result = runner.invoke(app, ["simulate", str(tmp_path / "secure.toml"), "--out", str(tmp_path / "out"), "--json", "--timeout-minutes", TIMEOUT_MINUTES])
    assert result.exit_code == 0, result.output
    run_dir = Path(json.loads(result.stdout)["run_dir"])
    secure = [json.loads(line) for line in (run_dir / "secure_aggregation.jsonl").read_text().splitlines()]
    # Poisson sampling at q = 1 takes all four; threshold round(0.67 * 4) = 3; one fails each round.
    assert [(r["round"], r["nodes"], r["threshold"], r["survivors"], r["completed"]) for r in secure] == [(1, 4, 3, 3, True), (2, 4, 3, 3, True)]
    for row in secure:
        assert row["sum_noise_std"] >= 1.0 * 0.1  # at least sigma C, whatever dropped
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["sampled"], r["answered"], r["failed"]) for r in rows] == [(4, 3, 1), (4, 3, 1)]
    final = json.loads((run_dir / "final.json").read_text())
    user = final["privacy"]["user_level"]
    assert user["mechanism"] == "secagg+" and user["trusts_the_server"] is False and user["rounds_accounted"] == 2
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert report["aggregation"] == "secagg+"
    assert "SecAgg+" in (run_dir / "privacy_report.md").read_text()
