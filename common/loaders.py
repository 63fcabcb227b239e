"""Readers that turn interaction files into `InteractionTable`s, refusing malformed input.

Every loader reads the whole file first, then validates it row by row and raises a
`DataFormatError` naming the file, the 1-based line and the reason at the FIRST bad
row. Nothing is skipped or repaired silently: a bad row in a dataset would otherwise
change what the experiments measure without anyone noticing.

Formats:
  - MovieLens 100K `u.data` (tab-separated) and MovieLens 1M `ratings.dat` (`::`);
  - generic CSV/TSV (header row), JSON lines and Parquet, with a `ColumnMap` naming
    the user, item, timestamp and optional rating columns;
  - the "sequence" format: one line per user, `user item item ...`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fedinterest.common.errors import FedinterestError, UsageError
from fedinterest.common.interactions import DataFormatError, InteractionTable

GENERIC_FORMATS = ("csv", "tsv", "jsonl", "parquet")
ALL_FORMATS = ("ml-100k", "ml-1m", "csv", "tsv", "jsonl", "parquet", "sequences")

# Suffixes `load_table` recognises when no format is given.
_SUFFIX_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    # Exports named .json are often JSON lines; read as such (a JSON array is named as such, below).
    ".json": "jsonl",
    ".parquet": "parquet",
}



def suffix_format(path: str | Path) -> str | None:
    """The generic format a file's suffix names (`.json` is JSON lines), None when it names none."""
    return _SUFFIX_FORMATS.get(Path(path).suffix.lower())


# MovieLens ratings are whole stars; a dict lookup validates and converts in one step.
_ML_RATINGS = {"1": 1.0, "2": 2.0, "3": 3.0, "4": 4.0, "5": 5.0}


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


class _Bad(FedinterestError):
    """A value-level problem; the row loop adds file and line and re-raises it as DataFormatError."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------- reading


def _check_file(path: str | Path) -> Path:
    """The path as a Path, after checking that it is an existing regular file."""
    p = Path(path)
    if not p.exists():
        raise DataFormatError(str(path), None, "file does not exist")
    if p.is_dir():
        raise DataFormatError(str(path), None, "is a directory, not a file")
    return p


def _read_text(path: str | Path) -> str:
    """The whole file decoded as UTF-8; errors for a missing, unreadable, non-UTF-8 or empty file."""
    p = _check_file(path)
    src = str(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DataFormatError(src, None, f"cannot read file: {e.strerror or e}") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataFormatError(
            src, line, f"not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column})"
        ) from None
    # A byte-order mark is legal UTF-8 but would otherwise end up in the first field.
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise DataFormatError(src, None, "file is empty" if not text else "file contains only whitespace")
    return text


def _split_lines(text: str) -> list[str]:
    """Lines without terminators; one final newline is not a blank line."""
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _blank(src: str, line: int) -> DataFormatError:
    return DataFormatError(src, line, "blank line inside the data (only a final newline is allowed)")


# ---------------------------------------------------------------------------- MovieLens


def _ml_int(value: str, what: str) -> None:
    """Raise _Bad unless `value` is a plain non-negative decimal integer (ASCII digits only)."""
    if value.isascii() and value.isdigit():
        return
    if what == "timestamp" and value[:1] == "-" and value[1:].isascii() and value[1:].isdigit():
        raise _Bad(f"timestamp {value!r} is negative")
    raise _Bad(f"{what} {value!r} is not an integer")


def _short(value: str, limit: int = 40) -> str:
    """repr() of a value, cut to about `limit` characters so a huge field does not flood the message."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value)} characters)"


def _load_movielens(path: str | Path, sep: str, sep_name: str) -> InteractionTable:
    """Shared reader of the two MovieLens rating layouts `user<sep>item<sep>rating<sep>time`."""
    src = str(path)
    lines = _split_lines(_read_text(path))
    n = len(lines)
    users: list[str] = []
    items: list[str] = []
    timestamps = np.empty(n, dtype=np.float64)
    ratings = np.empty(n, dtype=np.float64)
    for i, line in enumerate(lines):
        parts = line.split(sep)
        if len(parts) != 4:
            if not line.strip():
                raise _blank(src, i + 1)
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
                    raise _Bad(f"rating {r!r} is not an integer in 1..5")
                _ml_int(t, "timestamp")
            except _Bad as e:
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
        raise DataFormatError(src, row + 1, f"timestamp {_short(lines[row].split(sep)[3])} is too large")
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


