"""Readers of the generic column-mapped formats: CSV/TSV (header row), JSON lines and Parquet.

A `ColumnMap` (common/column_values.py) names the user, item, timestamp and optional
rating columns; `load_table` picks the reader from the format or the file's suffix.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from fedinterest.common.column_values import ColumnMap, ValidatedRows, check_header
from fedinterest.common.file_text import BadValue, blank_line, check_file, read_text, split_lines
from fedinterest.common.interactions import DataFormatError, InteractionTable

GENERIC_FORMATS = ("csv", "tsv", "jsonl", "parquet")

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

# ---------------------------------------------------------------------------- CSV / TSV


def _load_delimited(path: str | Path, columns: ColumnMap, fmt: str) -> InteractionTable:
    """CSV (RFC-4180 quoting) or TSV (no quoting: a tab-separated field cannot hold a tab)."""
    src = str(path)
    text = read_text(path)
    if fmt == "csv":
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=",", strict=True)
        sep_name = "comma-separated"
    else:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
        sep_name = "tab-separated"
    rows = ValidatedRows(src, columns)
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
            raise blank_line(src, line)
        stripped = [f.strip() for f in row]
        if header is None:
            header = stripped
            index = check_header(src, line, header, columns, "header")
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
            raise BadValue(f"duplicate key {k!r} in JSON object")
        obj[k] = v
    return obj


_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean", type(None): "null"}


def _load_jsonl(path: str | Path, columns: ColumnMap) -> InteractionTable:
    """JSON lines: one object per line holding at least the mapped keys."""
    src = str(path)
    rows = ValidatedRows(src, columns)
    keys = columns.required()
    for i, line in enumerate(split_lines(read_text(path))):
        if not line.strip():
            raise blank_line(src, i + 1)
        try:
            obj = json.loads(line, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as e:
            if i == 0 and line.lstrip().startswith("["):
                raise DataFormatError(src, 1, "a JSON array; interactions are read as JSON lines (one object per line, no enclosing [ ])") from None
            raise DataFormatError(src, i + 1, f"invalid JSON: {e.msg} (column {e.colno})") from None
        except BadValue as e:
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
    p = check_file(path)
    if p.stat().st_size == 0:
        raise DataFormatError(src, None, "file is empty")
    try:
        pf = pq.ParquetFile(p)
        names = list(pf.schema_arrow.names)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataFormatError(src, None, f"not a readable Parquet file: {e}") from None
    check_header(src, None, names, columns, "the file")
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
    rows = ValidatedRows(src, columns)
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
