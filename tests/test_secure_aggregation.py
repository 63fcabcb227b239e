"""Secure aggregation (run-config aggregation "secagg+"): Flower's own SecAgg+ workflow and
mod, driven by the round code on a Grid of real ClientApps in this process.

The server's decoded sum equals the plain sum of the same clipped updates within the
quantization bound; devices dropping after the key exchange leave the round running down
to the threshold, with the noise calibrated to that worst case; and the server never
holds a single device's update.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from flwr.app import DEFAULT_TTL, ArrayRecord, ConfigRecord, Message, Metadata, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp.strategy import FedAvg

from fedinterest.client.app import app
from fedinterest.common import wire
from fedinterest.common.datasets import load_split
from fedinterest.common.run_config import RunConfig
from fedinterest.server.cohort import survey
from fedinterest.server.evaluation import arrays_to_numpy, initial_arrays
from fedinterest.server.reply_checks import ReplyKind
from fedinterest.server.secure_rounds import secure_train_round
from fedinterest.server.user_privacy import UserLevelAccountant, settings_of
from fedinterest.simulations.inprocess_grid import InProcessGrid, node_contexts, server_task

torch.set_num_threads(1)
# FedSGD devices (one SGD step over all windows), no on-device DP-SGD, no dropout: each
# device's update is a deterministic function of the global model, so the plain path
# computes the very update the secure path masks.
DEVICES = 5
SECURE = dict(
    synthetic_users=DEVICES, synthetic_items=160, max_len=10, dim=8, num_blocks=1, dropout=0.0, batch_size=16,
    local_optimizer="sgd", local_lr=1.0, local_epochs=1, noise_multiplier=0.0, clients_per_round=DEVICES,
    round_timeout=30.0, aggregation="secagg+", user_clip_norm=0.05,
)


class RecordingFedAvg(FedAvg):
    """FedAvg that keeps every reply it is asked to aggregate."""

    def __init__(self) -> None:
        super().__init__(arrayrecord_key=wire.ARRAYS, configrecord_key=wire.CONFIG)
        self.seen: list[Message] = []

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.seen += replies
        return super().aggregate_train(server_round, replies)


def _secure_round(config: RunConfig, drop=None, user_dp: bool = False, strategy=None):
    grid = InProcessGrid(app, node_contexts(config.to_flower(), config.synthetic_users), drop)
    num_items = load_split(config.dataset_spec()).num_items
    arrays = initial_arrays(config.model_config(num_items), config.seed)
    strategy = strategy or RecordingFedAvg()
    with server_task():
        cohort = survey(grid, grid.get_node_ids(), timeout=5)
        accountant = UserLevelAccountant.start(settings_of(config), cohort.population) if user_dp else None
        assignment = cohort.assign(range(cohort.population))
        result = secure_train_round(grid, strategy, arrays, 1, config, cohort, assignment, accountant)
    return grid, arrays, result, strategy, accountant


def _plain_updates(config: RunConfig, arrays: ArrayRecord) -> dict[int, dict[str, np.ndarray]]:
    """Each device's clipped update through the plain train path (fresh nodes, same global model)."""
    global_arrays = arrays_to_numpy(arrays)
    updates = {}
    for node_id, context in node_contexts(config.to_flower(), config.synthetic_users).items():
        metadata = Metadata(
            run_id=7, message_id=f"plain-{node_id}", src_node_id=1, dst_node_id=node_id, reply_to_message_id="",
            group_id="1", created_at=0.0, ttl=DEFAULT_TTL, message_type="train",
        )
        content = RecordDict({wire.ARRAYS: arrays, wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1, wire.SHARD_USERS: [0]})})
        reply = app(Message(content, metadata=metadata), context)
        assert not reply.has_error(), reply.error
        trained = arrays_to_numpy(reply.content[wire.ARRAYS])
        updates[node_id] = {k: trained[k].astype(np.float64) - v.astype(np.float64) for k, v in global_arrays.items()}
    return updates