# ---------------------------------------------------------------------------- values


def _id_value(value: Any, what: str, column: str) -> str:
    """A user or item id as a stripped, non-empty string."""
    if isinstance(value, str):
        s = value.strip()
        if not s:
            raise _Bad(f"empty {what} value in column {column!r}")
        # A JSON escape such as "\\ud800" decodes to a lone surrogate: not text, and SQLite
        # (the device store) cannot store it, so the import would fail later and unnamed.
        if not s.isascii():
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise _Bad(f"{what} value {value!r} in column {column!r} is not valid Unicode (a lone surrogate)") from None
        return s
    if value is None:
        raise _Bad(f"{what} value missing (null) in column {column!r}")
    if isinstance(value, bool):
        raise _Bad(f"{what} value {value!r} in column {column!r} is a boolean, not an id")
    if isinstance(value, numbers.Integral):
        return str(int(value))
    # Integer ids often arrive as floats (e.g. a Parquet column that once held nulls).
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    raise _Bad(f"{what} value {value!r} in column {column!r} is not a string or integer id")


def _time_value(value: Any, column: str) -> float:
    """Epoch seconds from an int/float, a numeric string, an ISO-8601 string or a datetime."""
    if isinstance(value, str):
        s = value.strip()
        if not s:
            raise _Bad(f"empty timestamp in column {column!r}")
        # A numeric string is epoch seconds (so "20240101" is a number, not a date).
        seconds = _float_text(s)
        if seconds is None:
            try:
                moment = datetime.fromisoformat(s)
            except ValueError:
                raise _Bad(
                    f"timestamp {value!r} in column {column!r} is neither epoch seconds nor an ISO-8601 date/time"
                ) from None
            seconds = _datetime_seconds(moment)
    elif value is None:
        raise _Bad(f"timestamp missing (null) in column {column!r}")
    elif isinstance(value, bool):
        raise _Bad(f"timestamp {value!r} in column {column!r} is a boolean, not a time")
    elif isinstance(value, datetime):
        seconds = _datetime_seconds(value)
    elif isinstance(value, date):
        seconds = _datetime_seconds(datetime(value.year, value.month, value.day))
    elif isinstance(value, numbers.Real):
        seconds = _finite_float(value, "timestamp", column)
    else:
        raise _Bad(f"timestamp {value!r} in column {column!r} has unsupported type {type(value).__name__}")
    if not math.isfinite(seconds):
        raise _Bad(f"timestamp {value!r} in column {column!r} is not finite")
    if seconds < 0:
        raise _Bad(f"timestamp {value!r} in column {column!r} is negative (before 1970-01-01)")
    return seconds


def _finite_float(value: numbers.Real, what: str, column: str) -> float:
    """float(value); a JSON integer too large for a float is refused here (float() raises OverflowError)."""
    try:
        return float(value)
    except OverflowError:
        raise _Bad(f"{what} {_short(str(value))} in column {column!r} is too large") from None


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
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _rating_value(value: Any, column: str) -> float:
    """A rating as a finite float."""
    if isinstance(value, bool) or value is None:
        raise _Bad(f"rating {value!r} in column {column!r} is not a number")
    if isinstance(value, str):
        r = _float_text(value.strip())
        if r is None:
            raise _Bad(f"rating {value!r} in column {column!r} is not a number")
    elif isinstance(value, numbers.Real):
        r = _finite_float(value, "rating", column)
    else:
        raise _Bad(f"rating {value!r} in column {column!r} is not a number")
    if not math.isfinite(r):
        raise _Bad(f"rating {value!r} in column {column!r} is not finite")
    return r


class _Rows:
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
        except _Bad as e:
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


