"""Raw interaction tables, the errors their loaders raise, and per-user sequences.

An `InteractionTable` is what a loader reads from a file: one row per interaction, in
file order. `to_sequences` turns it into a `SequenceDataset`: one chronological item
sequence per user (one user = one federated partition), items numbered 1..num_items.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedinterest.common.constants import PAD_ID
from fedinterest.common.errors import FedinterestError


class DataFormatError(FedinterestError, ValueError):
    """A malformed input: names the file, the 1-based line (when there is one) and why."""

    def __init__(self, path: str, line: int | None, reason: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")

    def __reduce__(self) -> tuple:
        # Errors raised in a Flower/Ray worker are pickled on their way back to the caller.
        return (DataFormatError, (self.path, self.line, self.reason))


@dataclass(frozen=True)
class InteractionTable:
    """Interactions as read from one source, in file order.

    `timestamps` are seconds (float64); for formats without time (the sequence format)
    they are the position of the item in its line, which keeps the file's order.
    `lines` holds the 1-based source line of each row so later errors can point at it.
    """

    source: str
    users: list[str]
    items: list[str]
    timestamps: np.ndarray
    ratings: np.ndarray | None = None
    lines: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.users)
        if len(self.items) != n or len(self.timestamps) != n:
            raise ValueError("users, items and timestamps must have the same length")
        if self.ratings is not None and len(self.ratings) != n:
            raise ValueError("ratings must have one value per row")
        if self.lines is not None and len(self.lines) != n:
            raise ValueError("lines must have one value per row")

    def __len__(self) -> int:
        return len(self.users)

    def take(self, keep: np.ndarray) -> InteractionTable:
        """The rows where the boolean mask `keep` is true, order kept."""
        idx = np.flatnonzero(keep)
        return InteractionTable(
            source=self.source,
            users=[self.users[i] for i in idx],
            items=[self.items[i] for i in idx],
            timestamps=self.timestamps[idx],
            ratings=None if self.ratings is None else self.ratings[idx],
            lines=None if self.lines is None else self.lines[idx],
        )


@dataclass(frozen=True)
class SequenceDataset:
    """One chronological item sequence per user.

    `sequences[u]` holds item indices in 1..num_items (PAD_ID is never an item);
    `item_ids[i - 1]` is the original id of item index i, `user_ids[u]` that of user u.
    """

    name: str
    user_ids: tuple[str, ...]
    item_ids: tuple[str, ...]
    sequences: tuple[np.ndarray, ...]
    reports: tuple[str, ...] = field(default=())

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def with_report(self, line: str) -> SequenceDataset:
        """The same data with one more line in its processing report."""
        return SequenceDataset(self.name, self.user_ids, self.item_ids, self.sequences, self.reports + (line,))


def to_sequences(table: InteractionTable, name: str) -> SequenceDataset:
    """Group a table by user, ordered by time with ties kept in file order.

    Users are numbered in order of first appearance, items in order of first
    appearance too, so the same file always gives the same numbering.
    """
    if len(table) == 0:
        raise DataFormatError(table.source, None, "no interactions left to build sequences from")
    user_index: dict[str, int] = {}
    item_index: dict[str, int] = {}
    user_col = np.fromiter((user_index.setdefault(u, len(user_index)) for u in table.users), dtype=np.int64, count=len(table))
    item_col = np.fromiter(
        (item_index.setdefault(i, len(item_index) + 1) for i in table.items), dtype=np.int64, count=len(table)
    )
    # A stable sort by (user, time) keeps file order for equal timestamps.
    order = np.lexsort((table.timestamps, user_col))
    sorted_users = user_col[order]
    sorted_items = item_col[order]
    bounds = np.flatnonzero(np.diff(sorted_users)) + 1
    sequences = tuple(np.split(sorted_items, bounds))
    assert PAD_ID not in item_index.values()
    return SequenceDataset(
        name=name,
        user_ids=tuple(user_index),
        item_ids=tuple(item_index),
        sequences=sequences,
        reports=(f"{table.source}: {len(table)} interactions, {len(user_index)} users, {len(item_index)} items",),
    )