def _max_abs(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def test_the_secure_sum_is_the_plain_sum_of_the_clipped_updates_within_the_quantization_bound() -> None:
    config = RunConfig(**SECURE)
    _, arrays, result, _, _ = _secure_round(config)
    updates = _plain_updates(config, arrays)
    for update in updates.values():  # every device's update was clipped to C
        assert math.sqrt(sum(float(np.sum(u**2)) for u in update.values())) <= config.user_clip_norm * (1 + 1e-5)
    plain_sum = {k: sum(u[k] for u in updates.values()) for k in result.decoded_sum}
    error = _max_abs(result.decoded_sum, plain_sum)
    bound = result.row["quantization_error_bound"]
    assert result.row["survivors"] == DEVICES and result.aggregated
    assert 0 < error <= bound, (error, bound)  # stochastic rounding: never exact, never more than one step a device
    # Without layer 2 the model moves by the mean of the clipped updates.
    released = arrays_to_numpy(result.arrays)
    base = arrays_to_numpy(arrays)
    mean_step = {k: released[k].astype(np.float64) - base[k] for k in base}
    assert _max_abs(mean_step, {k: v / DEVICES for k, v in plain_sum.items()}) < 1e-6


def test_devices_dropping_after_the_key_exchange_do_not_stop_the_round_down_to_the_threshold() -> None:
    config = RunConfig(**SECURE)  # 5 shares, threshold round(0.67 * 5) = 3: two may drop
    order = sorted(node_contexts(config.to_flower(), DEVICES))
    dropped = set(order[:2])
    grid, arrays, result, _, _ = _secure_round(config, drop=lambda stage, node: stage == "collect_masked_vectors" and node in dropped)
    assert result.row["threshold"] == 3 and result.row["survivors"] == 3 and result.aggregated
    assert result.replies.count(ReplyKind.FAILED) == 2 and result.replies.count(ReplyKind.VALID) == 3
    updates = _plain_updates(config, arrays)
    survivors_sum = {k: sum(u[k] for node, u in updates.items() if node not in dropped) for k in result.decoded_sum}
    assert _max_abs(result.decoded_sum, survivors_sum) <= result.row["quantization_error_bound"]
    # The dropped devices' keys were rebuilt from their neighbours' shares (Flower's unmask stage).
    assert grid.traffic.messages["unmask"] == 2 * 3

    one_more = set(order[:3])
    _, arrays, halted, _, _ = _secure_round(config, drop=lambda stage, node: stage == "collect_masked_vectors" and node in one_more)
    assert not halted.aggregated and halted.decoded_sum is None and halted.row["completed"] is False
    assert arrays_to_numpy(halted.arrays).keys() == arrays_to_numpy(arrays).keys()
    assert all(np.array_equal(arrays_to_numpy(halted.arrays)[k], v) for k, v in arrays_to_numpy(arrays).items())


def test_the_devices_noise_shares_add_up_to_at_least_sigma_c_for_the_worst_case_survivors() -> None:
    sigma = 2.0
    config = RunConfig(**SECURE, user_noise_multiplier=sigma)
    order = sorted(node_contexts(config.to_flower(), DEVICES))
    dropped = {order[0]}  # 4 survivors of 5, threshold 3: each device adds sigma C / sqrt(3)
    _, arrays, result, _, accountant = _secure_round(config, drop=lambda stage, node: stage == "collect_masked_vectors" and node in dropped, user_dp=True)
    updates = _plain_updates(config, arrays)
    noise = np.concatenate([(result.decoded_sum[k] - sum(u[k] for n, u in updates.items() if n not in dropped)).ravel() for k in result.decoded_sum])
    expected = sigma * config.user_clip_norm * math.sqrt(4 / 3)
    assert result.row["sum_noise_std"] == pytest.approx(expected)
    assert noise.size > 3_000 and abs(noise.std() / expected - 1) < 0.06  # 4.7 standard errors; sqrt(4/4) would be 13% off
    assert abs(noise.mean()) < 5 * expected / math.sqrt(noise.size)
    # At the threshold (the worst case the protocol lets through) the sum carries exactly sigma C: what the accountant charges.
    assert result.row["min_survivors"] == result.row["threshold"] == 3  # SecAgg over every node: m = t
    assert result.row["device_noise_std"] * math.sqrt(result.row["min_survivors"]) == pytest.approx(sigma * config.user_clip_norm)
    assert accountant.rounds == 1 and accountant.noise_multiplier == sigma


def test_secagg_plus_calibrates_the_noise_to_the_survivors_its_neighbourhoods_guarantee() -> None:
    # 7 devices, 3 neighbours each (itself and one on each side), threshold 2: every node needs
    # 2 surviving neighbours, so at least ceil(7 * 2 / 3) = 5 of the 7 vectors are in any sum decoded.
    sigma = 2.0
    config = RunConfig(**{**SECURE, "synthetic_users": 7, "clients_per_round": 7}, user_noise_multiplier=sigma, secagg_num_shares=3)
    _, arrays, result, _, _ = _secure_round(config, user_dp=True)
    assert (result.row["shares"], result.row["threshold"], result.row["min_survivors"], result.row["survivors"]) == (3, 2, 5, 7)
    updates = _plain_updates(config, arrays)
    noise = np.concatenate([(result.decoded_sum[k] - sum(u[k] for u in updates.values())).ravel() for k in result.decoded_sum])
    expected = sigma * config.user_clip_norm * math.sqrt(7 / 5)  # calibrated to t = 2 it would be sqrt(7 / 2): 58% more
    assert abs(noise.std() / expected - 1) < 0.06


def test_the_server_never_holds_a_single_devices_update(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    config = RunConfig(**SECURE)
    grid, arrays, result, strategy, _ = _secure_round(config)
    updates = _plain_updates(config, arrays)
    masked = 0
    for reply in grid.replies:
        # No array crosses in the clear (Flower's mod empties the FitRes parameters it masks).
        assert all(len(record) == 0 for record in reply.content.array_records.values())
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is None or Key.MASKED_PARAMETERS not in configs:
            continue
        vector = np.concatenate([bytes_to_ndarray(b).ravel() for b in configs[Key.MASKED_PARAMETERS]][1:]).astype(np.float64)
        update = np.concatenate([u.ravel() for u in updates[reply.metadata.src_node_id].values()])
        # Masked with uniform values mod 2^32: uncorrelated with the device's own update.
        assert abs(np.corrcoef(vector, update)[0, 1]) < 0.1
        masked += 1
    assert masked == DEVICES
    # The strategy is handed one model, the release computed from the sum.
    assert len(strategy.seen) == 1
    released = arrays_to_numpy(strategy.seen[0].content[wire.ARRAYS])
    base = arrays_to_numpy(arrays)
    for update in updates.values():
        assert _max_abs({k: released[k] - base[k] for k in base}, update) > 1e-4
    logged = caplog.text
    for update in updates.values():
        first = next(iter(update.values())).ravel()
        assert not any(f"{x:.6g}" in logged for x in first[:5] if abs(x) > 1e-6)


def test_run_config_names_the_bad_aggregation_and_the_settings_secagg_cannot_honour() -> None:
    with pytest.raises(ValueError, match="aggregation must be one of plain, secagg\\+"):
        RunConfig(**{**SECURE, "aggregation": "secagg"})
    with pytest.raises(ValueError, match="secagg-num-shares"):
        RunConfig(**SECURE, secagg_num_shares=4)
    with pytest.raises(ValueError, match="strategy krum needs the updates one by one"):
        RunConfig(**SECURE, strategy="krum")
    with pytest.raises(ValueError, match="max-update-norm"):
        RunConfig(**SECURE, max_update_norm=1.0)


def test_a_device_refuses_a_noise_multiplier_it_cannot_draw() -> None:
    from fedinterest.client.device_errors import MessageError
    from fedinterest.client.secure_contribution import contribution

    state = {"w": torch.zeros(3)}
    with pytest.raises(MessageError, match="secure-noise-multiplier"):
        contribution(state, None, 0, run=RunConfig(**SECURE), noise_multiplier=-1.0, min_survivors=2, server_round=1)
    # No user trained: the device still sends its noise share (std sigma C / sqrt(m)), so the sum keeps its noise.
    [share] = contribution({"w": torch.zeros(20_000)}, None, 0, run=RunConfig(**SECURE), noise_multiplier=1.0, min_survivors=4, server_round=1)
    assert share.std() == pytest.approx(SECURE["user_clip_norm"] / 2, rel=0.05)


def test_a_server_optimizer_steps_from_the_secure_release() -> None:
    from fedinterest.server.strategies import build_strategy

    config = RunConfig(**SECURE, strategy="fedadam", server_lr=0.01, user_noise_multiplier=1.0)
    _, arrays, result, strategy, _ = _secure_round(config, user_dp=True, strategy=build_strategy(RunConfig(**SECURE, strategy="fedadam", server_lr=0.01), DEVICES))
    assert result.aggregated and strategy.m_t is not None  # FedAdam took its step (its base set by configure_train, as in the plain path)
    moved = max(float(np.max(np.abs(arrays_to_numpy(result.arrays)[k] - v))) for k, v in arrays_to_numpy(arrays).items())
    assert 0 < moved <= 0.01 * 1.01  # Adam moves a coordinate by at most about its learning rate