def _check_header(src: str, line: int | None, names: list[str], columns: ColumnMap, what: str) -> list[int]:
    """Positions of the mapped columns in `names`; errors for duplicates or missing ones."""
    dups = [n for n, k in Counter(names).items() if k > 1]
    if dups:
        raise DataFormatError(src, line, f"duplicate column name(s) in {what}: " + ", ".join(map(repr, dups)))
    for wanted in columns.required():
        if wanted not in names:
            raise DataFormatError(src, line, f"column {wanted!r} missing; {what} has: " + ", ".join(names))
    return [names.index(w) for w in columns.required()]


# ---------------------------------------------------------------------------- CSV / TSV


def _load_delimited(path: str | Path, columns: ColumnMap, fmt: str) -> InteractionTable:
    """CSV (RFC-4180 quoting) or TSV (no quoting: a tab-separated field cannot hold a tab)."""
    src = str(path)
    text = _read_text(path)
    if fmt == "csv":
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=",", strict=True)
        sep_name = "comma-separated"
    else:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
        sep_name = "tab-separated"
    rows = _Rows(src, columns)
    header: list[str] | None = None
    index: list[int] = []
    prev = 0  # reader.line_num after the previous row; a row starts on the next line
    while True:
        line = prev + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataFormatError(src, line, f"malformed {fmt.upper()}: {e}") from None
        prev = reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            if header is None:
                raise DataFormatError(src, line, "blank line where the header row was expected")
            raise _blank(src, line)
        stripped = [f.strip() for f in row]
        if header is None:
            header = stripped
            index = _check_header(src, line, header, columns, "header")
            continue
        # A repeated header usually means two files were concatenated; its "values" are not data.
        if stripped == header:
            raise DataFormatError(src, line, "the header row appears again inside the data")
        if len(row) != len(header):
            raise DataFormatError(src, line, f"expected {len(header)} {sep_name} fields (as in the header), got {len(row)}")
        rows.add(line, *(row[k] for k in index))
    return rows.table("the file has a header but no data rows")


# ---------------------------------------------------------------------------- JSON lines


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys silently; a duplicate is a broken record.
    obj: dict[str, Any] = {}
    for k, v in pairs:
        if k in obj:
            raise _Bad(f"duplicate key {k!r} in JSON object")
        obj[k] = v
    return obj


_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean", type(None): "null"}


