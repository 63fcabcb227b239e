"""A device's error reply never carries its data (issue 13, defect 6).

Flower sends the server `str(type(ex)) + ":<'" + str(ex) + "'>"` for an exception a
ClientApp handler raises (flwr/supernode/runtime/run_clientapp.py; the simulation engine
does the same). Before the fix any exception went back as it was, so a failure whose
text held items of the history sent them to the server. Now only errors about what the
server sent (and simulated faults) keep their text; anything else is logged on the
device and replaced by a DeviceError naming the handler and the exception's type.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from device_helpers import message, partition_context
from flwr.app import Context, Message

import fedinterest.client.app as client_app_module
from fedinterest.client.app import app
from fedinterest.client.data_source import load_device_data
from fedinterest.common import wire
from fedinterest.common.model import InterestModel
from fedinterest.common.run_config import RunConfig

torch.set_num_threads(1)
RUN = RunConfig(synthetic_users=20, synthetic_items=160, max_len=10, dim=8, num_blocks=1, dropout=0.0, batch_size=4)


def _context(run_config: dict) -> Context:
    """Virtual node 3's context, with the run config as the server sent it (maybe unparsable)."""
    return dataclasses.replace(partition_context(RUN, 3), run_config=run_config)


def _message(kind: str, config: dict) -> Message:
    torch.manual_seed(0)
    return message(kind, InterestModel(RUN.model_config(load_device_data({"partition-id": 0}, RUN).num_items)), config)


def _flower_reason(exc: BaseException) -> str:
    """The error reason Flower's runtime sends to the server for `exc`."""
    return str(type(exc)) + ":<'" + str(exc) + "'>"


def test_a_failure_holding_history_items_reaches_the_server_without_them(monkeypatch, caplog) -> None:
    user = load_device_data({"partition-id": 3}, RUN).user
    items = " ".join(str(int(i)) for i in user.train)

    def failing(**kwargs):
        raise RuntimeError(f"cannot train on the window {items}")  # what a bug deep in training might say

    monkeypatch.setattr(client_app_module, "train_shard", failing)
    with caplog.at_level(logging.ERROR, logger="flwr.fedinterest"), pytest.raises(Exception) as raised:
        app(_message("train", {wire.SERVER_ROUND: 1}), _context(RUN.to_flower()))
    reason = _flower_reason(raised.value)
    assert items not in reason and "window" not in reason
    assert "train" in reason and "RuntimeError" in reason
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert items in caplog.text  # the device keeps the details in its own log


def test_errors_about_what_the_server_sent_keep_their_text() -> None:
    with pytest.raises(ValueError, match="outside this node's 1") as raised:
        app(_message("train", {wire.SERVER_ROUND: 1, wire.SHARD_USERS: [5]}), _context(RUN.to_flower()))
    assert "[5]" in _flower_reason(raised.value)
    with pytest.raises(ValueError, match="unknown run-config keys \\['no-such-key'\\]"):
        app(_message("evaluate", {}), _context({**RUN.to_flower(), "no-such-key": 1}))
