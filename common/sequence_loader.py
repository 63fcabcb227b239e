"""Reader of the "sequence" format: one line per user, `user item item ...`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedinterest.common.file_text import blank_line, read_text, split_lines
from fedinterest.common.interactions import DataFormatError, InteractionTable


def load_sequences(path: str | Path) -> InteractionTable:
    """Read one line per user, `user item item ...`; timestamps are positions in the line."""
    src = str(path)
    users: list[str] = []
    items: list[str] = []
    timestamps: list[float] = []
    lines: list[int] = []
    first_line: dict[str, int] = {}
    for i, line in enumerate(split_lines(read_text(path))):
        fields = line.split()
        if not fields:
            raise blank_line(src, i + 1)
        user, seq = fields[0], fields[1:]
        if not seq:
            raise DataFormatError(src, i + 1, f"user {user!r} has no items")
        # Two lines for one user would make the order between them undefined.
        if user in first_line:
            raise DataFormatError(src, i + 1, f"user {user!r} appears again (first on line {first_line[user]})")
        first_line[user] = i + 1
        users.extend([user] * len(seq))
        items.extend(seq)
        timestamps.extend(range(len(seq)))
        lines.extend([i + 1] * len(seq))
    return InteractionTable(
        source=src,
        users=users,
        items=items,
        timestamps=np.asarray(timestamps, dtype=np.float64),
        ratings=None,
        lines=np.asarray(lines, dtype=np.int64),
    )
