"""Popularity released under user-level DP (common/popularity.py): one user moves the
counts by at most 1 in L2, and sigma is Opacus's for one release at the target."""

from __future__ import annotations

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedinterest.common.datasets import load_split
from fedinterest.common.popularity import (
    popularity_ranks,
    private_popularity_noise,
    private_popularity_ranks,
    user_bounded_counts,
)
from fedinterest.common.run_config import RunConfig


def test_one_user_moves_the_counts_by_at_most_one_whatever_its_history():
    rng = np.random.default_rng(0)
    histories = [rng.integers(1, 50, size=rng.integers(1, 40)) for _ in range(30)]
    histories.append(np.array([7] * 200 + [8]))  # a user repeating one item counts it once
    full = user_bounded_counts(histories, 50)
    for i in range(len(histories)):
        without = user_bounded_counts(histories[:i] + histories[i + 1 :], 50)
        assert np.linalg.norm(full - without) == pytest.approx(1.0)
    assert full[0] == 0.0  # padding never counted


@pytest.mark.parametrize(("accountant", "reference"), [("prv", PRVAccountant), ("rdp", RDPAccountant)])
def test_the_noise_spends_the_target_in_one_release(accountant, reference):
    sigma = private_popularity_noise(1.0, 1e-5, accountant)
    check = reference()
    check.history = [(sigma, 1.0, 1)]
    with np.errstate(divide="ignore"):  # PRV's log(1 - q) at q = 1 is -inf by design, as in common/popularity.py
        assert 0.98 <= check.get_epsilon(1e-5) <= 1.0
    with pytest.raises(ValueError, match="epsilon > 0"):
        private_popularity_noise(0.0, 1e-5)


def test_with_little_noise_it_ranks_like_popularity_and_with_much_it_does_not():
    split = load_split(RunConfig(synthetic_users=300, synthetic_items=200, seed=1).dataset_spec())
    exact = popularity_ranks(split, "test")
    quiet = private_popularity_ranks(split, "test", 1e-9, np.random.default_rng(0))
    loud = private_popularity_ranks(split, "test", 1e6, np.random.default_rng(0))
    # Distinct items weighted 1/sqrt(n) order items almost as raw counts do on this data.
    assert np.mean(quiet <= 10) == pytest.approx(np.mean(exact <= 10), abs=0.05)
    assert np.mean(loud <= 10) < np.mean(quiet <= 10)
