"""A device killed (SIGKILL) mid-round and restarted keeps its ledger and its history, and its store is sound."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from device_helpers import make_device, user_rows, write_csv

from fedinterest.client.budget import privacy_budget
from fedinterest.client.ingest import ingest_file
from fedinterest.client.ledger import PrivacyLedger
from fedinterest.client.privacy_policy import PrivacyPolicy, save_policy

WORKER = Path(__file__).with_name("device_train_worker.py")
HISTORY = [f"m{(7 * k) % 40 + 1}" for k in range(160)]  # 160 interactions over the 40 items


def _worker(store: Path, first: int, last: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(store), str(first), str(last)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_a_device_killed_mid_round_keeps_its_ledger_and_history(tmp_path: Path) -> None:
    device = make_device(tmp_path, num_items=40)
    with device.store() as store:
        ingest_file(store, write_csv(tmp_path / "h.csv", user_rows("u1", HISTORY)))
        history_before = store.raw_history()
        # The worker trains many rounds; the device's own privacy floor must not stop it first.
        save_policy(store, PrivacyPolicy(max_epsilon=1e6))

    process = _worker(device.store_path, 1, 100)
    done: dict[int, float] = {}
    for line in process.stdout:
        kind, server_round, *rest = line.split()
        if kind == "done":
            done[int(server_round)] = float(rest[0])
        if kind == "start" and int(server_round) == 3:
            break  # round 3 is under way: kill the device in the middle of it
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, process.stderr.read()[-2000:]
    assert sorted(done) == [1, 2]

    with device.store() as store:
        assert store.integrity_check() == "ok"
        assert store.raw_history() == history_before
        with PrivacyLedger(device.store_path) as ledger:
            charged = sorted(e.server_round for e in ledger.entries())
            epsilon_after_kill = ledger.epsilon(1e-5)
        # Every round that replied is charged; round 3 is charged only if it finished before the kill.
        assert charged in ([1, 2], [1, 2, 3])
        assert epsilon_after_kill >= done[2] > done[1] > 0

    # Restarted: the ledger is still the accountant's state, rounds already charged are not trained again.
    restarted = _worker(device.store_path, 2, 4)
    out, err = restarted.communicate(timeout=600)
    assert restarted.returncode == 0, err[-2000:]
    replies = {int(f[1]): (float(f[2]), float(f[3])) for f in (line.split() for line in out.splitlines()) if f[0] == "done"}
    assert replies[2][1] == 1.0  # round 2 was charged before the kill: a retry is refused, not trained twice
    assert replies[4][1] == 0.0 and replies[4][0] > epsilon_after_kill
    with device.store() as store:
        assert store.integrity_check() == "ok" and store.raw_history() == history_before
        report = privacy_budget(store)
        assert report.rounds == 4 and report.epsilon == replies[4][0]
        assert store.latest_model() is not None  # the global model of the last round, intact
