"""Readers of the two MovieLens rating files: 100K `u.data` (tab-separated) and 1M `ratings.dat` (`::`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedinterest.common.file_text import BadValue, blank_line, read_text, short_repr, split_lines
from fedinterest.common.interactions import DataFormatError, InteractionTable

# MovieLens ratings are whole stars; a dict lookup validates and converts in one step.
_ML_RATINGS = {"1": 1.0, "2": 2.0, "3": 3.0, "4": 4.0, "5": 5.0}


def _ml_int(value: str, what: str) -> None:
    """Raise BadValue unless `value` is a plain non-negative decimal integer (ASCII digits only)."""
    if value.isascii() and value.isdigit():
        return
    if what == "timestamp" and value[:1] == "-" and value[1:].isascii() and value[1:].isdigit():
        raise BadValue(f"timestamp {value!r} is negative")
    raise BadValue(f"{what} {value!r} is not an integer")


def _load_movielens(path: str | Path, sep: str, sep_name: str) -> InteractionTable:
    """Shared reader of the two MovieLens rating layouts `user<sep>item<sep>rating<sep>time`."""
    src = str(path)
    lines = split_lines(read_text(path))
    n = len(lines)
    users: list[str] = []
    items: list[str] = []
    timestamps = np.empty(n, dtype=np.float64)
    ratings = np.empty(n, dtype=np.float64)
    for i, line in enumerate(lines):
        parts = line.split(sep)
        if len(parts) != 4:
            if not line.strip():
                raise blank_line(src, i + 1)
            raise DataFormatError(src, i + 1, f"expected 4 {sep_name} fields, got {len(parts)}")
        u, it, r, t = parts
        rating = _ML_RATINGS.get(r)
        # The common case (all fields valid) costs four cheap string checks and no regex.
        if not (u.isascii() and u.isdigit() and it.isascii() and it.isdigit() and rating is not None
                and t.isascii() and t.isdigit()):
            try:
                _ml_int(u, "user id")
                _ml_int(it, "item id")
                if rating is None:
                    raise BadValue(f"rating {r!r} is not an integer in 1..5")
                _ml_int(t, "timestamp")
            except BadValue as e:
                raise DataFormatError(src, i + 1, e.reason) from None
        # Stripping leading zeros makes "007" and "7" the same id. Not int(): it refuses
        # strings of more than 4300 digits with a ValueError that names no file or line.
        users.append(u if u[0] != "0" else (u.lstrip("0") or "0"))
        items.append(it if it[0] != "0" else (it.lstrip("0") or "0"))
        # float() of the digits, not int(): a huge timestamp becomes inf (refused below)
        # instead of an OverflowError or int()'s digit limit; below 2**53 both are exact.
        timestamps[i] = float(t)
        ratings[i] = rating
    too_big = np.flatnonzero(~np.isfinite(timestamps))
    if too_big.size:
        row = int(too_big[0])
        raise DataFormatError(src, row + 1, f"timestamp {short_repr(lines[row].split(sep)[3])} is too large")
    return InteractionTable(
        source=src,
        users=users,
        items=items,
        timestamps=timestamps,
        ratings=ratings,
        lines=np.arange(1, n + 1, dtype=np.int64),
    )


def load_movielens_100k(path: str | Path) -> InteractionTable:
    """Read MovieLens 100K `u.data`: `user<TAB>item<TAB>rating<TAB>timestamp` per line."""
    return _load_movielens(path, "\t", "tab-separated")


def load_movielens_1m(path: str | Path) -> InteractionTable:
    """Read MovieLens 1M `ratings.dat`: `UserID::MovieID::Rating::Timestamp` per line."""
    return _load_movielens(path, "::", "'::'-separated")
