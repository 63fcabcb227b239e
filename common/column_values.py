"""The columns of a generic file (`ColumnMap`) and the checked conversion of their values.

CSV/TSV, JSON lines and Parquet all name their user, item, timestamp and optional
rating columns with a `ColumnMap`; each row's values go through `ValidatedRows.add`,
the single place that converts them, so every format refuses the same bad values.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import numpy as np

from fedinterest.common.errors import UsageError
from fedinterest.common.file_text import BadValue, short_repr
from fedinterest.common.interactions import DataFormatError, InteractionTable


@dataclass(frozen=True)
class ColumnMap:
    """Which columns (or JSON keys) of a generic file hold user, item, time and rating."""

    user: str = "user"
    item: str = "item"
    timestamp: str = "timestamp"
    rating: str | None = None

    def __post_init__(self) -> None:
        names = [self.user, self.item, self.timestamp] + ([] if self.rating is None else [self.rating])
        if any(not isinstance(n, str) or not n.strip() for n in names):
            raise UsageError(f"column names must be non-empty strings, got {self}")
        # Two roles on one column would silently read the same values twice.
        if len(set(names)) != len(names):
            raise UsageError(f"column names must be distinct, got {self}")

    def required(self) -> list[str]:
        """The mapped column names, in the order user, item, timestamp[, rating]."""
        return [self.user, self.item, self.timestamp] + ([] if self.rating is None else [self.rating])


def _id_value(value: Any, what: str, column: str) -> str:
    """A user or item id as a stripped, non-empty string."""
    if isinstance(value, str):
        s = value.strip()
        if not s:
            raise BadValue(f"empty {what} value in column {column!r}")
        # A JSON escape such as "\\ud800" decodes to a lone surrogate: not text, and SQLite
        # (the device store) cannot store it, so the import would fail later and unnamed.
        if not s.isascii():
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise BadValue(f"{what} value {value!r} in column {column!r} is not valid Unicode (a lone surrogate)") from None
        return s
    if value is None:
        raise BadValue(f"{what} value missing (null) in column {column!r}")
    if isinstance(value, bool):
        raise BadValue(f"{what} value {value!r} in column {column!r} is a boolean, not an id")
    if isinstance(value, numbers.Integral):
        return str(int(value))
    # Integer ids often arrive as floats (e.g. a Parquet column that once held nulls).
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    raise BadValue(f"{what} value {value!r} in column {column!r} is not a string or integer id")


def _time_value(value: Any, column: str) -> float:
    """Epoch seconds from an int/float, a numeric string, an ISO-8601 string or a datetime."""
    if isinstance(value, str):
        s = value.strip()
        if not s:
            raise BadValue(f"empty timestamp in column {column!r}")
        # A numeric string is epoch seconds (so "20240101" is a number, not a date).
        seconds = _float_text(s)
        if seconds is None:
            try:
                moment = datetime.fromisoformat(s)
            except ValueError:
                raise BadValue(
                    f"timestamp {value!r} in column {column!r} is neither epoch seconds nor an ISO-8601 date/time"
                ) from None
            seconds = _datetime_seconds(moment)
    elif value is None:
        raise BadValue(f"timestamp missing (null) in column {column!r}")
    elif isinstance(value, bool):
        raise BadValue(f"timestamp {value!r} in column {column!r} is a boolean, not a time")
    elif isinstance(value, datetime):
        seconds = _datetime_seconds(value)
    elif isinstance(value, date):
        seconds = _datetime_seconds(datetime(value.year, value.month, value.day))
    elif isinstance(value, numbers.Real):
        seconds = _finite_float(value, "timestamp", column)
    else:
        raise BadValue(f"timestamp {value!r} in column {column!r} has unsupported type {type(value).__name__}")
    _require_finite(seconds, value, "timestamp", column)
    if seconds < 0:
        raise BadValue(f"timestamp {value!r} in column {column!r} is negative (before 1970-01-01)")
    return seconds


def _finite_float(value: numbers.Real, what: str, column: str) -> float:
    """float(value); a JSON integer too large for a float is refused here (float() raises OverflowError)."""
    try:
        return float(value)
    except OverflowError:
        raise BadValue(f"{what} {short_repr(str(value))} in column {column!r} is too large") from None


def _require_finite(number: float, value: Any, what: str, column: str) -> None:
    """BadValue for inf or nan (a float parses "inf"; a metric over it would be meaningless)."""
    if not math.isfinite(number):
        raise BadValue(f"{what} {value!r} in column {column!r} is not finite")


def _float_text(s: str) -> float | None:
    """float(s), or None when `s` is not a number; Python's digit separators ("1_000") are refused."""
    if "_" in s:
        return None
    try:
        return float(s)
    except ValueError:
        return None


def _datetime_seconds(moment: datetime) -> float:
    # A time without zone is taken as UTC, so the result never depends on the machine's zone.
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _rating_value(value: Any, column: str) -> float:
    """A rating as a finite float."""
    if isinstance(value, bool) or value is None:
        raise BadValue(f"rating {value!r} in column {column!r} is not a number")
    if isinstance(value, str):
        r = _float_text(value.strip())
        if r is None:
            raise BadValue(f"rating {value!r} in column {column!r} is not a number")
    elif isinstance(value, numbers.Real):
        r = _finite_float(value, "rating", column)
    else:
        raise BadValue(f"rating {value!r} in column {column!r} is not a number")
    _require_finite(r, value, "rating", column)
    return r


class ValidatedRows:
    """Accumulates validated generic rows; the single place that converts values."""

    def __init__(self, src: str, columns: ColumnMap) -> None:
        self.src = src
        self.columns = columns
        self.users: list[str] = []
        self.items: list[str] = []
        self.timestamps: list[float] = []
        self.ratings: list[float] = []
        self.lines: list[int] = []

    def add(self, line: int, user: Any, item: Any, timestamp: Any, rating: Any = None) -> None:
        c = self.columns
        try:
            u = _id_value(user, "user", c.user)
            i = _id_value(item, "item", c.item)
            t = _time_value(timestamp, c.timestamp)
            if c.rating is not None:
                self.ratings.append(_rating_value(rating, c.rating))
        except BadValue as e:
            raise DataFormatError(self.src, line, e.reason) from None
        self.users.append(u)
        self.items.append(i)
        self.timestamps.append(t)
        self.lines.append(line)

    def table(self, empty_reason: str) -> InteractionTable:
        if not self.users:
            raise DataFormatError(self.src, None, empty_reason)
        return InteractionTable(
            source=self.src,
            users=self.users,
            items=self.items,
            timestamps=np.asarray(self.timestamps, dtype=np.float64),
            ratings=None if self.columns.rating is None else np.asarray(self.ratings, dtype=np.float64),
            lines=np.asarray(self.lines, dtype=np.int64),
        )


def check_header(src: str, line: int | None, names: list[str], columns: ColumnMap, what: str) -> list[int]:
    """Positions of the mapped columns in `names`; errors for duplicates or missing ones."""
    dups = [n for n, k in Counter(names).items() if k > 1]
    if dups:
        raise DataFormatError(src, line, f"duplicate column name(s) in {what}: " + ", ".join(map(repr, dups)))
    for wanted in columns.required():
        if wanted not in names:
            raise DataFormatError(src, line, f"column {wanted!r} missing; {what} has: " + ", ".join(names))
    return [names.index(w) for w in columns.required()]
