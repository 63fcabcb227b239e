"""benchmarks/signal_noise.py: the mean clipped update is bounded by C, and the noise norm is the run's own sigma * C * sqrt(d) / E."""

from __future__ import annotations

import math

import pytest
from opacus.accountants.utils import get_noise_multiplier

from fedinterest.benchmarks.signal_noise import measure


def test_signal_is_a_mean_of_clipped_updates_and_noise_follows_the_runs_calibration() -> None:
    result = measure("demo", 8.0, None, users=40)
    assert result["users_measured"] == 40 and 0 < result["signal_norm"] <= 1.0 + 1e-6  # a mean of vectors of norm <= C
    q = 2000 / 10000  # demo.toml: clients-per-round over synthetic-users
    sigma = get_noise_multiplier(target_epsilon=8.0, target_delta=10000 ** -1.1, sample_rate=q, steps=20, accountant="prv", epsilon_tolerance=0.005)
    assert result["sigma"] == pytest.approx(sigma, rel=1e-6)
    assert result["noise_norm"] == pytest.approx(sigma * math.sqrt(result["noised_parameters"]) / (q * 10000), rel=1e-6)
