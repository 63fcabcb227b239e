"""Tests of the interaction-file loaders: malformed input is refused with file, line and reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from loader_helpers import expect_error, write_file, write_parquet

from fedinterest.common.column_values import ColumnMap
from fedinterest.common.interactions import to_sequences
from fedinterest.common.movielens_loader import load_movielens_1m, load_movielens_100k
from fedinterest.common.sequence_loader import load_sequences
from fedinterest.common.table_loader import load_table

# ---------------------------------------------------------------------------- file-level errors

ALL_LOADERS = {
    "ml-100k": load_movielens_100k,
    "ml-1m": load_movielens_1m,
    "csv": lambda p: load_table(p, format="csv"),
    "tsv": lambda p: load_table(p, format="tsv"),
    "jsonl": lambda p: load_table(p, format="jsonl"),
    "parquet": lambda p: load_table(p, format="parquet"),
    "sequences": load_sequences,
}


@pytest.mark.parametrize("fmt", list(ALL_LOADERS))
def test_missing_file_and_directory(tmp_path: Path, fmt: str) -> None:
    expect_error(ALL_LOADERS[fmt], tmp_path / "nope.dat", None, "file does not exist")
    (tmp_path / "adir").mkdir()
    expect_error(ALL_LOADERS[fmt], tmp_path / "adir", None, "is a directory")


@pytest.mark.parametrize("fmt", list(ALL_LOADERS))
@pytest.mark.parametrize(("content", "reason"), [("", "file is empty"), (" \n\n\t\n", "only whitespace")])
def test_empty_files(tmp_path: Path, fmt: str, content: str, reason: str) -> None:
    if fmt == "parquet" and content:
        reason = "not a readable Parquet file"
    expect_error(ALL_LOADERS[fmt], write_file(tmp_path, "f.dat", content), None, reason)


# ---------------------------------------------------------------------------- MovieLens errors

ML_BAD = [
    # (rows joined by the format's separator, bad line, reason)
    ("1 2 3 4\n1 2 3\n", 2, "expected 4 {sep} fields, got 3"),
    ("1 2 3 4\n1 2 3 4 5\n", 2, "expected 4 {sep} fields, got 5"),
    ("1 2 3 4\n\n1 2 3 4\n", 2, "blank line inside the data"),
    ("1 2 3 4\n1 2 3 4\n\n", 3, "blank line inside the data"),
    ("1 2 3 4\n   \n1 2 3 4\n", 2, "blank line inside the data"),
    ("x 2 3 4\n", 1, "user id 'x' is not an integer"),
    ("1 2 3 4\n1 2.5 3 4\n", 2, "item id '2.5' is not an integer"),
    ("1 -2 3 4\n", 1, "item id '-2' is not an integer"),
    ("1 2 6 4\n", 1, "rating '6' is not an integer in 1..5"),
    ("1 2 0 4\n", 1, "rating '0' is not an integer in 1..5"),
    ("1 2 3.0 4\n", 1, "rating '3.0' is not an integer in 1..5"),
    ("1 2 3 4\n1 2 3 4\n1 2 3 abc\n", 3, "timestamp 'abc' is not an integer"),
    ("1 2 3 -5\n", 1, "timestamp '-5' is negative"),
    ("1 2 3 nan\n", 1, "timestamp 'nan' is not an integer"),
    ("1 2 3 inf\n", 1, "timestamp 'inf' is not an integer"),
    ("1 2 3 4\n1 2 3 1.5\n", 2, "timestamp '1.5' is not an integer"),
    ("1 2 3 4\n1 x 3 4\n1 2 9 4\n", 2, "item id 'x'"),  # the first bad line wins
]


@pytest.mark.parametrize(("content", "line", "reason"), ML_BAD)
@pytest.mark.parametrize(
    ("loader", "sep", "sep_name"),
    [(load_movielens_100k, "\t", "tab-separated"), (load_movielens_1m, "::", "'::'-separated")],
    ids=["ml-100k", "ml-1m"],
)
def test_movielens_errors(tmp_path: Path, loader, sep: str, sep_name: str, content: str, line: int, reason: str) -> None:
    text = "\n".join(row.replace(" ", sep) if row.strip() else row for row in content.split("\n"))
    expect_error(loader, write_file(tmp_path, "ratings.dat", text), line, reason.format(sep=sep_name))


def test_movielens_wrong_layout_and_bad_utf8(tmp_path: Path) -> None:
    # A 1M file given to the 100K loader (and vice versa) fails on line 1, not later.
    expect_error(load_movielens_100k, write_file(tmp_path, "a.dat", "1::2::3::4\n"), 1, "expected 4 tab-separated fields, got 1")
    expect_error(load_movielens_1m, write_file(tmp_path, "b.dat", "1\t2\t3\t4\n"), 1, "expected 4 '::'-separated fields, got 1")
    bad = b"1\t2\t3\t4\n1\t2\t3\t4\n1\t\xe9\t3\t4\n"
    expect_error(load_movielens_100k, write_file(tmp_path, "c.dat", bad), 3, "not valid UTF-8 (byte 0xe9 at column 3)")
    expect_error(load_movielens_1m, write_file(tmp_path, "d.dat", bad.replace(b"\t", b"::")), 3, "not valid UTF-8")


# ---------------------------------------------------------------------------- MovieLens happy paths


def test_movielens_100k_reads_rows_exactly(tmp_path: Path) -> None:
    path = write_file(tmp_path, "u.data", "196\t242\t3\t881250949\n186\t302\t1\t891717742\n007\t0100\t5\t0")
    table = load_movielens_100k(path)
    assert table.source == str(path)
    assert table.users == ["196", "186", "7"]
    assert table.items == ["242", "302", "100"]
    np.testing.assert_array_equal(table.timestamps, [881250949.0, 891717742.0, 0.0])
    np.testing.assert_array_equal(table.ratings, [3.0, 1.0, 5.0])
    np.testing.assert_array_equal(table.lines, [1, 2, 3])
    assert table.timestamps.dtype == np.float64 and table.ratings.dtype == np.float64 and table.lines.dtype == np.int64


def test_movielens_1m_reads_rows_exactly(tmp_path: Path) -> None:
    path = write_file(tmp_path, "ratings.dat", "1::1193::5::978300760\r\n1::661::3::978302109\r\n2::1193::4::978300000\r\n")
    table = load_movielens_1m(path)
    assert table.users == ["1", "1", "2"]
    assert table.items == ["1193", "661", "1193"]
    np.testing.assert_array_equal(table.timestamps, [978300760.0, 978302109.0, 978300000.0])
    np.testing.assert_array_equal(table.ratings, [5.0, 3.0, 4.0])
    np.testing.assert_array_equal(table.lines, [1, 2, 3])


# ---------------------------------------------------------------------------- CSV / TSV errors

RATED = ColumnMap(rating="rating")
CSV_BAD = [
    # (content with "," as separator, columns, line, reason)
    ("user,item,time\n1,2,3\n", ColumnMap(), 1, "column 'timestamp' missing; header has: user, item, time"),
    ("user,item,timestamp\n1,2,3\n", RATED, 1, "column 'rating' missing; header has: user, item, timestamp"),
    ("user,item,timestamp,item\n1,2,3,4\n", ColumnMap(), 1, "duplicate column name(s) in header: 'item'"),
    ("\nuser,item,timestamp\n1,2,3\n", ColumnMap(), 1, "blank line where the header row was expected"),
    ("user,item,timestamp\n1,2,3\nuser,item,timestamp\n4,5,6\n", ColumnMap(), 3, "the header row appears again"),
    ("user,item,timestamp\n1,2,3\n1,2\n", ColumnMap(), 3, "expected 3 {sep} fields (as in the header), got 2"),
    ("user,item,timestamp\n1,2,3,4\n", ColumnMap(), 2, "expected 3 {sep} fields (as in the header), got 4"),
    ("user,item,timestamp\n1,2,3\n\n4,5,6\n", ColumnMap(), 3, "blank line inside the data"),
    ("user,item,timestamp\n1,2,3\n4,5,6\n\n", ColumnMap(), 4, "blank line inside the data"),
    ("user,item,timestamp\n1,2,abc\n", ColumnMap(), 2, "timestamp 'abc' in column 'timestamp' is neither epoch seconds nor an ISO-8601"),
    ("user,item,timestamp\n1,2,2024-13-01\n", ColumnMap(), 2, "timestamp '2024-13-01'"),
    ("user,item,timestamp\n1,2,3\n1,2,-4\n", ColumnMap(), 3, "timestamp '-4' in column 'timestamp' is negative"),
    ("user,item,timestamp\n1,2,nan\n", ColumnMap(), 2, "timestamp 'nan' in column 'timestamp' is not finite"),
    ("user,item,timestamp\n1,2,inf\n", ColumnMap(), 2, "timestamp 'inf' in column 'timestamp' is not finite"),
    ("user,item,timestamp\n1,2,\n", ColumnMap(), 2, "empty timestamp in column 'timestamp'"),
    ("user,item,timestamp\n1,2,1_000\n", ColumnMap(), 2, "timestamp '1_000' in column 'timestamp' is neither"),
    ("user,item,timestamp\n1,2,3\n  ,2,3\n", ColumnMap(), 3, "empty user value in column 'user'"),
    ("user,item,timestamp\n1,,3\n", ColumnMap(), 2, "empty item value in column 'item'"),
    ("user,item,timestamp,rating\n1,2,3,good\n", RATED, 2, "rating 'good' in column 'rating' is not a number"),
    ("user,item,timestamp,rating\n1,2,3,nan\n", RATED, 2, "rating 'nan' in column 'rating' is not finite"),
    ("user,item,timestamp\n", ColumnMap(), None, "the file has a header but no data rows"),
]


@pytest.mark.parametrize(("content", "columns", "line", "reason"), CSV_BAD)
@pytest.mark.parametrize(("fmt", "sep", "sep_name"), [("csv", ",", "comma-separated"), ("tsv", "\t", "tab-separated")])
def test_delimited_errors(tmp_path: Path, fmt: str, sep: str, sep_name: str, content, columns, line, reason) -> None:
    path = write_file(tmp_path, f"data.{fmt}", content.replace(",", sep))
    expect_error(lambda p: load_table(p, columns=columns), path, line, reason.format(sep=sep_name))


def test_csv_quoting_errors_and_line_numbers(tmp_path: Path) -> None:
    head = "user,item,timestamp,note\n"
    # Unclosed quote: reported on the line where the broken row starts.
    expect_error(load_table, write_file(tmp_path, "a.csv", head + '1,2,3,ok\n1,2,3,"open\n'), 3, "malformed CSV: unexpected end of data")
    expect_error(load_table, write_file(tmp_path, "b.csv", head + '1,2,3,"x"y\n'), 2, "malformed CSV")
    # A quoted field spanning lines 2-3 shifts the physical line of every later row.
    expect_error(load_table, write_file(tmp_path, "c.csv", head + '1,2,3,"two\nlines"\n1,2,bad,x\n'), 4, "timestamp 'bad'")
    expect_error(load_table, write_file(tmp_path, "d.csv", (head + "1,2,3,x\n1,2,3,\xe9\n").encode("latin-1")), 3, "not valid UTF-8")


# ---------------------------------------------------------------------------- CSV / TSV happy paths


def test_csv_reads_rows_exactly(tmp_path: Path) -> None:
    text = 'user,item,timestamp,note\r\n u1 ,i1,100,"a, b"\r\nu2,i2,50.5,"multi\r\nline"\r\nu1,i3,100,\r\n'
    table = load_table(write_file(tmp_path, "x.csv", text))
    assert table.users == ["u1", "u2", "u1"]
    assert table.items == ["i1", "i2", "i3"]
    np.testing.assert_array_equal(table.timestamps, [100.0, 50.5, 100.0])
    assert table.ratings is None
    np.testing.assert_array_equal(table.lines, [2, 3, 5])


def test_column_mapping_ratings_and_iso_timestamps(tmp_path: Path) -> None:
    text = (
        "uid,iid,ts,stars,extra\n"
        "a,x,2024-01-01T00:00:00Z,4.5,-\n"
        "a,y,2024-01-01 01:00:00,3,-\n"  # naive = UTC
        "b,x,2024-01-01T02:00:00+01:00,1,-\n"
        "b,z,2024-01-02,2,-\n"
        "c,z,1.7e9,5,-\n"
    )
    columns = ColumnMap(user="uid", item="iid", timestamp="ts", rating="stars")
    table = load_table(write_file(tmp_path, "mapped.csv", text), columns=columns)
    base = 1704067200.0  # 2024-01-01T00:00:00Z
    assert table.users == ["a", "a", "b", "b", "c"]
    assert table.items == ["x", "y", "x", "z", "z"]
    np.testing.assert_array_equal(table.timestamps, [base, base + 3600, base + 3600, base + 86400, 1.7e9])
    np.testing.assert_array_equal(table.ratings, [4.5, 3.0, 1.0, 2.0, 5.0])
    np.testing.assert_array_equal(table.lines, [2, 3, 4, 5, 6])


def test_tsv_reads_rows_exactly(tmp_path: Path) -> None:
    # TSV has no quoting: a quote character is part of the value.
    text = 'user\titem\ttimestamp\n"u1"\ti 1\t7\nu2\ti2\t2024-03-01T12:00:00\n'
    for name in ("x.tsv", "x.tab"):
        table = load_table(write_file(tmp_path, name, text))
        assert table.users == ['"u1"', "u2"]
        assert table.items == ["i 1", "i2"]
        np.testing.assert_array_equal(table.timestamps, [7.0, 1709294400.0])
        np.testing.assert_array_equal(table.lines, [2, 3])


# ---------------------------------------------------------------------------- JSON lines

JSONL_BAD = [
    ('{"user": "a", "item": "b", "timestamp": 1}\n{"user": "a",\n', 2, "invalid JSON: Expecting property name"),
    ("not json\n", 1, "invalid JSON: Expecting value (column 1)"),
    ('[1, 2, 3]\n', 1, "expected a JSON object, got an array"),
    ('"text"\n', 1, "expected a JSON object, got a string"),
    ('{"user": "a", "item": "b", "time": 1}\n', 1, "key 'timestamp' missing; object has: user, item, time"),
    ('{"user": "a", "item": "b", "timestamp": 1}\n\n{"user": "a", "item": "b", "timestamp": 1}\n', 2, "blank line inside the data"),
    ('{"user": "a", "item": "b", "timestamp": 1, "user": "c"}\n', 1, "duplicate key 'user' in JSON object"),
    ('{"user": null, "item": "b", "timestamp": 1}\n', 1, "user value missing (null) in column 'user'"),
    ('{"user": "a", "item": " ", "timestamp": 1}\n', 1, "empty item value in column 'item'"),
    ('{"user": "a", "item": 1.5, "timestamp": 1}\n', 1, "item value 1.5 in column 'item' is not a string or integer id"),
    ('{"user": "a", "item": "b", "timestamp": true}\n', 1, "timestamp True in column 'timestamp' is a boolean"),
    ('{"user": "a", "item": "b", "timestamp": NaN}\n', 1, "timestamp nan in column 'timestamp' is not finite"),
    ('{"user": "a", "item": "b", "timestamp": -1.5}\n', 1, "timestamp -1.5 in column 'timestamp' is negative"),
    ('{"user": "a", "item": "b", "timestamp": "yesterday"}\n', 1, "timestamp 'yesterday' in column 'timestamp' is neither"),
    ('{"user": "a", "item": "b", "timestamp": [1]}\n', 1, "timestamp [1] in column 'timestamp' has unsupported type list"),
    (b'{"user": "a", "item": "b", "timestamp": 1}\n{"user": "\xff"}\n', 2, "not valid UTF-8"),
]


@pytest.mark.parametrize(("content", "line", "reason"), JSONL_BAD)
def test_jsonl_errors(tmp_path: Path, content, line: int, reason: str) -> None:
    expect_error(load_table, write_file(tmp_path, "x.jsonl", content), line, reason)


def test_jsonl_rating_errors(tmp_path: Path) -> None:
    load = lambda p: load_table(p, columns=RATED)  # noqa: E731
    expect_error(load, write_file(tmp_path, "a.jsonl", '{"user": "a", "item": "b", "timestamp": 1}\n'), 1, "key 'rating' missing")
    expect_error(load, write_file(tmp_path, "b.jsonl", '{"user": "a", "item": "b", "timestamp": 1, "rating": null}\n'), 1, "rating None in column 'rating' is not a number")
    expect_error(load, write_file(tmp_path, "c.jsonl", '{"user": "a", "item": "b", "timestamp": 1, "rating": Infinity}\n'), 1, "rating inf in column 'rating' is not finite")


def test_jsonl_reads_rows_exactly(tmp_path: Path) -> None:
    text = (
        '{"u": 12, "i": "x", "t": 5, "r": 4, "other": {"k": 1}}\n'
        '{"u": "13", "i": 7, "t": 2.5, "r": "3.5"}\n'
        '{"u": 12.0, "i": "y", "t": "1970-01-01T00:01:00", "r": 1}'
    )
    for name in ("x.jsonl", "x.ndjson"):
        table = load_table(write_file(tmp_path, name, text), columns=ColumnMap("u", "i", "t", "r"))
        assert table.users == ["12", "13", "12"]
        assert table.items == ["x", "7", "y"]
        np.testing.assert_array_equal(table.timestamps, [5.0, 2.5, 60.0])
        np.testing.assert_array_equal(table.ratings, [4.0, 3.5, 1.0])
        np.testing.assert_array_equal(table.lines, [1, 2, 3])


# ---------------------------------------------------------------------------- Parquet

GOOD = {"user": ["a", "b", "c"], "item": ["x", "y", "z"], "timestamp": [1, 2, 3]}


def _with(column: str, values: list) -> dict:
    return {**GOOD, column: values}


PARQUET_BAD = [
    ({"user": ["a"], "item": ["x"], "time": [1]}, ColumnMap(), None, "column 'timestamp' missing; the file has: user, item, time"),
    (GOOD, RATED, None, "column 'rating' missing; the file has: user, item, timestamp"),
    (
        pa.Table.from_arrays([pa.array(["a"]), pa.array(["x"]), pa.array([1]), pa.array(["y"])], names=["user", "item", "timestamp", "item"]),
        ColumnMap(),
        None,
        "duplicate column name(s) in the file: 'item'",
    ),
    (pa.table({k: pa.array([], pa.string()) for k in GOOD}), ColumnMap(), None, "the file holds no rows"),
    (_with("user", ["a", None, "c"]), ColumnMap(), 2, "user value missing (null) in column 'user'"),
    (_with("item", ["x", "y", "  "]), ColumnMap(), 3, "empty item value in column 'item'"),
    (_with("timestamp", ["1", "2", "abc"]), ColumnMap(), 3, "timestamp 'abc' in column 'timestamp' is neither"),
    (_with("timestamp", [1.0, float("nan"), 3.0]), ColumnMap(), 2, "timestamp nan in column 'timestamp' is not finite"),
    (_with("timestamp", [1, 2, -3]), ColumnMap(), 3, "timestamp -3 in column 'timestamp' is negative"),
    (_with("timestamp", [1, None, 3]), ColumnMap(), 2, "timestamp missing (null)"),
    ({**GOOD, "rating": [1.0, 2.0, float("inf")]}, RATED, 3, "rating inf in column 'rating' is not finite"),
]


@pytest.mark.parametrize(("data", "columns", "line", "reason"), PARQUET_BAD)
def test_parquet_errors(tmp_path: Path, data, columns: ColumnMap, line: int | None, reason: str) -> None:
    path = write_parquet(tmp_path, "x.parquet", data)
    expect_error(lambda p: load_table(p, columns=columns), path, line, reason)


def test_parquet_unreadable(tmp_path: Path) -> None:
    expect_error(load_table, write_file(tmp_path, "junk.parquet", b"PAR1 this is not parquet at all"), None, "not a readable Parquet file")
    good = write_parquet(tmp_path, "good.parquet", GOOD)
    truncated = write_file(tmp_path, "cut.parquet", good.read_bytes()[:-20])
    expect_error(load_table, truncated, None, "not a readable Parquet file")


def test_parquet_reads_rows_exactly(tmp_path: Path) -> None:
    stamps = pa.array([0, 1_500_000, 86_400_000_000_000], pa.timestamp("ns", tz="UTC"))
    data = pa.table({"uid": [3, 4, 3], "iid": ["p", "q", "r"], "ts": stamps, "stars": [1.0, 2.5, 5.0]})
    table = load_table(write_parquet(tmp_path, "x.parquet", data), columns=ColumnMap("uid", "iid", "ts", "stars"))
    assert table.users == ["3", "4", "3"]
    assert table.items == ["p", "q", "r"]
    np.testing.assert_array_equal(table.timestamps, [0.0, 0.0015, 86400.0])
    np.testing.assert_array_equal(table.ratings, [1.0, 2.5, 5.0])
    np.testing.assert_array_equal(table.lines, [1, 2, 3])
    table = load_table(write_parquet(tmp_path, "y.parquet", _with("timestamp", ["2024-01-01", "5", "6.5"])))
    np.testing.assert_array_equal(table.timestamps, [1704067200.0, 5.0, 6.5])
    assert table.ratings is None


# ---------------------------------------------------------------------------- sequence format

SEQ_BAD = [
    ("u1 a b\nu2\n", 2, "user 'u2' has no items"),
    ("u1 a b\nu2 c\nu1 d\n", 3, "user 'u1' appears again (first on line 1)"),
    ("u1 a b\n\nu2 c\n", 2, "blank line inside the data"),
    ("u1 a b\nu2 c\n\n", 3, "blank line inside the data"),
    ("u1 a b\n \t \nu2 c\n", 2, "blank line inside the data"),
    (b"u1 a b\nu2 \xc3\x28\n", 2, "not valid UTF-8 (byte 0xc3 at column 4)"),
]


@pytest.mark.parametrize(("content", "line", "reason"), SEQ_BAD)
def test_sequence_errors(tmp_path: Path, content, line: int, reason: str) -> None:
    expect_error(load_sequences, write_file(tmp_path, "seq.txt", content), line, reason)


def test_sequences_read_exactly_and_keep_file_order(tmp_path: Path) -> None:
    table = load_sequences(write_file(tmp_path, "seq.txt", "u1 c a b a\nu2\tb  a\n"))
    assert table.users == ["u1"] * 4 + ["u2"] * 2
    assert table.items == ["c", "a", "b", "a", "b", "a"]
    np.testing.assert_array_equal(table.timestamps, [0, 1, 2, 3, 0, 1])
    np.testing.assert_array_equal(table.lines, [1, 1, 1, 1, 2, 2])
    assert table.ratings is None
    data = to_sequences(table, "seq")
    assert data.item_ids == ("c", "a", "b")
    assert [s.tolist() for s in data.sequences] == [[1, 2, 3, 2], [3, 2]]
