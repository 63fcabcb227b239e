"""Ranking metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedinterest.common.metrics import hit_rate, ndcg, reciprocal_rank, summarize, target_ranks

# Column 0 is padding; items 1..5.
SCORES = torch.tensor([[9.0, 0.9, 0.5, 0.5, 0.1, 0.7]])


def test_rank_counts_ties_against_the_target_and_ignores_padding() -> None:
    # Item 2 scores 0.5; items 1 (0.9), 5 (0.7) and 3 (tie, 0.5) are at least as high.
    assert target_ranks(SCORES, [2], [np.array([], dtype=np.int64)]).tolist() == [4]
    # Padding's 9.0 never counts; item 1 is the best real item.
    assert target_ranks(SCORES, [1], [np.array([], dtype=np.int64)]).tolist() == [1]


def test_seen_items_are_not_candidates() -> None:
    assert target_ranks(SCORES, [2], [np.array([1, 3])]).tolist() == [2]


def test_all_equal_scores_rank_last() -> None:
    scores = torch.zeros(1, 6)
    assert target_ranks(scores, [3], [np.array([1])]).tolist() == [4]


def test_target_among_seen_items_is_an_error() -> None:
    with pytest.raises(ValueError, match="excluded as already seen"):
        target_ranks(SCORES, [2], [np.array([2])])


def test_padding_is_not_a_valid_target() -> None:
    with pytest.raises(ValueError, match="not an item index"):
        target_ranks(SCORES, [0], [np.array([], dtype=np.int64)])


def test_non_finite_target_score_is_an_error() -> None:
    scores = SCORES.clone()
    scores[0, 4] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        target_ranks(scores, [4], [np.array([], dtype=np.int64)])


def test_metric_values_by_hand() -> None:
    ranks = np.array([1, 3, 10, 11])
    assert hit_rate(ranks, 10).tolist() == [1, 1, 1, 0]
    np.testing.assert_allclose(ndcg(ranks, 10), [1.0, 0.5, 1 / math.log2(11), 0.0])
    np.testing.assert_allclose(reciprocal_rank(ranks), [1.0, 1 / 3, 0.1, 1 / 11])


def test_k_larger_than_the_catalogue() -> None:
    ranks = target_ranks(SCORES, [4], [np.array([], dtype=np.int64)])
    assert ranks.tolist() == [5]  # the worst rank among 5 items
    assert hit_rate(ranks, 100).tolist() == [1.0]
    np.testing.assert_allclose(ndcg(ranks, 100), [1 / math.log2(6)])


def test_summary_averages_over_users() -> None:
    summary = summarize(np.array([1, 4]))
    assert summary["hr@10"] == 1.0
    assert summary["ndcg@10"] == pytest.approx((1.0 + 1 / math.log2(5)) / 2)
    assert summary["mrr"] == pytest.approx(0.625)
    assert summary["users"] == 2
    with pytest.raises(ValueError):
        summarize(np.array([]))
