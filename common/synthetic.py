"""A seeded synthetic dataset with planted long-term interests, built in memory.

It is the default dataset: the demo runs on a fresh machine without a download, and
because the interests are planted we can check that a trained model recovers them.

What is planted (see docs/synthetic.md):
- items are partitioned into topics; within a topic items have a planted order and a
  Zipf popularity (independent of the order, so the two signals can be told apart);
- each user has a few interest topics with Dirichlet weights (long-term interests);
- a history is a walk: a current focus topic drawn from the user's interests, which
  now and then is redrawn (drift); each step is either a random item (noise), one of
  the next few items after the user's last item of the focus topic in the planted
  order (sequential signal), or a popular item of the focus topic;
- a user never sees an item twice, so leave-one-out with seen items excluded is sound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedinterest.common.constants import MIN_INTERACTIONS_FOR_SPLIT
from fedinterest.common.interactions import InteractionTable

# A sequential step picks uniformly among this many next unseen items in the planted
# order: a few, not one, so the signal is strong but not a deterministic chain.
SEQUENTIAL_WINDOW = 3

# Concentration of the Dirichlet over a user's interest weights. Above 1 so that a
# planted interest is rarely so small that it never shows in a short history.
DIRICHLET_ALPHA = 2.0

# Timestamps: users start somewhere in one year after 2023-11-14 and then interact
# between one minute and one day apart, so time strictly increases within a user.
_BASE_TIME = 1_700_000_000.0
_START_SPREAD = 365 * 86_400
_MIN_GAP, _MAX_GAP = 60, 86_400


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the generator; every field is checked when the config is built."""

    num_users: int = 600
    num_items: int = 500
    # Items are partitioned into topics of near-equal size (the planted structure).
    num_topics: int = 10
    # Each user's long-term interests: this many distinct topics with Dirichlet weights.
    interests_per_user: int = 2
    # History length is drawn uniformly in [min_length, max_length].
    min_length: int = 20
    max_length: int = 80
    # Per step, probability that the current focus is redrawn from the user's interest
    # weights (short-term drift around the long-term interests).
    drift: float = 0.1
    # Per step, probability of a uniformly random unseen item (off-interest noise).
    noise: float = 0.1
    # Per step, probability that the next item is one of the next SEQUENTIAL_WINDOW
    # unseen items after the user's last item of the focus topic in the planted order.
    sequential_strength: float = 0.7
    # Zipf exponent of item popularity within a topic (0 = uniform).
    popularity_skew: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_users", "num_items", "num_topics", "interests_per_user", "min_length", "max_length", "seed"):
            value = getattr(self, name)
            # bool is an int subclass; a True here is a mistake, not a count.
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f"SyntheticConfig.{name} must be an integer, got {value!r}")
        for name in ("drift", "noise", "sequential_strength", "popularity_skew"):
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
                raise ValueError(f"SyntheticConfig.{name} must be a number, got {value!r}")
        _check("num_users", self.num_users, 1, None)
        _check("num_topics", self.num_topics, 1, None)
        _check("num_items", self.num_items, self.num_topics, None, "num_topics")
        _check("interests_per_user", self.interests_per_user, 1, self.num_topics, hi_name="num_topics")
        # No repeats: a history must fit in the catalogue with room to spare, which also
        # keeps the rejection sampling of noise items fast (at most half is ever seen).
        _check("max_length", self.max_length, MIN_INTERACTIONS_FOR_SPLIT, self.num_items // 2, hi_name="num_items // 2")
        # Leave-one-out needs a training item plus a validation and a test target.
        _check("min_length", self.min_length, MIN_INTERACTIONS_FOR_SPLIT, self.max_length, hi_name="max_length")
        _check("drift", self.drift, 0.0, 1.0)
        _check("noise", self.noise, 0.0, 1.0)
        _check("sequential_strength", self.sequential_strength, 0.0, 1.0)
        _check("popularity_skew", self.popularity_skew, 0.0, None)
        _check("seed", self.seed, 0, None)


def _check(name: str, value: float, lo: float, hi: float | None, lo_name: str | None = None, hi_name: str | None = None) -> None:
    """Raise ValueError naming the field and its allowed range when value is outside it."""
    # Comparisons with NaN are false, so NaN fails `ok`; inf is caught by isfinite.
    ok = lo <= value and (hi is None or value <= hi)
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        lo_text = f"{lo_name} ({lo})" if lo_name else f"{lo}"
        hi_text = "inf" if hi is None else (f"{hi_name} ({hi})" if hi_name else f"{hi}")
        raise ValueError(f"SyntheticConfig.{name} must be in [{lo_text}, {hi_text}], got {value!r}")


# eq=False: the generated __eq__ would compare arrays elementwise and fail on truth-value.
@dataclass(frozen=True, eq=False)
class PlantedTruth:
    """The planted structure behind a generated table; item k is "i{k}", user u is "u{u}"."""

    # (num_items,) topic of each item.
    item_topic: np.ndarray
    # (num_users, num_topics) long-term interest weights; each row sums to 1.
    user_interests: np.ndarray
    # One array per topic: its items in the planted sequential order.
    topic_order: tuple[np.ndarray, ...]
    # (num_items,) popularity of each item within its topic; sums to 1 over a topic.
    item_popularity: np.ndarray

    @property
    def num_topics(self) -> int:
        return self.user_interests.shape[1]


def generate(config: SyntheticConfig) -> tuple[InteractionTable, PlantedTruth]:
    """Build the interaction table and its planted truth; the same config gives the same output."""
    rng = np.random.default_rng(config.seed)
    n_users, n_items, n_topics, k = config.num_users, config.num_items, config.num_topics, config.interests_per_user

    # Catalogue: near-equal topics, a random planted order and popularity inside each.
    item_topic = rng.permutation(np.arange(n_items) % n_topics)
    sizes = np.bincount(item_topic, minlength=n_topics)
    width = int(sizes.max())
    order = np.full((n_topics, width), -1, dtype=np.int64)  # item at each order position
    popularity = np.zeros((n_topics, width))  # aligned with `order`
    item_popularity = np.zeros(n_items)
    position = np.empty(n_items, dtype=np.int64)  # each item's position in its topic's order
    for t in range(n_topics):
        members = rng.permutation(np.flatnonzero(item_topic == t))
        order[t, : sizes[t]] = members
        position[members] = np.arange(sizes[t])
        # Popularity ranks are drawn independently of the order, so "popular" and
        # "next in order" are distinct signals.
        weight = (rng.permutation(sizes[t]) + 1.0) ** -config.popularity_skew
        popularity[t, : sizes[t]] = weight / weight.sum()
        item_popularity[members] = popularity[t, : sizes[t]]

    # Users: k distinct interest topics each, with Dirichlet weights.
    interest_topics = np.argsort(rng.random((n_users, n_topics)), axis=1)[:, :k]
    interest_weights = rng.dirichlet(np.full(k, DIRICHLET_ALPHA), size=n_users)
    user_interests = np.zeros((n_users, n_topics))
    user_interests[np.arange(n_users)[:, None], interest_topics] = interest_weights
    lengths = rng.integers(config.min_length, config.max_length + 1, size=n_users)

    history = _walk(config, rng, item_topic, sizes, order, popularity, position, interest_topics, interest_weights)

    # Everyone walked max_length steps; keep each user's own length.
    steps = history.shape[1]
    keep = np.arange(steps)[None, :] < lengths[:, None]
    starts = _BASE_TIME + rng.integers(0, _START_SPREAD, size=n_users)
    gaps = rng.integers(_MIN_GAP, _MAX_GAP + 1, size=(n_users, steps))
    times = starts[:, None] + np.cumsum(gaps, axis=1)

    # Row-major masking keeps rows grouped by user (u0 first) and chronological, so
    # `to_sequences` numbers user "u{u}" as u.
    row_users = np.repeat(np.arange(n_users), lengths)
    row_items = history[keep]
    user_names = [f"u{u}" for u in range(n_users)]
    item_names = [f"i{j}" for j in range(n_items)]
    table = InteractionTable(
        source=f"synthetic(seed={config.seed})",
        users=[user_names[u] for u in row_users.tolist()],
        items=[item_names[j] for j in row_items.tolist()],
        timestamps=times[keep].astype(np.float64),
        ratings=None,
        lines=np.arange(1, len(row_items) + 1, dtype=np.int64),
    )
    truth = PlantedTruth(
        item_topic=item_topic,
        user_interests=user_interests,
        topic_order=tuple(order[t, : sizes[t]].copy() for t in range(n_topics)),
        item_popularity=item_popularity,
    )
    return table, truth


def _walk(
    config: SyntheticConfig,
    rng: np.random.Generator,
    item_topic: np.ndarray,
    sizes: np.ndarray,
    order: np.ndarray,
    popularity: np.ndarray,
    position: np.ndarray,
    interest_topics: np.ndarray,
    interest_weights: np.ndarray,
) -> np.ndarray:
    """Walk every user max_length steps at once; returns (num_users, max_length) item positions."""
    n_users, n_items, n_topics = config.num_users, config.num_items, config.num_topics
    rows = np.arange(n_users)
    width = order.shape[1]
    seen = np.zeros((n_users, n_items), dtype=bool)
    seen_per_topic = np.zeros((n_users, n_topics), dtype=np.int64)
    # Order position of the user's last item in each topic; -1 before the first one.
    cursor = np.full((n_users, n_topics), -1, dtype=np.int64)
    history = np.empty((n_users, config.max_length), dtype=np.int64)
    focus = _draw_interest(rng, interest_topics, interest_weights)

    for step in range(config.max_length):
        # Random numbers are drawn for every user every step so that the streams, and
        # hence the output, depend only on the config.
        redraw = rng.random(n_users) < config.drift
        is_noise = rng.random(n_users) < config.noise
        wants_sequence = rng.random(n_users) < config.sequential_strength
        if step > 0 and redraw.any():
            focus[redraw] = _draw_interest(rng, interest_topics[redraw], interest_weights[redraw])

        # A focus topic the user has used up moves to another interest with unseen
        # items; with none left the step becomes a noise step.
        used_up = seen_per_topic[rows, focus] >= sizes[focus]
        if used_up.any():
            who = np.flatnonzero(used_up)
            open_topics = seen_per_topic[who[:, None], interest_topics[who]] < sizes[interest_topics[who]]
            weights = interest_weights[who] * open_topics
            has_open = weights.sum(axis=1) > 0
            moved = who[has_open]
            if moved.size:
                focus[moved] = _draw_interest(rng, interest_topics[moved], weights[has_open])
            is_noise[who[~has_open]] = True

        is_sequence = ~is_noise & wants_sequence & (cursor[rows, focus] >= 0)
        is_popular = ~is_noise & ~is_sequence
        chosen = np.empty(n_users, dtype=np.int64)

        who = np.flatnonzero(is_noise)
        if who.size:
            chosen[who] = _draw_unseen_uniform(rng, seen, who, n_items)

        who = np.flatnonzero(is_sequence)
        if who.size:
            topic = focus[who]
            # Order positions after the cursor, wrapping round the topic.
            cols = (cursor[who, topic][:, None] + np.arange(1, width + 1)) % sizes[topic][:, None]
            items = order[topic[:, None], cols]
            unseen = ~seen[who[:, None], items]
            count = np.cumsum(unseen, axis=1)
            pick = rng.integers(1, np.minimum(SEQUENTIAL_WINDOW, count[:, -1]) + 1)
            # The first column where the running count of unseen items reaches `pick`
            # is the pick-th unseen item after the cursor.
            chosen[who] = items[np.arange(who.size), np.argmax(count >= pick[:, None], axis=1)]

        who = np.flatnonzero(is_popular)
        if who.size:
            topic = focus[who]
            items = order[topic]
            valid = items >= 0
            unseen = valid & ~seen[who[:, None], np.where(valid, items, 0)]
            # Inverse-CDF draw from the topic's popularity restricted to unseen items.
            cdf = np.cumsum(popularity[topic] * unseen, axis=1)
            u = rng.random(who.size) * cdf[:, -1]
            col = np.sum(cdf <= u[:, None], axis=1)
            # Guard against u rounding up to the total: fall back to the last unseen.
            last = width - 1 - np.argmax(unseen[:, ::-1], axis=1)
            chosen[who] = items[np.arange(who.size), np.minimum(col, last)]

        history[:, step] = chosen
        seen[rows, chosen] = True
        topic_of = item_topic[chosen]
        seen_per_topic[rows, topic_of] += 1
        cursor[rows, topic_of] = position[chosen]
    return history


def _draw_interest(rng: np.random.Generator, topics: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One topic per row, drawn from that row's (unnormalised) interest weights."""
    cdf = np.cumsum(weights, axis=1)
    u = rng.random(len(topics)) * cdf[:, -1]
    col = np.minimum(np.sum(cdf <= u[:, None], axis=1), topics.shape[1] - 1)
    # A zero-weight column can only be hit through rounding at the top; step back to the
    # last column with weight so a closed topic is never chosen.
    last = topics.shape[1] - 1 - np.argmax(weights[:, ::-1] > 0, axis=1)
    return topics[np.arange(len(topics)), np.minimum(col, last)]


def _draw_unseen_uniform(rng: np.random.Generator, seen: np.ndarray, who: np.ndarray, n_items: int) -> np.ndarray:
    """A uniformly random unseen item for each user in `who` (rejection sampling)."""
    # At most half the catalogue is ever seen (max_length <= num_items // 2), so each
    # round accepts with probability >= 1/2.
    out = rng.integers(0, n_items, size=who.size)
    bad = np.flatnonzero(seen[who, out])
    while bad.size:
        out[bad] = rng.integers(0, n_items, size=bad.size)
        bad = bad[seen[who[bad], out[bad]]]
    return out


def interest_precision(
    recommended: np.ndarray, users: np.ndarray, truth: PlantedTruth, *, min_weight: float = 0.1
) -> float:
    """Fraction of recommended items whose topic is a planted interest (weight >= min_weight) of its user."""
    recommended = np.asarray(recommended)
    users = np.asarray(users)
    _check_min_weight(min_weight)
    if recommended.ndim != 2 or users.shape != (recommended.shape[0],):
        raise ValueError(f"recommended must be (n, k) and users (n,), got {recommended.shape} and {users.shape}")
    if recommended.size == 0:
        raise ValueError("no recommendations to score")
    n_items = len(truth.item_topic)
    if recommended.min() < 0 or recommended.max() >= n_items:
        raise ValueError(f"recommended items must be 0-based positions in [0, {n_items - 1}]")
    if users.min() < 0 or users.max() >= truth.user_interests.shape[0]:
        raise ValueError(f"users must be 0-based positions in [0, {truth.user_interests.shape[0] - 1}]")
    weights = truth.user_interests[users[:, None], truth.item_topic[recommended]]
    return float(np.mean(weights >= min_weight))


def chance_interest_precision(users: np.ndarray, truth: PlantedTruth, *, min_weight: float = 0.1) -> float:
    """Expected interest_precision of items drawn uniformly from the whole catalogue for `users`."""
    users = np.asarray(users)
    _check_min_weight(min_weight)
    if users.ndim != 1 or users.size == 0:
        raise ValueError(f"users must be a non-empty (n,) array, got shape {users.shape}")
    topic_share = np.bincount(truth.item_topic, minlength=truth.num_topics) / len(truth.item_topic)
    # Each user's chance is the catalogue share of their qualifying topics; every user
    # gets the same number of recommendations, so the overall value is the mean.
    per_user = (truth.user_interests[users] >= min_weight) @ topic_share
    return float(per_user.mean())


def _check_min_weight(min_weight: float) -> None:
    # 0 would count every topic (weight 0 >= 0) as an interest.
    if not 0 < min_weight <= 1:
        raise ValueError(f"min_weight must be in (0, 1], got {min_weight!r}")


def item_positions(item_ids: Sequence[str]) -> np.ndarray:
    """Planted position of each dataset item index: `item_positions(ds.item_ids)[i]` for index i in 1..num_items.

    `to_sequences` numbers items by first appearance, not as "i{k}" -> k, so a model's
    item indices must go through this map before `interest_precision`. Entry 0 (the
    padding index) is -1.
    """
    return np.array([-1] + [_parse_id(s, "i") for s in item_ids], dtype=np.int64)


def user_positions(user_ids: Sequence[str]) -> np.ndarray:
    """Planted position of each dataset user index: "u{u}" -> u."""
    return np.array([_parse_id(s, "u") for s in user_ids], dtype=np.int64)


def _parse_id(name: str, prefix: str) -> int:
    if not name.startswith(prefix) or not name[len(prefix) :].isdigit():
        raise ValueError(f"{name!r} is not a synthetic id of the form {prefix}<number>")
    return int(name[len(prefix) :])
