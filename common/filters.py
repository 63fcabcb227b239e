"""Row filters applied before building sequences; each says what it removed and why.

Nothing is dropped silently: every filter returns the kept table together with a
`FilterReport`, and `apply_filters` collects those reports for the dataset.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from fedinterest.common.interactions import DataFormatError, InteractionTable


@dataclass(frozen=True)
class FilterReport:
    """What one filter removed."""

    name: str
    rows_removed: int
    users_removed: int
    items_removed: int
    reason: str

    def __str__(self) -> str:
        return (
            f"{self.name}: removed {self.rows_removed} rows, {self.users_removed} users, "
            f"{self.items_removed} items ({self.reason})"
        )


def _report(name: str, before: InteractionTable, after: InteractionTable, reason: str) -> FilterReport:
    return FilterReport(
        name=name,
        rows_removed=len(before) - len(after),
        users_removed=len(set(before.users)) - len(set(after.users)),
        items_removed=len(set(before.items)) - len(set(after.items)),
        reason=reason,
    )


def drop_repeats(table: InteractionTable) -> tuple[InteractionTable, FilterReport]:
    """Keep each user's earliest interaction with an item (ties: first in the file).

    Ranking excludes items the user already saw, so a repeated item could never be a
    reachable target; keeping only the first occurrence makes the protocol well posed.
    """
    order = np.lexsort((np.arange(len(table)), table.timestamps))
    seen: set[tuple[str, str]] = set()
    keep = np.zeros(len(table), dtype=bool)
    for i in order:
        key = (table.users[i], table.items[i])
        if key not in seen:
            seen.add(key)
            keep[i] = True
    kept = table.take(keep)
    return kept, _report("drop_repeats", table, kept, "a user's later interactions with an item already seen")


def min_rating(table: InteractionTable, threshold: float) -> tuple[InteractionTable, FilterReport]:
    """Keep rows whose rating is at least `threshold` (turns ratings into implicit feedback)."""
    if table.ratings is None:
        raise DataFormatError(table.source, None, f"min_rating={threshold} asked for, but the data has no rating column")
    kept = table.take(table.ratings >= threshold)
    return kept, _report("min_rating", table, kept, f"rating below {threshold}")


def k_core(table: InteractionTable, k: int) -> tuple[InteractionTable, FilterReport]:
    """Iteratively drop users and items with fewer than `k` interactions until none is left."""
    if k < 1:
        raise ValueError(f"k_core needs k >= 1, got {k}")
    current = table
    while True:
        users = Counter(current.users)
        items = Counter(current.items)
        keep = np.fromiter(
            (users[u] >= k and items[i] >= k for u, i in zip(current.users, current.items)),
            dtype=bool,
            count=len(current),
        )
        if keep.all():
            break
        current = current.take(keep)
    return current, _report("k_core", table, current, f"users or items with fewer than {k} interactions")


def min_length(table: InteractionTable, n: int) -> tuple[InteractionTable, FilterReport]:
    """Drop users with fewer than `n` interactions."""
    counts = Counter(table.users)
    kept = table.take(np.fromiter((counts[u] >= n for u in table.users), dtype=bool, count=len(table)))
    return kept, _report("min_length", table, kept, f"users with fewer than {n} interactions")


def apply_filters(
    table: InteractionTable,
    *,
    rating_threshold: float | None = None,
    core: int | None = None,
    min_user_length: int | None = None,
) -> tuple[InteractionTable, list[FilterReport]]:
    """Ratings first, then repeats, k-core and minimum length, in that order.

    Ratings go before repeats so that a low rating followed by a high one of the same
    item keeps the high one instead of losing the item.
    """
    reports: list[FilterReport] = []
    if rating_threshold is not None:
        table, report = min_rating(table, rating_threshold)
        reports.append(report)
    table, report = drop_repeats(table)
    reports.append(report)
    if core is not None:
        table, report = k_core(table, core)
        reports.append(report)
    if min_user_length is not None:
        table, report = min_length(table, min_user_length)
        reports.append(report)
    if len(table) == 0:
        raise DataFormatError(table.source, None, "the filters removed every interaction: " + "; ".join(map(str, reports)))
    return table, reports
