"""The user-level benchmark asks the run to calibrate itself: the target epsilon is both
what sigma is calibrated to and the budget the server enforces."""

from __future__ import annotations

from fedinterest.benchmarks import federated
from fedinterest.benchmarks.user_privacy import overrides
from fedinterest.simulations.simulation_config import resolve_config


def test_overrides_set_the_target_and_an_equal_budget_and_keep_the_recipe():
    sets = overrides(4.0, ["item-vectors=free", "dim=32"])
    config = resolve_config(federated.CONFIGS / "toys.toml", sets).run
    assert config.user_target_epsilon == 4.0 and config.user_epsilon_budget == 4.0 and config.user_private
    assert config.user_noise_multiplier == 0.0  # the server calibrates it (tests/test_user_level_dp.py)
    assert (config.item_vectors, config.dim) == ("free", 32)
