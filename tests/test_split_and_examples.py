"""Leave-one-out split, filters and training windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedinterest.common.constants import PAD_ID
from fedinterest.common.examples import bucketed_batches, history_batch, stack_windows, training_windows, trim_padding
from fedinterest.common.filters import apply_filters, k_core
from fedinterest.common.interactions import DataFormatError, InteractionTable, SequenceDataset, to_sequences
from fedinterest.common.split import leave_one_out


def _table(rows: list[tuple[str, str, float]], ratings: list[float] | None = None) -> InteractionTable:
    return InteractionTable(
        source="test",
        users=[r[0] for r in rows],
        items=[r[1] for r in rows],
        timestamps=np.array([r[2] for r in rows], dtype=np.float64),
        ratings=None if ratings is None else np.array(ratings, dtype=np.float64),
    )


def test_split_is_by_time_and_reports_short_users() -> None:
    table = _table([("a", "x", 3), ("a", "y", 1), ("a", "z", 2), ("a", "w", 4), ("b", "x", 1), ("b", "y", 2)])
    split = leave_one_out(to_sequences(table, "t"))
    assert split.users_left_out == 1
    (user,) = split.users
    items = split.dataset.item_ids
    named = lambda idx: [items[i - 1] for i in np.atleast_1d(idx)]  # noqa: E731
    assert named(user.train) == ["y", "z"]
    assert named(user.valid) == ["x"] and named(user.test) == ["w"]
    assert named(user.history("test")) == ["y", "z", "x"]
    with pytest.raises(ValueError, match="stage"):
        user.history("train")


def test_filters_report_what_they_remove() -> None:
    rows = [("a", "x", 1), ("a", "x", 2), ("a", "y", 3), ("a", "w", 4), ("b", "y", 1), ("c", "z", 1)]
    table = _table(rows, ratings=[5, 4, 2, 5, 5, 5])
    kept, reports = apply_filters(table, rating_threshold=4, min_user_length=2)
    assert [r.name for r in reports] == ["min_rating", "drop_repeats", "min_length"]
    assert (reports[0].rows_removed, reports[0].items_removed) == (1, 0)  # ("a", "y") rated 2; "y" stays via "b"
    assert reports[1].rows_removed == 1  # the later ("a", "x")
    assert (reports[2].rows_removed, reports[2].users_removed) == (2, 2)  # "b" and "c" have one each
    assert kept.users == ["a", "a"] and kept.items == ["x", "w"]
    assert "min_length: removed 2 rows, 2 users" in str(reports[2])


def test_filters_that_remove_everything_say_so() -> None:
    table = _table([("a", "x", 1), ("b", "y", 1)])
    with pytest.raises(DataFormatError, match="removed every interaction.*min_length"):
        apply_filters(table, min_user_length=2)


def test_rating_filter_without_ratings_is_an_error() -> None:
    with pytest.raises(DataFormatError, match="no rating column"):
        apply_filters(_table([("a", "x", 1)]), rating_threshold=4)


def test_k_core_is_iterative() -> None:
    # Item "rare" has one interaction; removing it drops user "c" below 2, then item "z".
    rows = [("a", "x", 1), ("a", "y", 2), ("b", "x", 1), ("b", "y", 2), ("c", "z", 1), ("c", "rare", 2), ("d", "z", 1)]
    kept, report = k_core(_table(rows), 2)
    assert sorted(set(kept.users)) == ["a", "b"]
    assert report.rows_removed == 3 and report.users_removed == 2 and report.items_removed == 2


def test_windows_cover_every_training_target_exactly_once() -> None:
    train = np.arange(1, 12)  # 11 items -> 10 (input, next) pairs
    inputs, targets = training_windows(train, max_len=4)
    assert inputs.shape == (3, 4)
    real_targets = targets[targets != PAD_ID]
    assert sorted(real_targets.tolist()) == list(range(2, 12))
    # Each target is the item right after its input.
    mask = targets != PAD_ID
    assert (targets[mask] == inputs[mask] + 1).all()
    # The most recent window ends with the last pair.
    assert inputs[0].tolist() == [7, 8, 9, 10] and targets[0].tolist() == [8, 9, 10, 11]
    assert inputs[2].tolist() == [PAD_ID, PAD_ID, 1, 2]
    assert training_windows(np.array([5]), 4)[0].shape == (0, 4)


def test_history_batch_left_pads_and_truncates() -> None:
    batch = history_batch([np.array([1, 2, 3, 4, 5]), np.array([7])], max_len=3)
    assert batch.tolist() == [[3, 4, 5], [PAD_ID, PAD_ID, 7]]


def test_bucketed_batches_keep_every_window_once_and_trim_padding() -> None:
    inputs, targets = stack_windows([np.arange(1, n + 2) for n in (1, 2, 5, 9, 3, 8)], max_len=6)
    batches = bucketed_batches(inputs, targets, batch_size=2, generator=torch.Generator().manual_seed(0))
    seen = sorted(tuple(t[t != PAD_ID].tolist()) for _, tb in batches for t in tb)
    expected = sorted(tuple(t[t != PAD_ID].tolist()) for t in targets)
    assert seen == expected
    assert min(b[0].shape[1] for b in batches) < 6  # short windows no longer pay for long ones
    x, y = trim_padding(torch.tensor([[0, 0, 1], [0, 2, 3]]), torch.tensor([[0, 0, 2], [0, 3, 4]]))
    assert x.tolist() == [[0, 1], [2, 3]] and y.tolist() == [[0, 2], [3, 4]]


def test_sequence_dataset_report_lines_accumulate() -> None:
    ds = SequenceDataset("n", ("u",), ("i",), (np.array([1]),))
    assert ds.with_report("x").with_report("y").reports == ("x", "y")


def test_neighbouring_windows_share_their_boundary_item() -> None:
    # Issue 13, defect 7: windows partition the pairs, not the items. A window of max-len
    # pairs spans max-len + 1 items, and the older window's last target is the newer
    # window's first input, so that interaction is in two examples (group privacy, docs/privacy.md).
    train = np.arange(1, 12)  # 11 items -> 10 pairs -> windows of 4, 4 and 2 pairs
    inputs, targets = training_windows(train, max_len=4)
    items = [set(i[i != PAD_ID].tolist()) | set(t[t != PAD_ID].tolist()) for i, t in zip(inputs, targets)]
    assert [len(s) for s in items] == [5, 5, 3]  # max-len + 1 items in a full window
    assert items[0] & items[1] == {7} and items[1] & items[2] == {3}
    assert targets[1][-1] == inputs[0][0] == 7
    pairs = [(a, b) for i, t in zip(inputs, targets) for a, b in zip(i.tolist(), t.tolist()) if b != PAD_ID]
    assert sorted(pairs) == [(k, k + 1) for k in range(1, 11)]  # every pair in exactly one window
