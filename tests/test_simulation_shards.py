"""`fedinterest simulate` with shards of users per virtual node (users-per-node), through
Flower's real simulation engine: users are sampled, trained and counted one by one, and a
run without DP noise is reproducible to the byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from simulation_helpers import TIMEOUT_MINUTES, write_sequences
from typer.testing import CliRunner

from fedinterest.simulations.cli import app

runner = CliRunner()

# Six users on two nodes of three; FedSGD devices (no DP noise) with dropout, so the
# reproducibility check covers the devices' own randomness too.
SHARDED = """
[run]
dataset = "sequences"
data-path = "tiny.seq"
num-server-rounds = 3
clients-per-round = 4
users-per-node = 3
local-optimizer = "sgd"
local-lr = 1.0
local-epochs = 1
batch-size = 8
noise-multiplier = 0.0
strategy = "fedadam"
server-lr = 0.01
max-len = 10
dim = 8
num-blocks = 1
dropout = 0.3
eval-every = 1
round-timeout = 120.0
seed = 4
share-metrics = true  # the devices report their loss, so the two runs compare it too
"""


def _simulate(root: Path, name: str) -> tuple[Path, dict]:
    result = runner.invoke(app, ["simulate", str(root / "sharded.toml"), "--out", str(root / name), "--json", "--timeout-minutes", TIMEOUT_MINUTES])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    return Path(payload["run_dir"]), payload


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[tuple[Path, dict], tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("shards")
    write_sequences(root / "tiny.seq", users=6)
    (root / "sharded.toml").write_text(SHARDED)
    return _simulate(root, "a"), _simulate(root, "b")


def test_users_are_sampled_and_counted_one_by_one(two_runs) -> None:
    (run_dir, payload), _ = two_runs
    resolved = json.loads((run_dir / "config.resolved.json").read_text())
    assert resolved["federation"]["num-supernodes"] == 2  # ceil(6 users / 3 per node)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert (row["sampled"], row["answered"], row["failed"], row["rejected"]) == (4, 4, 0, 0), row
        assert row["dp"] is False and row["train_loss"] is not None
    final = json.loads((run_dir / "final.json").read_text())
    assert final["counts"]["aggregated"] == 12  # 4 users a round, each its own update
    # Each user has its own account in its node's ledger.
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert 4 <= report["ledgers"]["devices_trained"] <= 6
    timings = [json.loads(line) for line in (run_dir / "timings.jsonl").read_text().splitlines()]
    assert [t["round"] for t in timings] == [1, 2, 3] and all(t["seconds"] > 0 for t in timings)


def test_the_same_config_and_seed_give_the_same_metrics_file(two_runs) -> None:
    (first, a), (second, b) = two_runs
    assert (first / "metrics.jsonl").read_bytes() == (second / "metrics.jsonl").read_bytes()
    assert a["test"] == b["test"]
