"""The ClientApp acts out a simulated fault only in simulation (node config partition-id),
never on a real device (node config history-db)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from device_helpers import (
    TINY_RUN,
    make_device,
    message,
    store_context,
    tiny_run,
    user_rows,
    write_csv,
)
from flwr.app import Context, RecordDict

from fedinterest.client.app import app as client_app
from fedinterest.client.faults import (
    STALL_MARGIN_SECONDS,
    SimulatedFault,
    act_out,
    requested_fault,
)
from fedinterest.client.ingest import ingest_file
from fedinterest.client.ledger import PrivacyLedger
from fedinterest.common import wire
from fedinterest.common.datasets import load_split
from fedinterest.common.model import InterestModel
from fedinterest.common.run_config import RunConfig

NUM_ITEMS = 40
HISTORY = [f"m{i}" for i in (3, 9, 1, 22, 17, 5, 8, 30, 2, 11, 14, 6, 25, 33, 12, 19)]


@pytest.mark.parametrize("mode", ["fail", "timeout"])
def test_a_real_device_ignores_the_fault_mark_and_trains(tmp_path: Path, mode: str) -> None:
    device = make_device(tmp_path, num_items=NUM_ITEMS)
    with device.store() as store:
        ingest_file(store, write_csv(tmp_path / "h.csv", user_rows("u1", HISTORY)))
    run = tiny_run(NUM_ITEMS, noise_multiplier=1.0, epsilon_budget=1000.0, round_timeout=3600.0)
    torch.manual_seed(0)
    model = InterestModel(run.model_config(NUM_ITEMS))
    # round-timeout is an hour: acting out "timeout" would hang this test, "fail" would raise.
    reply = client_app(message("train", model, {wire.SERVER_ROUND: 1, wire.SIMULATED_FAULT: mode}), store_context(device.store_path, run))
    metrics = reply.content[wire.METRICS]
    assert metrics[wire.REFUSED] == 0.0 and metrics[wire.NUM_EXAMPLES] > 0 and wire.ARRAYS in reply.content
    with PrivacyLedger(device.store_path) as ledger:
        assert len(ledger.entries()) == 1  # trained and charged as on any other round


def test_a_simulated_device_fails_when_marked_and_trains_otherwise(tmp_path: Path) -> None:
    run = RunConfig(synthetic_users=4, synthetic_items=160, run_dir=str(tmp_path), noise_multiplier=0.0, **TINY_RUN)
    model = InterestModel(run.model_config(load_split(run.dataset_spec()).num_items))
    context = Context(run_id=7, node_id=3, node_config={"partition-id": 0, "num-partitions": 4}, state=RecordDict(), run_config=run.to_flower())
    with pytest.raises(SimulatedFault, match="simulated device failure"):
        client_app(message("train", model, {wire.SERVER_ROUND: 1, wire.SIMULATED_FAULT: "fail"}), context)
    reply = client_app(message("train", model, {wire.SERVER_ROUND: 1}), context)
    assert reply.content[wire.METRICS][wire.NUM_EXAMPLES] > 0


def test_requested_fault_and_act_out() -> None:
    sim, device = {"partition-id": 1, "num-partitions": 4}, {"history-db": "/x/store.sqlite"}
    assert requested_fault(sim, {wire.SIMULATED_FAULT: "timeout"}) == "timeout"
    assert requested_fault(sim, {}) is None
    assert requested_fault(device, {wire.SIMULATED_FAULT: "fail"}) is None
    assert requested_fault({**sim, **device}, {wire.SIMULATED_FAULT: "fail"}) is None  # a store means a real device
    with pytest.raises(ValueError, match="must be one of fail, timeout"):
        requested_fault(sim, {wire.SIMULATED_FAULT: "explode"})
    slept: list[float] = []
    with pytest.raises(SimulatedFault, match="simulated timeout"):
        act_out("timeout", 5.0, sleep=slept.append)
    assert slept == [5.0 + STALL_MARGIN_SECONDS]