def _load_jsonl(path: str | Path, columns: ColumnMap) -> InteractionTable:
    """JSON lines: one object per line holding at least the mapped keys."""
    src = str(path)
    rows = _Rows(src, columns)
    keys = columns.required()
    for i, line in enumerate(_split_lines(_read_text(path))):
        if not line.strip():
            raise _blank(src, i + 1)
        try:
            obj = json.loads(line, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as e:
            if i == 0 and line.lstrip().startswith("["):
                raise DataFormatError(src, 1, "a JSON array; interactions are read as JSON lines (one object per line, no enclosing [ ])") from None
            raise DataFormatError(src, i + 1, f"invalid JSON: {e.msg} (column {e.colno})") from None
        except _Bad as e:
            raise DataFormatError(src, i + 1, e.reason) from None
        # json raises these, not JSONDecodeError, for an integer of more than 4300 digits
        # and for arrays or objects nested too deeply.
        except RecursionError:
            raise DataFormatError(src, i + 1, "invalid JSON: arrays or objects nested too deeply") from None
        except ValueError as e:
            raise DataFormatError(src, i + 1, f"invalid JSON: a number too long to read ({str(e).split(';')[0]})") from None
        if not isinstance(obj, dict):
            raise DataFormatError(src, i + 1, f"expected a JSON object, got {_JSON_TYPES.get(type(obj), type(obj).__name__)}")
        for k in keys:
            if k not in obj:
                # A key may hold a lone surrogate ("\\ud800"): escape it, or printing the error would fail.
                shown = ", ".join(key.encode("utf-8", "backslashreplace").decode("utf-8") for key in obj)
                raise DataFormatError(src, i + 1, f"key {k!r} missing; object has: " + shown)
        rows.add(i + 1, *(obj[k] for k in keys))
    return rows.table("the file holds no rows")


# ---------------------------------------------------------------------------- Parquet


def _load_parquet(path: str | Path, columns: ColumnMap) -> InteractionTable:
    """Parquet via pyarrow; the `line` of a row is its row number + 1."""
    # Imported here so that importing the loaders never pays for pyarrow.
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    src = str(path)
    p = _check_file(path)
    if p.stat().st_size == 0:
        raise DataFormatError(src, None, "file is empty")
    try:
        pf = pq.ParquetFile(p)
        names = list(pf.schema_arrow.names)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataFormatError(src, None, f"not a readable Parquet file: {e}") from None
    _check_header(src, None, names, columns, "the file")
    try:
        table = pf.read(columns=columns.required())
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataFormatError(src, None, f"cannot read the Parquet data: {e}") from None
    values: list[list[Any]] = []
    for name in columns.required():
        col = table.column(name)
        if pa.types.is_timestamp(col.type):
            # Arrow stores timestamps as UTC integers in `unit`; converting those avoids
            # per-value datetime objects (and nanoseconds Python datetimes cannot hold).
            per_second = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[col.type.unit]
            raw = pc.cast(col, pa.int64()).to_pylist()
            values.append([None if v is None else v / per_second for v in raw])
        else:
            values.append(col.to_pylist())
    rows = _Rows(src, columns)
    for r, row in enumerate(zip(*values)):
        rows.add(r + 1, *row)
    return rows.table("the file holds no rows")


# ---------------------------------------------------------------------------- public generic


def load_table(
    path: str | Path, *, columns: ColumnMap = ColumnMap(), format: str | None = None
) -> InteractionTable:
    """Read a generic CSV, TSV, JSON-lines or Parquet file, inferring the format from the suffix."""
    fmt = format
    if fmt is None:
        suffix = Path(path).suffix.lower()
        fmt = _SUFFIX_FORMATS.get(suffix)
        if fmt is None:
            raise DataFormatError(
                str(path),
                None,
                f"cannot tell the format from the suffix {suffix!r}; pass format= one of "
                + ", ".join(GENERIC_FORMATS)
                + " (suffixes: "
                + ", ".join(_SUFFIX_FORMATS)
                + ")",
            )
    if fmt in ("csv", "tsv"):
        return _load_delimited(path, columns, fmt)
    if fmt == "jsonl":
        return _load_jsonl(path, columns)
    if fmt == "parquet":
        return _load_parquet(path, columns)
    raise DataFormatError(str(path), None, f"unknown format {fmt!r}; formats: " + ", ".join(GENERIC_FORMATS))


# ---------------------------------------------------------------------------- sequences


def load_sequences(path: str | Path) -> InteractionTable:
    """Read one line per user, `user item item ...`; timestamps are positions in the line."""
    src = str(path)
    users: list[str] = []
    items: list[str] = []
    timestamps: list[float] = []
    lines: list[int] = []
    first_line: dict[str, int] = {}
    for i, line in enumerate(_split_lines(_read_text(path))):
        fields = line.split()
        if not fields:
            raise _blank(src, i + 1)
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


# ---------------------------------------------------------------------------- dispatcher


def load_interactions(path: str | Path, *, format: str, columns: ColumnMap = ColumnMap()) -> InteractionTable:
    """Read `path` in the named format (one of ALL_FORMATS)."""
    if format not in ALL_FORMATS:
        raise ValueError(f"unknown interaction format {format!r}; choices: " + ", ".join(ALL_FORMATS))
    if format in GENERIC_FORMATS:
        return load_table(path, columns=columns, format=format)
    # The fixed layouts have no named columns; a mapping here is a configuration mistake.
    if columns != ColumnMap():
        raise ValueError(f"columns= applies only to {', '.join(GENERIC_FORMATS)}, not to {format!r}")
    if format == "ml-100k":
        return load_movielens_100k(path)
    if format == "ml-1m":
        return load_movielens_1m(path)
    return load_sequences(path)
