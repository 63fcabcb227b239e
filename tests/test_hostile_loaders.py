"""Hostile input for the loaders (issue 5, part 4): property-based tests with hypothesis.

Every file, valid or not, either loads into a consistent table (every row accounted
for, finite non-negative times, one chronological sequence per user) or is refused
with a `DataFormatError` naming the file and, for a damaged line, that line. No other
exception escapes a loader.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from fedinterest.common.column_values import ColumnMap
from fedinterest.common.interaction_loader import ALL_FORMATS, load_interactions
from fedinterest.common.interactions import DataFormatError, InteractionTable, to_sequences

# Loading a small file takes about a millisecond: these counts keep the module at a few seconds.
FAST = settings(max_examples=150, deadline=None)
SLOW = settings(max_examples=40, deadline=None)

_DIR = Path(tempfile.mkdtemp(prefix="hostile-loaders-"))


def _path(fmt: str) -> Path:
    # One file per format, rewritten by every example (a function-scoped tmp_path is not reset between examples).
    return _DIR / f"input-{fmt}.dat"


# Values that have broken parsers before: huge numbers, non-finite floats, odd digits and text.
HOSTILE_VALUES = [
    "", " ", "9" * 400, "9" * 5000, "1e400", "-1", "-0", "nan", "NaN", "inf", "-inf", "Infinity", "0x10", "1_000",
    "\u0661\u0662", "\ufeff1", "\u00e9", "\x00", "\u2028", '"', "'", "::", "\t", ",", "{", "[", "null", "true",
    "1.5", "2024-01-01T00:00:00", "0001-01-01", "9999-12-31T23:59:59-14:00", "00007", "0", "1" * 17, "\\ud800",
    "[" * 3000, "{\"a\":" * 3000,
]
hostile_value = st.one_of(st.sampled_from(HOSTILE_VALUES), st.text(max_size=12), st.integers().map(str))

ids = st.integers(min_value=0, max_value=10**6)
times = st.integers(min_value=0, max_value=2**40)
ratings = st.integers(min_value=1, max_value=5)
rows = st.lists(st.tuples(ids, ids, times, ratings), min_size=1, max_size=12)


# ---------------------------------------------------------------------------- rendering valid files


def _render(fmt: str, data: list[tuple[int, int, int, int]], columns: ColumnMap) -> tuple[str, int]:
    """A valid file of `fmt` holding `data`, and how many header lines it has."""
    if fmt == "ml-100k":
        return "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, t, r in data), 0
    if fmt == "ml-1m":
        return "".join(f"{u}::{i}::{r}::{t}\n" for u, i, t, r in data), 0
    if fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        header = sep.join(columns.required()) + "\n"
        return header + "".join(sep.join(map(str, (u, i, t, r)[: len(columns.required())])) + "\n" for u, i, t, r in data), 1
    if fmt == "jsonl":
        keys = columns.required()
        return "".join(json.dumps(dict(zip(keys, (f"u{u}", i, t, r)))) + "\n" for u, i, t, r in data), 0
    assert fmt == "sequences"
    by_user: dict[int, list[int]] = {}
    for u, i, _, _ in data:
        by_user.setdefault(u, []).append(i)
    return "".join(f"{u} " + " ".join(map(str, items)) + "\n" for u, items in by_user.items()), 0


LINE_FORMATS = ("ml-100k", "ml-1m", "csv", "tsv", "jsonl", "sequences")
column_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_-", min_size=1, max_size=8)


@st.composite
def column_maps(draw: st.DrawFn) -> ColumnMap:
    names = draw(st.lists(column_names, min_size=4, max_size=4, unique=True))
    rated = draw(st.booleans())
    return ColumnMap(user=names[0], item=names[1], timestamp=names[2], rating=names[3] if rated else None)


# ---------------------------------------------------------------------------- mutations


def _lines(text: str) -> list[str]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


@st.composite
def line_mutation(draw: st.DrawFn, line: str, sep: str) -> str:
    """One damaged version of a single line (no line break added or removed)."""
    kind = draw(st.sampled_from(["truncate", "insert", "delete", "replace_field", "swap_fields", "drop_field", "extra_field"]))
    fields = line.split(sep) if sep else line.split()
    joiner = sep or " "
    if kind == "truncate":
        return line[: draw(st.integers(0, max(len(line) - 1, 0)))]
    if kind == "insert":
        at = draw(st.integers(0, len(line)))
        return line[:at] + draw(hostile_value) + line[at:]
    if kind == "delete":
        a = draw(st.integers(0, len(line)))
        b = draw(st.integers(a, len(line)))
        return line[:a] + line[b:]
    if kind == "replace_field" and fields:
        k = draw(st.integers(0, len(fields) - 1))
        fields[k] = draw(hostile_value)
    elif kind == "swap_fields" and len(fields) > 1:
        a, b = draw(st.lists(st.integers(0, len(fields) - 1), min_size=2, max_size=2, unique=True))
        fields[a], fields[b] = fields[b], fields[a]
    elif kind == "drop_field" and fields:
        del fields[draw(st.integers(0, len(fields) - 1))]
    elif kind == "extra_field":
        fields.insert(draw(st.integers(0, len(fields))), draw(hostile_value))
    return joiner.join(fields)


_SEPS = {"ml-100k": "\t", "ml-1m": "::", "csv": ",", "tsv": "\t", "jsonl": ",", "sequences": ""}


def _check_loaded(table: InteractionTable, fmt: str, text: str, path: Path, header_lines: int) -> None:
    """A table a loader accepted is consistent with its file: every row accounted for, times valid, sequences chronological."""
    assert isinstance(table, InteractionTable) and table.source == str(path)
    n = len(table)
    assert n >= 1
    lines = _lines(text.removeprefix("\ufeff").replace("\r\n", "\n"))
    if fmt in ("ml-100k", "ml-1m", "jsonl"):
        # One row per line, none skipped.
        assert table.lines.tolist() == list(range(1, len(lines) + 1))
    elif fmt in ("csv", "tsv"):
        # Python's csv module (both loaders use it) also ends a line at a lone CR; a quoted CSV field may span lines.
        physical = len(re.split(r"\r\n|\r|\n", text.removeprefix("\ufeff").rstrip("\r\n")))
        if fmt == "tsv" or '"' not in text:
            assert table.lines.tolist() == list(range(header_lines + 1, physical + 1))
        else:
            assert np.all(np.diff(table.lines) > 0) and table.lines[0] > header_lines and table.lines[-1] <= physical
    elif fmt == "sequences":
        assert n == sum(len(line.split()) - 1 for line in lines)
    for value in (*table.users, *table.items):
        assert isinstance(value, str) and value and value == value.strip()
        value.encode("utf-8")  # storable text (SQLite refuses lone surrogates)
    assert np.all(np.isfinite(table.timestamps)) and np.all(table.timestamps >= 0)
    if table.ratings is not None:
        assert np.all(np.isfinite(table.ratings))
    # Chronological per user, ties in file order: each user's sequence is their rows stably sorted by time.
    data = to_sequences(table, "hostile")
    assert data.num_interactions == n and data.num_users == len(set(table.users))
    for u, user in enumerate(data.user_ids):
        rows_of_user = [k for k in range(n) if table.users[k] == user]
        expected = [table.items[k] for k in sorted(rows_of_user, key=lambda k: table.timestamps[k])]
        assert [data.item_ids[i - 1] for i in data.sequences[u]] == expected


def _check_refused(err: DataFormatError, path: Path, text_lines: int) -> None:
    """A refusal names the file, a line inside it (or the file as a whole) and a readable reason."""
    message = str(err)
    assert err.path == str(path) and message.startswith(f"{path}:"), message
    assert err.reason.strip()
    message.encode("utf-8")  # printable: the CLI writes it to stderr
    if err.line is not None:
        assert 1 <= err.line <= text_lines + 1, (err.line, text_lines)


def _load(fmt: str, path: Path, columns: ColumnMap) -> InteractionTable:
    return load_interactions(path, format=fmt, columns=columns if fmt in ("csv", "tsv", "jsonl", "parquet") else ColumnMap())


def _write(path: Path, content: str | bytes) -> bytes:
    data = content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass")
    path.write_bytes(data)
    return data


# ---------------------------------------------------------------------------- properties


@pytest.mark.parametrize("fmt", LINE_FORMATS)
@FAST
@given(data=rows, columns=column_maps())
def test_valid_files_load_exactly(fmt: str, data, columns: ColumnMap) -> None:
    """The generator's unmutated files are valid: the mutation tests below start from files that load."""
    text, header = _render(fmt, data, columns)
    path = _path(fmt)
    _write(path, text)
    table = _load(fmt, path, columns)
    _check_loaded(table, fmt, text, path, header)
    if fmt != "sequences":
        assert table.items == [str(i) for _, i, _, _ in data]
        assert table.timestamps.tolist() == [float(t) for _, _, t, _ in data]


