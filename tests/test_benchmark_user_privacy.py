"""The user-level benchmark calibrates sigma so that the server's own accountant lands on the target."""

from __future__ import annotations

import pytest

from fedinterest.benchmarks.user_privacy import BUDGET_SLACK, calibrated_noise, overrides
from fedinterest.server.user_privacy import UserDPSettings, UserLevelAccountant


@pytest.mark.parametrize("target", [1.0, 4.0, 8.0])
def test_calibrated_sigma_spends_the_target_within_the_enforced_budget(target):
    users, per_round, rounds = 943, 100, 30
    sigma = calibrated_noise(target, users, per_round, rounds)
    settings = UserDPSettings(noise_multiplier=sigma, clip_norm=1.0, delta=1 / users, epsilon_budget=target * BUDGET_SLACK, clients_per_round=per_round)
    accountant = UserLevelAccountant.start(settings, users)
    for _ in range(rounds - 1):
        accountant.record_release(users)
    assert not accountant.would_exceed(users)  # the last round still fits the enforced budget
    accountant.record_release(users)
    assert target * 0.98 <= accountant.epsilon() <= target * BUDGET_SLACK


def test_overrides_name_every_layer_two_key():
    sets = dict(item.split("=", 1) for item in overrides(8.0, 943, 100, 30, 1.0, "no-dp"))
    assert float(sets["user-noise-multiplier"]) > 0 and sets["user-clip-norm"] == "1"
    assert float(sets["user-delta"]) == pytest.approx(1 / 943) and float(sets["user-epsilon-budget"]) == pytest.approx(8 * BUDGET_SLACK)
    assert sets["noise-multiplier"] == "0" and sets["num-server-rounds"] == "30"
