"""Faults in real Flower simulations: a fraction of the sampled devices failing, and the
whole server side SIGKILLed mid-run and resumed with `fedinterest simulate --resume`.

Device-side DP noise is unseeded on purpose, so these compare structure and accounting
(rounds, counts, ledgers), not weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from simulation_helpers import TIMEOUT_MINUTES, TINY, write_sequences
from typer.testing import CliRunner

from fedinterest.simulations.cli import app
from fedinterest.simulations.privacy_report import ledger_epsilons

runner = CliRunner()


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_thirty_percent_of_devices_failing_still_completes_aggregated_rounds(tmp_path: Path) -> None:
    write_sequences(tmp_path / "tiny.seq", users=10)
    (tmp_path / "tiny.toml").write_text(TINY)
    sets = ["num-supernodes=10", "clients-per-round=10", "fault-fraction=0.3", "fault-mode=fail", "min-replies=5", "eval-every=2", "share-metrics=true"]
    result = runner.invoke(app, [
        "simulate", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "runs"), "--json", "--timeout-minutes", TIMEOUT_MINUTES,
        *(x for item in sets for x in ("--set", item)),
    ])
    assert result.exit_code == 0, result.output
    run_dir = Path(json.loads(result.stdout)["run_dir"])
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        # 3 of the 10 sampled devices raise in the ClientApp: error replies, counted as failed.
        assert (row["sampled"], row["failed"], row["answered"], row["rejected"]) == (10, 3, 7, 0), row
        assert row["train_loss"] is not None
    final = json.loads((run_dir / "final.json").read_text())
    assert final["rounds"] == 2 and final["counts"]["failed"] == 6
    assert final["counts"]["aggregated"] == 14 and final["counts"]["rounds_without_update"] == 0
    assert "simulated device failure" in (run_dir / "flwr.log").read_text(errors="replace")


def _descendants(pid: int) -> set[int]:
    """Every live descendant of `pid` (from /proc), so none outlives the kill."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = set(), [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _kill_everything(process: subprocess.Popen) -> None:
    """SIGKILL the command's process group, then any descendant that left it (Ray starts its own sessions)."""
    pids = _descendants(process.pid)
    os.killpg(process.pid, signal.SIGKILL)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)


def _ledgers(run_dir: Path, delta: float) -> dict[str, tuple[float, int]]:
    return ledger_epsilons(run_dir, delta)  # every user's account in the node ledgers


def test_server_killed_mid_run_resumes_without_lost_or_repeated_rounds(tmp_path: Path) -> None:
    rounds = 4
    write_sequences(tmp_path / "tiny.seq")
    (tmp_path / "tiny.toml").write_text(TINY)
    command = [
        str(Path(sys.executable).parent / "fedinterest"), "simulate", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "runs"),
        "--set", f"num-server-rounds={rounds}", "--timeout-minutes", TIMEOUT_MINUTES,
    ]
    with open(tmp_path / "first.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        manifest = None
        while time.monotonic() < deadline and process.poll() is None:
            found = list((tmp_path / "runs").glob("*/checkpoints/manifest.json"))
            if found and json.loads(found[0].read_text())["round"] >= 1:
                manifest = found[0]
                break
            time.sleep(0.2)
        assert manifest is not None, (tmp_path / "first.log").read_text(errors="replace")
    finally:
        if process.poll() is None:
            _kill_everything(process)
    run_dir = manifest.parents[1]
    before = json.loads(manifest.read_text())  # the checkpoint the kill left behind
    killed_after = before["round"]
    assert 1 <= killed_after < rounds, "the run finished before it could be killed"
    assert not (run_dir / "final.json").exists()
    delta = json.loads((run_dir / "config.resolved.json").read_text())["run"]["delta"]
    ledgers_before = _ledgers(run_dir, delta)
    assert len(ledgers_before) == 4 and all(charged >= killed_after for _, charged in ledgers_before.values())

    result = runner.invoke(app, ["simulate", "--resume", str(run_dir), "--json", "--timeout-minutes", TIMEOUT_MINUTES])
    assert result.exit_code == 0, result.output
    assert Path(json.loads(result.stdout)["run_dir"]) == run_dir

    assert [r["round"] for r in _rows(run_dir)] == list(range(1, rounds + 1))  # none lost, none repeated
    final = json.loads((run_dir / "final.json").read_text())
    assert final["rounds"] == rounds and final["resumed_after_round"] == killed_after
    assert final["counts"]["sampled"] == 4 * rounds and final["counts"]["aggregated"] > 0
    # The server's privacy tally carried over: every device it knew before the kill is still there, no lower.
    after = json.loads((run_dir / "checkpoints" / "manifest.json").read_text())
    for node, eps in before["privacy"]["device_epsilon_max"].items():
        assert after["privacy"]["device_epsilon_max"][node] >= eps
    # The devices' own ledgers were not reset: each charged the resumed rounds on top of the earlier ones.
    ledgers_after = _ledgers(run_dir, delta)
    assert set(ledgers_after) == set(ledgers_before)
    for device, (eps, charged) in ledgers_after.items():
        assert eps > ledgers_before[device][0] and charged >= ledgers_before[device][1] + (rounds - killed_after)
    assert (run_dir / "flwr-home.1").is_dir() and (run_dir / "flwr-home" / "config.toml").is_file()
    assert len(json.loads((run_dir / "config.resolved.json").read_text())["resumes"]) == 1


def test_resume_refuses_a_missing_run_dir_and_other_overrides(tmp_path: Path) -> None:
    result = runner.invoke(app, ["simulate", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "not a run directory" in result.output
    (tmp_path / "config.resolved.json").write_text(json.dumps({"run": {}, "federation": {"num-supernodes": 2}}))
    result = runner.invoke(app, ["simulate", "--resume", str(tmp_path), "--set", "seed=4"])
    assert result.exit_code == 2 and "--resume takes only num-server-rounds" in result.output
    result = runner.invoke(app, ["simulate"])
    assert result.exit_code == 2 and "either CONFIG" in result.output


@pytest.mark.parametrize("bad, message", [("fault-fraction=1.5", "fault-fraction must be in [0, 1]"), ("fault-mode=explode", "fault-mode must be one of")])
def test_fault_settings_are_checked(tmp_path: Path, bad: str, message: str) -> None:
    (tmp_path / "tiny.toml").write_text(TINY)
    result = runner.invoke(app, ["simulate", str(tmp_path / "tiny.toml"), "--set", bad])
    assert result.exit_code == 2 and message in result.output