@pytest.mark.parametrize("fmt", LINE_FORMATS)
@FAST
@given(data=rows, columns=column_maps(), st_data=st.data())
@example(data=[(1, 2, 3, 4)], columns=ColumnMap(), st_data=None).via("huge MovieLens timestamp: was OverflowError")
def test_one_damaged_line_is_refused_at_that_line_or_loads_consistently(fmt: str, data, columns: ColumnMap, st_data) -> None:
    text, header = _render(fmt, data, columns)
    lines = _lines(text)
    if st_data is None:  # the explicit example: the first data line's timestamp made 400 digits long
        k = header
        fields = lines[k].split(_SEPS[fmt]) if _SEPS[fmt] else lines[k].split()
        fields[-1 if fmt in ("ml-100k", "ml-1m") else 1] = "9" * 400
        lines[k] = (_SEPS[fmt] or " ").join(fields)
    else:
        k = st_data.draw(st.integers(0, len(lines) - 1), label="damaged line index")
        lines[k] = st_data.draw(line_mutation(lines[k], _SEPS[fmt]), label="damaged line")
    assume("\n" not in lines[k] and "\r" not in lines[k])
    mutated = "\n".join(lines) + "\n"
    path = _path(fmt)
    _write(path, mutated)
    try:
        table = _load(fmt, path, columns)
    except DataFormatError as err:
        _check_refused(err, path, len(lines))
        # The damaged line is the one named (a CSV quote may pull later lines into its row, still starting there;
        # a repeated user in the sequence format is named where it appears again, pointing back at the first).
        if err.line is None:
            assert "file" in err.reason, str(err)
        elif k < header:
            pass  # a damaged header is found by the first data row that no longer fits it
        else:
            assert err.line == k + 1 or f"line {k + 1}" in err.reason or (fmt == "csv" and err.line < k + 1 and '"' in mutated), (
                str(err), k + 1)
    else:
        _check_loaded(table, fmt, mutated, path, header)


