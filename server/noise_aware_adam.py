"""FedAdam that discounts the known variance of the user-level DP noise (DP-AdamBC).

Under layer 2 (server/user_privacy.py) every round's pseudo-gradient is the clipped mean
plus Gaussian noise of known variance Phi = (sigma C / E)^2 per coordinate. Adam's
second moment then estimates signal^2 + Phi, and where the noise dominates it divides
every step by about sqrt(Phi): Adam turns into plain SGD with a rescaled learning rate
(Tang, Mironov, Szegedy & Zhang, "DP-AdamBC: Your DP-Adam Is Actually DP-SGD (Unless You
Apply Bias Correction)", AAAI 2024). The correction subtracts Phi from the bias-corrected
second moment before the step and floors the result at `floor * Phi`, so a coordinate
that carries only noise moves like DP-SGD at step eta / sqrt(floor * Phi) instead of
dividing by zero:

    m_t = b1 m + (1 - b1) d_t        v_t = b2 v + (1 - b2) d_t^2
    x  += eta * (m_t / (1 - b1^t)) / (sqrt(max(v_t / (1 - b2^t) - Phi, floor * Phi)) + tau)

It is post-processing of the released models (the noise is already in them), so it
costs no privacy. Layer 2 sets `noise_variance` before every aggregation (its strategy
wrapper, server/user_dp_strategy.py, or server/secure_rounds.py under SecAgg+); with
`noise_variance` 0 the step is Flower's FedAdam's form with Kingma & Ba's bias correction.
The moments `m_t` / `v_t` are Flower's, so checkpoints keep them as for FedAdam.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg


class NoiseAwareFedAdam(FedAdam):
    """Flower's FedAdam with the second moment corrected for a known noise variance."""

    def __init__(self, *args: Any, noise_floor: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not noise_floor > 0:
            raise ValueError(f"noise_floor must be positive, got {noise_floor}")
        self.noise_floor = noise_floor
        self.noise_variance = 0.0  # Phi, per coordinate of the pseudo-gradient; set every round

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The mean of the replies (FedAvg), then the corrected Adam step from the current arrays."""
        aggregated, metrics = FedAvg.aggregate_train(self, server_round, replies)
        if aggregated is None:
            return aggregated, metrics
        delta, m_t, _ = self._compute_deltat_and_mt(aggregated)  # also updates self.m_t
        if not self.v_t:
            self.v_t = {k: np.zeros_like(v) for k, v in delta.items()}
        self.v_t = {k: self.beta_2 * v + (1 - self.beta_2) * delta[k] ** 2 for k, v in self.v_t.items()}
        m_scale, v_scale = 1 - self.beta_1**server_round, 1 - self.beta_2**server_round
        phi = self.noise_variance
        new = {}
        assert self.current_arrays is not None  # _compute_deltat_and_mt raises without them
        for key, current in self.current_arrays.items():
            v_hat = self.v_t[key] / v_scale
            if phi > 0:
                v_hat = np.maximum(v_hat - phi, self.noise_floor * phi)
            new[key] = current + self.eta * (m_t[key] / m_scale) / (np.sqrt(v_hat) + self.tau)
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in new.items()}), metrics
