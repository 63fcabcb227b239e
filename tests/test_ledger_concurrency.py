"""Two rounds trained at once on one device's ledger never spend more than the budget (issue 13, defect 3).

Flower's executor can start the next ClientApp process before the previous one ended, so
two rounds can overlap on one ledger. Before the fix, train_locally checked the budget,
trained and only then recorded the round: both rounds passed the check and the device
ended above its budget (7.08 against 6 here).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from fedinterest.client.ledger import PrivacyLedger
from fedinterest.client.local_training import train_locally
from fedinterest.common.model import InterestModel
from fedinterest.common.run_config import RunConfig

DELTA = 1e-5
# One window and an expected batch of 1: q = 1, one step a round. Opacus's RDP accountant
# gives epsilon 4.73 after one such round at sigma 1 and 7.08 after two.
BUDGET = 6.0


def test_overlapping_rounds_on_one_ledger_stay_within_the_budget(tmp_path: Path) -> None:
    path = tmp_path / "device.sqlite"
    PrivacyLedger(path).close()
    run = RunConfig(max_len=10, dim=8, num_blocks=1, dropout=0.0, batch_size=1, noise_multiplier=1.0, epsilon_budget=BUDGET, delta=DELTA)
    history = np.arange(1, 8)  # 6 pairs: one window of max-len 10
    start = threading.Barrier(2)
    results = {}

    def one_round(server_round: int) -> None:
        torch.manual_seed(server_round)
        model = InterestModel(run.model_config(num_items=20))
        with PrivacyLedger(path) as ledger:  # each round in its own process has its own connection
            start.wait()
            results[server_round] = train_locally(model=model, train_history=history, run=run, ledger=ledger, run_id=1, server_round=server_round)

    threads = [threading.Thread(target=one_round, args=(r,)) for r in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    trained = [r for r, result in results.items() if not result.refused]
    with PrivacyLedger(path) as ledger:
        spent = ledger.epsilon(DELTA)
        charged = [e.server_round for e in ledger.entries()]
    assert len(trained) == 1 and charged == trained
    assert spent <= BUDGET
    assert abs(spent - 4.73) < 0.01