@st.composite
def whole_file_mutation(draw: st.DrawFn, text: str) -> str | bytes:
    kind = draw(st.sampled_from(["bom", "crlf", "cr_only", "truncate_bytes", "duplicate_header", "blank_line", "garbage_tail",
                                 "nul_bytes", "latin1", "reverse_lines"]))
    lines = _lines(text)
    if kind == "bom":
        return "\ufeff" + text
    if kind == "crlf":
        return text.replace("\n", "\r\n")
    if kind == "cr_only":
        return text.replace("\n", "\r")
    if kind == "truncate_bytes":
        raw = text.encode("utf-8")
        return raw[: draw(st.integers(0, len(raw)))]
    if kind == "duplicate_header":
        at = draw(st.integers(0, len(lines)))
        return "\n".join(lines[:at] + [lines[0]] + lines[at:]) + "\n"
    if kind == "blank_line":
        at = draw(st.integers(0, len(lines)))
        return "\n".join(lines[:at] + [draw(st.sampled_from(["", " ", "\t", "\r"]))] + lines[at:]) + "\n"
    if kind == "garbage_tail":
        return text.encode("utf-8") + draw(st.binary(max_size=40))
    if kind == "nul_bytes":
        return text.replace(draw(st.sampled_from(["1", "\n", ","])), "\x00", 1)
    if kind == "latin1":
        return (text + "caf\u00e9\n").encode("latin-1", "replace")
    return "\n".join(reversed(lines)) + "\n"


