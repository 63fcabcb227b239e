"""The synthetic generator: determinism, validation, history invariants, planted signals."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedinterest.common.interactions import to_sequences
from fedinterest.common.split import leave_one_out
from fedinterest.common.synthetic import (
    SEQUENTIAL_WINDOW,
    PlantedTruth,
    SyntheticConfig,
    chance_interest_precision,
    generate,
    interest_precision,
    item_positions,
    user_positions,
)

SMALL = SyntheticConfig(num_users=200, seed=3)


def histories(table) -> list[np.ndarray]:
    """Per-user item positions in table order (the table is grouped by user, u0 first)."""
    users = np.array([int(u[1:]) for u in table.users])
    items = np.array([int(i[1:]) for i in table.items])
    bounds = np.flatnonzero(np.diff(users)) + 1
    return np.split(items, bounds)


def tables_equal(a, b) -> bool:
    return (
        a.source == b.source
        and a.users == b.users
        and a.items == b.items
        and np.array_equal(a.timestamps, b.timestamps)
        and np.array_equal(a.lines, b.lines)
        and a.ratings is None
        and b.ratings is None
    )


def on_interest_fraction(table, truth: PlantedTruth) -> float:
    users = np.array([int(u[1:]) for u in table.users])
    items = np.array([int(i[1:]) for i in table.items])
    return float(np.mean(truth.user_interests[users, truth.item_topic[items]] > 0))


# --- determinism --------------------------------------------------------------------


def test_same_seed_gives_identical_output() -> None:
    (t1, p1), (t2, p2) = generate(SMALL), generate(SMALL)
    assert tables_equal(t1, t2)
    assert np.array_equal(p1.item_topic, p2.item_topic)
    assert np.array_equal(p1.user_interests, p2.user_interests)
    assert all(np.array_equal(a, b) for a, b in zip(p1.topic_order, p2.topic_order))


def test_different_seed_gives_different_output() -> None:
    t1, p1 = generate(SMALL)
    t2, p2 = generate(dataclasses.replace(SMALL, seed=4))
    assert t1.items != t2.items
    assert not np.array_equal(p1.user_interests, p2.user_interests)
    assert t2.source == "synthetic(seed=4)"


# --- validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_users": 0}, "num_users"),
        ({"num_topics": 0}, "num_topics"),
        ({"num_items": 5, "num_topics": 10, "max_length": 2, "min_length": 3}, "num_items"),
        ({"interests_per_user": 11}, "interests_per_user"),
        ({"interests_per_user": 0}, "interests_per_user"),
        ({"min_length": 2}, "min_length"),
        ({"min_length": 50, "max_length": 40}, "min_length"),
        ({"max_length": 2}, "max_length"),
        ({"max_length": 251}, "max_length"),
        ({"drift": -0.1}, "drift"),
        ({"noise": 1.5}, "noise"),
        ({"noise": float("nan")}, "noise"),
        ({"sequential_strength": 2.0}, "sequential_strength"),
        ({"popularity_skew": -1.0}, "popularity_skew"),
        ({"popularity_skew": float("inf")}, "popularity_skew"),
        ({"seed": -1}, "seed"),
        ({"num_users": 10.5}, "num_users"),
        ({"num_users": True}, "num_users"),
    ],
)
def test_config_validation_names_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"SyntheticConfig\.{field} must be"):
        SyntheticConfig(**changes)


def test_validation_message_gives_the_range() -> None:
    with pytest.raises(ValueError, match=r"noise must be in \[0.0, 1.0\], got 1.5"):
        SyntheticConfig(noise=1.5)
    with pytest.raises(ValueError, match=r"interests_per_user must be in \[1, num_topics \(10\)\], got 11"):
        SyntheticConfig(interests_per_user=11)


# --- history invariants -------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        SMALL,
        # Tiny topics and a single interest: topics get used up and the focus must move on.
        SyntheticConfig(num_users=100, num_items=60, num_topics=12, interests_per_user=1, min_length=3, max_length=30, seed=1),
        SyntheticConfig(num_users=100, num_items=61, num_topics=7, noise=0.0, drift=1.0, sequential_strength=1.0, max_length=30, seed=2),
        SyntheticConfig(num_users=50, noise=1.0, popularity_skew=0.0, seed=5),
    ],
)
def test_every_history_is_well_formed(config: SyntheticConfig) -> None:
    table, truth = generate(config)
    users = np.array([int(u[1:]) for u in table.users])
    assert np.all(np.diff(users) >= 0), "rows are grouped by user in order"
    assert np.array_equal(np.unique(users), np.arange(config.num_users))
    assert np.array_equal(table.lines, np.arange(1, len(table) + 1))
    assert table.ratings is None
    bounds = np.flatnonzero(np.diff(users)) + 1
    for items, times in zip(histories(table), np.split(table.timestamps, bounds)):
        assert config.min_length <= len(items) <= config.max_length
        assert len(np.unique(items)) == len(items), "a user never repeats an item"
        assert np.all((items >= 0) & (items < config.num_items))
        assert np.all(np.diff(times) > 0), "timestamps strictly increase per user"
    assert truth.item_topic.shape == (config.num_items,)
    assert truth.user_interests.shape == (config.num_users, config.num_topics)
    assert np.allclose(truth.user_interests.sum(axis=1), 1.0)
    assert np.all((truth.user_interests > 0).sum(axis=1) == config.interests_per_user)
    sizes = np.bincount(truth.item_topic, minlength=config.num_topics)
    assert sizes.max() - sizes.min() <= 1, "topics are a near-equal partition"
    assert sorted(np.concatenate(truth.topic_order).tolist()) == list(range(config.num_items))


def test_lengths_cover_the_range() -> None:
    table, _ = generate(SyntheticConfig(num_users=400, min_length=5, max_length=9, seed=7))
    lengths = {len(h) for h in histories(table)}
    assert lengths == {5, 6, 7, 8, 9}


# --- planted interests --------------------------------------------------------------


def test_noise_free_histories_stay_on_interest() -> None:
    table, truth = generate(dataclasses.replace(SMALL, noise=0.0))
    assert on_interest_fraction(table, truth) == 1.0


def test_noise_lowers_the_on_interest_fraction_as_expected() -> None:
    noise = 0.5
    table, truth = generate(dataclasses.replace(SMALL, noise=noise))
    # A noise item lands on an interest topic by chance with the interests' catalogue share.
    share = chance_interest_precision(np.arange(SMALL.num_users), truth, min_weight=1e-12)
    expected = (1 - noise) + noise * share
    observed = on_interest_fraction(table, truth)
    assert observed == pytest.approx(expected, abs=0.03)
    assert observed < 0.75


def test_visits_follow_the_planted_weights() -> None:
    # Without planted interests both numbers would be near 0 and 0.5 respectively.
    table, truth = generate(dataclasses.replace(SMALL, num_users=400))
    shares, weights, dominant, dominant_hits = [], [], 0, 0
    for u, items in enumerate(histories(table)):
        counts = np.bincount(truth.item_topic[items], minlength=truth.num_topics)
        topics = np.flatnonzero(truth.user_interests[u])
        shares.append(counts[topics] / counts[topics].sum())
        weights.append(truth.user_interests[u, topics])
        # Drift keeps the focus for ~1/drift steps, so a history holds only a few focus
        # spells: only a clearly dominant interest must also dominate the history.
        if truth.user_interests[u].max() >= 0.75:
            dominant += 1
            dominant_hits += np.argmax(counts) == np.argmax(truth.user_interests[u])
    assert np.corrcoef(np.concatenate(shares), np.concatenate(weights))[0, 1] > 0.45
    assert dominant >= 40 and dominant_hits / dominant > 0.75


# --- sequential signal --------------------------------------------------------------


def next_item_hit_rates(config: SyntheticConfig) -> tuple[float, float]:
    """Hit@SEQUENTIAL_WINDOW on each user's last item of a planted-order and a popularity predictor.

    Both predictors see the history without its last item, exclude seen items and guess
    within the topic of the last history item, so they differ only in the signal used.
    """
    table, truth = generate(config)
    hists = histories(table)
    counts = np.bincount(np.concatenate([h[:-1] for h in hists]), minlength=config.num_items)
    position = np.empty(config.num_items, dtype=np.int64)
    for members in truth.topic_order:
        position[members] = np.arange(len(members))
    k = SEQUENTIAL_WINDOW
    seq_hits = pop_hits = 0
    for h in hists:
        past, target = h[:-1], h[-1]
        seen = set(past.tolist())
        members = truth.topic_order[truth.item_topic[past[-1]]]
        start = position[past[-1]] + 1
        after = [int(i) for i in np.roll(members, -start) if i not in seen]
        seq_hits += target in after[:k]
        popular = [int(i) for i in members[np.argsort(-counts[members], kind="stable")] if i not in seen]
        pop_hits += target in popular[:k]
    return seq_hits / len(hists), pop_hits / len(hists)


def test_sequential_structure_beats_popularity_when_planted() -> None:
    seq, pop = next_item_hit_rates(dataclasses.replace(SMALL, num_users=400, sequential_strength=0.9))
    assert seq > 0.5
    assert seq > pop + 0.3


def test_without_sequential_structure_order_does_not_help() -> None:
    seq, pop = next_item_hit_rates(dataclasses.replace(SMALL, num_users=400, sequential_strength=0.0))
    # Without the planted order the next items in it are just some unseen items of the
    # topic (chance is about 3 / unseen-in-topic), while popularity still works.
    assert seq < 0.25
    assert seq < pop - 0.05


# --- interest precision -------------------------------------------------------------


def test_oracle_recommendations_have_full_interest_precision() -> None:
    _, truth = generate(SMALL)
    rng = np.random.default_rng(0)
    users = np.arange(SMALL.num_users)
    k = 10
    recommended = np.empty((len(users), k), dtype=np.int64)
    for u in users:
        good = np.flatnonzero(truth.user_interests[u, truth.item_topic] >= 0.1)
        recommended[u] = rng.choice(good, size=k, replace=False)
    assert interest_precision(recommended, users, truth) == 1.0
    # The opposite oracle scores zero.
    for u in users:
        bad = np.flatnonzero(truth.user_interests[u, truth.item_topic] == 0)
        recommended[u] = rng.choice(bad, size=k, replace=False)
    assert interest_precision(recommended, users, truth) == 0.0


def test_random_recommendations_score_near_chance() -> None:
    _, truth = generate(SMALL)
    rng = np.random.default_rng(1)
    users = rng.integers(0, SMALL.num_users, size=2000)
    recommended = rng.integers(0, SMALL.num_items, size=(len(users), 10))
    chance = chance_interest_precision(users, truth)
    assert 0.05 < chance < 0.3
    assert interest_precision(recommended, users, truth) == pytest.approx(chance, abs=0.015)


def test_min_weight_filters_minor_interests() -> None:
    _, truth = generate(SMALL)
    users = np.arange(SMALL.num_users)
    assert chance_interest_precision(users, truth, min_weight=0.5) < chance_interest_precision(users, truth, min_weight=0.01)


def test_precision_rejects_bad_input() -> None:
    _, truth = generate(SMALL)
    with pytest.raises(ValueError, match="min_weight"):
        interest_precision(np.zeros((1, 2), dtype=int), np.zeros(1, dtype=int), truth, min_weight=0.0)
    with pytest.raises(ValueError, match=r"\(n, k\)"):
        interest_precision(np.zeros(3, dtype=int), np.zeros(3, dtype=int), truth)
    with pytest.raises(ValueError, match="0-based"):
        interest_precision(np.full((1, 1), SMALL.num_items), np.zeros(1, dtype=int), truth)
    with pytest.raises(ValueError, match="users"):
        chance_interest_precision(np.array([], dtype=int), truth)


# --- sequences ----------------------------------------------------------------------


def test_to_sequences_keeps_the_planted_numbering() -> None:
    table, truth = generate(SMALL)
    dataset = to_sequences(table, "synthetic")
    assert dataset.num_users == SMALL.num_users
    assert dataset.num_interactions == len(table)
    users = user_positions(dataset.user_ids)
    assert np.array_equal(users, np.arange(SMALL.num_users))
    items = item_positions(dataset.item_ids)
    assert items[0] == -1 and len(items) == dataset.num_items + 1
    for _u, (seq, planted) in enumerate(zip(dataset.sequences, histories(table))):
        assert np.array_equal(items[seq], planted)
        assert np.array_equal(truth.item_topic[items[seq]], truth.item_topic[planted])
    split = leave_one_out(dataset)
    assert split.users_left_out == 0 and len(split) == SMALL.num_users


def test_position_helpers_reject_foreign_ids() -> None:
    with pytest.raises(ValueError, match="i<number>"):
        item_positions(["movie7"])
    with pytest.raises(ValueError, match="u<number>"):
        user_positions(["i3"])


def test_generation_is_quick() -> None:
    import time

    start = time.perf_counter()
    generate(SyntheticConfig())
    assert time.perf_counter() - start < 1.5
