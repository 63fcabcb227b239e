"""Replies hold no noiseless function of a device's data beyond what docs/privacy.md lists (issue 13, defect 4).

Before the fix every train reply carried `train-loss` (with dropout 0, the global model's
loss on the device's windows to 7 digits) and every evaluate reply `hr@10` / `ndcg@10`
(the exact rank of the held-out item when in the top 10). Now they are sent only when the
run sets share-metrics and, on a real device, the device's own policy allows it; the
round loop and a deployment's evaluation report null without them.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from device_helpers import make_device, partition_context, store_context, tiny_run, user_rows, write_csv
from device_helpers import message as device_message
from reply_helpers import deployed_device
from scripted_grid import ScriptedGrid, as_server_task

from fedinterest.client.app import app
from fedinterest.client.data_source import load_device_data
from fedinterest.client.ingest import ingest_file
from fedinterest.client.privacy_policy import PrivacyPolicy, save_policy
from fedinterest.common import wire
from fedinterest.common.model import InterestModel
from fedinterest.common.run_config import RunConfig
from fedinterest.common.run_files import METRICS_FILE, read_jsonl
from fedinterest.server.rounds import run

torch.set_num_threads(1)
PRIVACY_MD = Path(__file__).resolve().parents[1] / "docs" / "privacy.md"
SIMULATED = dict(synthetic_users=20, synthetic_items=160, max_len=10, dim=8, num_blocks=1, dropout=0.0, batch_size=4)


def _replies(run_config: RunConfig, partition: int) -> tuple[set[str], set[str]]:
    """The metric keys of one node's train and evaluate replies."""
    torch.manual_seed(0)
    model = InterestModel(run_config.model_config(load_device_data({"partition-id": 0}, run_config).num_items))
    trained = app(device_message("train", model, {wire.SERVER_ROUND: 1}), partition_context(run_config, partition))
    evaluated = app(device_message("evaluate", model, {wire.STAGE: "valid"}), partition_context(run_config, partition))
    assert not trained.has_error() and not evaluated.has_error()
    return set(trained.content[wire.METRICS].keys()), set(evaluated.content[wire.METRICS].keys())


def test_by_default_replies_carry_no_loss_and_no_rank() -> None:
    for dp in (1.0, 0.0):
        train_keys, eval_keys = _replies(RunConfig(**SIMULATED, noise_multiplier=dp), partition=3)
        assert train_keys == set(wire.TRAIN_REPLY_METRICS) and wire.TRAIN_LOSS not in train_keys
        assert eval_keys == set(wire.EVAL_REPLY_METRICS) and not eval_keys & {wire.HIT_RATE_10, wire.NDCG_10}


def test_share_metrics_adds_exactly_the_shared_metrics() -> None:
    train_keys, eval_keys = _replies(RunConfig(**SIMULATED, share_metrics=True), partition=3)
    assert train_keys == set(wire.TRAIN_REPLY_METRICS + wire.SHARED_TRAIN_METRICS)
    assert eval_keys == set(wire.EVAL_REPLY_METRICS + wire.SHARED_EVAL_METRICS)


@pytest.mark.parametrize("policy_allows", [False, True])
def test_a_real_device_shares_only_if_its_own_policy_allows(tmp_path: Path, policy_allows: bool) -> None:
    device = make_device(tmp_path)
    with device.store() as store:
        ingest_file(store, write_csv(tmp_path / "h.csv", user_rows("u1", [f"m{i}" for i in range(1, 16)])))
        save_policy(store, PrivacyPolicy(share_metrics=policy_allows))
    run_config = tiny_run(40, share_metrics=True)  # the operator asks for them either way
    model = InterestModel(run_config.model_config(40))
    trained = app(device_message("train", model, {wire.SERVER_ROUND: 1}), store_context(device.store_path, run_config))
    evaluated = app(device_message("evaluate", model, {wire.STAGE: "test"}), store_context(device.store_path, run_config))
    assert (wire.TRAIN_LOSS in trained.content[wire.METRICS].keys()) is policy_allows
    assert (wire.NDCG_10 in evaluated.content[wire.METRICS].keys()) is policy_allows
    assert evaluated.content[wire.METRICS][wire.NUM_EXAMPLES] == 1


def _documented() -> dict[tuple[str, str], tuple[str, str]]:
    """(reply, key) -> (sent, guarantee) from the table of docs/privacy.md, "What leaves the device"."""
    section = PRIVACY_MD.read_text(encoding="utf-8").split("## What leaves the device", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (train|evaluate) \| `([^`]+)` \| ([^|]+) \|[^|]*\| ([^|]+) \|$", section, flags=re.M)
    return {(reply, key): (sent.strip(), guarantee.strip()) for reply, key, sent, guarantee in rows}


def test_the_privacy_docs_list_exactly_what_replies_hold() -> None:
    documented = _documented()
    expected = {("train", k): "always" for k in wire.TRAIN_REPLY_METRICS} | {("train", k): "shared only" for k in wire.SHARED_TRAIN_METRICS}
    expected |= {("train", k): "adaptive clipping only" for k in wire.ADAPTIVE_TRAIN_METRICS}
    expected |= {("evaluate", k): "always" for k in wire.EVAL_REPLY_METRICS} | {("evaluate", k): "shared only" for k in wire.SHARED_EVAL_METRICS}
    assert {key: sent for key, (sent, _) in documented.items()} == expected
    for key, (sent, guarantee) in documented.items():
        assert guarantee.startswith(("inside", "outside", "**outside**")), key
        if sent == "shared only":  # a noiseless function of the data is never claimed to be covered
            assert guarantee.startswith("**outside**"), key


# --- the server without the shared metrics ------------------------------------------------


@pytest.fixture
def server_task():
    with as_server_task():
        yield


def test_the_round_loop_and_a_deployments_evaluation_report_null_without_shared_metrics(tmp_path: Path, server_task) -> None:
    base = RunConfig(dataset="deployed", num_items=30, max_len=8, dim=8, num_blocks=1, dropout=0.0, num_server_rounds=1,
                     clients_per_round=3, eval_every=1, round_timeout=5.0)
    for share in (False, True):
        cfg = dataclasses.replace(base, run_dir=str(tmp_path / str(share)))
        final = run(ScriptedGrid({n: deployed_device(share=share) for n in (1, 2, 3)}), cfg)
        row = read_jsonl(tmp_path / str(share) / METRICS_FILE)[0]
        assert final["rounds"] == 1 and final["counts"]["aggregated"] == 3
        assert final["test"]["users"] == 3 and final["test"]["users_with_metrics"] == (3 if share else 0)
        if share:
            assert row["train_loss"] == pytest.approx(2.0) and final["test"][wire.NDCG_10] == pytest.approx(0.5)
        else:
            assert row["train_loss"] is None and final["test"][wire.NDCG_10] is None and row[wire.NDCG_10] is None