@pytest.mark.parametrize("fmt", LINE_FORMATS)
@FAST
@given(data=rows, columns=column_maps(), st_data=st.data())
def test_whole_file_damage_is_refused_or_loads_consistently(fmt: str, data, columns: ColumnMap, st_data) -> None:
    text, header = _render(fmt, data, columns)
    mutated = st_data.draw(whole_file_mutation(text), label="damaged file")
    path = _path(fmt)
    raw = _write(path, mutated)
    try:
        table = _load(fmt, path, columns)
    except DataFormatError as err:
        _check_refused(err, path, raw.count(b"\n") + raw.count(b"\r") + 1)
    else:
        _check_loaded(table, fmt, raw.decode("utf-8"), path, header)


@pytest.mark.parametrize("fmt", [f for f in ALL_FORMATS])
@FAST
@given(content=st.one_of(st.binary(max_size=300), st.text(max_size=300)), columns=column_maps())
@example(content='{"user": 1, "item": 2, "timestamp": ' + "9" * 5000 + "}\n", columns=ColumnMap()).via(
    "5000-digit JSON integer: was ValueError from int()")
@example(content='{"user": 1, "item": 2, "timestamp": ' + "9" * 400 + "}\n", columns=ColumnMap()).via(
    "400-digit JSON timestamp: was OverflowError from float()")
@example(content='{"user": "\\ud800", "item": 2, "timestamp": 1}\n', columns=ColumnMap()).via(
    "lone surrogate id: was accepted, then failed in SQLite on ingest")
@example(content='{"\\ud800": 1}\n', columns=ColumnMap()).via("lone surrogate key: the error message could not be printed")
@example(content='{"user": ' + "[" * 100000 + "\n", columns=ColumnMap()).via("deep JSON nesting: was RecursionError")
@example(content="0" + "9" * 5000 + "\t1\t1\t1\n", columns=ColumnMap()).via("5000-digit MovieLens id with a leading zero: was ValueError")
@example(content="1\t1\t1\t" + "9" * 5000 + "\n", columns=ColumnMap()).via("5000-digit MovieLens timestamp: was ValueError")
def test_arbitrary_content_is_refused_or_loads_consistently(fmt: str, content, columns: ColumnMap) -> None:
    path = _path(fmt)
    raw = _write(path, content)
    try:
        table = _load(fmt, path, columns)
    except DataFormatError as err:
        _check_refused(err, path, raw.count(b"\n") + raw.count(b"\r") + 1)
    else:
        _check_loaded(table, fmt, raw.decode("utf-8"), path, 1 if fmt in ("csv", "tsv") else 0)


