"""DP-AdamBC (server/noise_aware_adam.py): Adam's second moment discounts the known noise variance."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam
from scripted_grid import ScriptedGrid, as_server_task

from fedinterest.common.wire import ARRAYS, METRICS, NUM_EXAMPLES
from fedinterest.server.noise_aware_adam import NoiseAwareFedAdam

COORDS, PHI = 40_000, 1e-4  # noise std 0.01 per coordinate
ONE_NODE = {"min_available_nodes": 1, "min_train_nodes": 1}  # the scripted grid has one node
SIGNAL = 0.02  # a steady pseudo-gradient of twice the noise's std: signal^2 = 4 Phi


def _reply(arrays: dict[str, np.ndarray]) -> Message:
    content = RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}), METRICS: MetricRecord({NUM_EXAMPLES: 1})})
    return Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)


def _run(strategy: FedAdam, rounds: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Feed `rounds` noisy pseudo-gradients SIGNAL + N(0, PHI); (last step, v_t)."""
    rng = np.random.default_rng(seed)
    current = {"w": np.zeros(COORDS)}
    with as_server_task():
        for server_round in range(1, rounds + 1):
            strategy.configure_train(server_round, ArrayRecord({k: Array(v) for k, v in current.items()}), ConfigRecord(), ScriptedGrid([1]))
            released = {"w": current["w"] + SIGNAL + rng.normal(0, np.sqrt(PHI), COORDS)}
            new, _ = strategy.aggregate_train(server_round, [_reply(released)])
            step = new["w"].numpy() - current["w"]
            current = {"w": new["w"].numpy()}
    return step, strategy.v_t["w"]


def test_the_second_moment_is_corrected_for_the_noise_and_fedadam_is_not() -> None:
    eta, rounds = 1e-3, 300
    plain = FedAdam(eta=eta, tau=1e-9, beta_2=0.99, **ONE_NODE)
    corrected = NoiseAwareFedAdam(eta=eta, tau=1e-9, beta_2=0.99, noise_floor=0.01, **ONE_NODE)
    corrected.noise_variance = PHI
    plain_step, plain_v = _run(plain, rounds)
    corrected_step, corrected_v = _run(corrected, rounds)
    # Both keep E[d^2] = signal^2 + Phi in v_t; only the corrected one steps by m / sqrt(v - Phi).
    v_hat = corrected_v / (1 - 0.99**rounds)
    assert np.mean(v_hat) == pytest.approx(SIGNAL**2 + PHI, rel=0.03)
    assert np.mean(plain_v) == pytest.approx((1 - 0.99**rounds) * (SIGNAL**2 + PHI), rel=0.03)  # Flower's v_t: no bias correction
    # Steps along the signal: about eta * s / sqrt(s^2 + Phi) = 0.89 eta for FedAdam, about eta without the noise's share.
    assert np.median(plain_step) == pytest.approx(eta * SIGNAL / np.sqrt(SIGNAL**2 + PHI), rel=0.05)
    assert np.median(corrected_step) == pytest.approx(eta, rel=0.08)


def test_a_pure_noise_coordinate_is_floored_not_divided_by_zero() -> None:
    strategy = NoiseAwareFedAdam(eta=1e-3, tau=1e-9, noise_floor=1.0, **ONE_NODE)
    strategy.noise_variance = 1.0  # far more noise than signal: v - Phi < 0 everywhere
    step, _ = _run(strategy, 5)
    assert np.all(np.isfinite(step)) and np.max(np.abs(step)) < 1e-3 * 0.2  # eta * m / sqrt(1 * Phi), m ~ a few 0.01


def test_without_noise_variance_it_is_adam_with_kingma_bias_correction() -> None:
    strategy = NoiseAwareFedAdam(eta=1e-2, tau=1e-15, noise_floor=1.0, **ONE_NODE)
    step, _ = _run(strategy, 1)
    # Round 1: m = (1 - b1) d, v = (1 - b2) d^2, both bias-corrected: a step of eta * sign(d).
    assert np.allclose(np.abs(step), 1e-2, rtol=1e-4)
    with pytest.raises(ValueError, match="noise_floor"):
        NoiseAwareFedAdam(noise_floor=0.0)