def test_the_fixed_examples_are_refused_with_file_and_line() -> None:
    """The inputs that used to escape as other exceptions now name the file and line (kept as plain asserts too)."""
    cases = {
        "ml-100k": ("1\t1\t1\t" + "9" * 400 + "\n", 1, "too large"),
        "jsonl": ('{"user": 1, "item": 2, "timestamp": 5}\n{"user": "\\ud800", "item": 2, "timestamp": 1}\n', 2, "lone surrogate"),
    }
    for fmt, (content, line, reason) in cases.items():
        path = _path(fmt)
        _write(path, content)
        with pytest.raises(DataFormatError, match=reason) as info:
            _load(fmt, path, ColumnMap())
        assert info.value.line == line and str(info.value).startswith(f"{path}:{line}: ")
    path = _path("ml-1m")
    _write(path, "0007::1::1::" + "1" * 5000 + "\n")
    with pytest.raises(DataFormatError, match=r":1: timestamp '1111.*\(5000 characters\) is too large"):
        _load("ml-1m", path, ColumnMap())
    _write(path, "0" + "7" * 5000 + "::1::1::1\n")
    assert _load("ml-1m", path, ColumnMap()).users == ["7" * 5000]


# ---------------------------------------------------------------------------- parquet


parquet_values = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.sampled_from(HOSTILE_VALUES[:20]),
)


@st.composite
def parquet_tables(draw: st.DrawFn) -> tuple[pa.Table, ColumnMap]:
    columns = draw(column_maps())
    n = draw(st.integers(0, 6))
    names = list(columns.required()) + draw(st.lists(column_names, max_size=2))
    names = list(dict.fromkeys(draw(st.permutations(names))))
    if draw(st.booleans()):
        del names[draw(st.integers(0, len(names) - 1))]  # a mapped column may be missing
    arrays = []
    for _ in names:
        kind = draw(st.sampled_from(["int", "float", "str", "mixed_str", "timestamp", "date"]))
        if kind == "int":
            arrays.append(pa.array(draw(st.lists(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)), min_size=n, max_size=n)), pa.int64()))
        elif kind == "float":
            arrays.append(pa.array(draw(st.lists(st.floats(), min_size=n, max_size=n)), pa.float64()))
        elif kind == "str":
            arrays.append(pa.array(draw(st.lists(st.one_of(st.none(), st.text(max_size=8)), min_size=n, max_size=n)), pa.string()))
        elif kind == "mixed_str":
            arrays.append(pa.array([str(v) for v in draw(st.lists(parquet_values, min_size=n, max_size=n))], pa.string()))
        elif kind == "timestamp":
            unit = draw(st.sampled_from(["s", "ms", "us", "ns"]))
            # Within what pyarrow can write: Parquet has no second unit, and the cast to ms must not overflow int64.
            values = draw(st.lists(st.one_of(st.none(), st.integers(-(2**50), 2**50)), min_size=n, max_size=n))
            arrays.append(pa.array(values, pa.int64()).cast(pa.timestamp(unit, tz=draw(st.sampled_from([None, "UTC"])))))
        else:
            arrays.append(pa.array(draw(st.lists(st.one_of(st.none(), st.integers(-(10**5), 10**6)), min_size=n, max_size=n)), pa.int32()).cast(pa.date32()))
    return pa.table(dict(zip(names, arrays))) if names else pa.table({}), columns


@SLOW
@given(table_and_columns=parquet_tables(), damage=st.one_of(st.none(), st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=8))))
def test_parquet_files_of_any_types_or_damaged_bytes(table_and_columns, damage) -> None:
    table, columns = table_and_columns
    path = _path("parquet")
    pq.write_table(table, path)
    if damage is not None:
        raw = bytearray(path.read_bytes())
        at, junk = damage
        at %= len(raw)
        raw[at:at + len(junk)] = junk
        path.write_bytes(bytes(raw))
    try:
        loaded = _load("parquet", path, columns)
    except DataFormatError as err:
        _check_refused(err, path, table.num_rows)
    else:
        assert loaded.lines.tolist() == list(range(1, len(loaded) + 1))
        if damage is None:
            assert len(loaded) == table.num_rows
        for value in (*loaded.users, *loaded.items):
            assert isinstance(value, str) and value
        assert np.all(np.isfinite(loaded.timestamps)) and np.all(loaded.timestamps >= 0)
        to_sequences(loaded, "hostile")
