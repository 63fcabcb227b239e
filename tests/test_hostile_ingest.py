"""Hostile input for `device ingest` (issue 5, part 4): property-based tests on a real device store.

Any file either is imported or is refused with a clear error (naming the file). After a
refusal the store holds exactly what it held before (every table, row for row) and
SQLite's integrity check passes; importing the same file twice adds nothing.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
from pathlib import Path

import pytest
from device_helpers import make_device
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedinterest.client.device_cli import app
from fedinterest.client.device_dir import DeviceDir
from fedinterest.client.device_store import StoreError
from fedinterest.client.ingest import ingest_file
from fedinterest.common.interactions import DataFormatError

# An ingest is a few SQLite transactions with synchronous=FULL (fsyncs): keep the counts modest.
SETTINGS = settings(max_examples=60, deadline=None)

# The errors the device CLI turns into a one-line message and exit status 2 (client/device_cli.py).
REFUSALS = (DataFormatError, StoreError, ValueError)

SUFFIXES = {"csv": ".csv", "tsv": ".tsv", "jsonl": ".jsonl", "ml-100k": ".data", "sequences": ".txt"}


@pytest.fixture(scope="module")
def device() -> DeviceDir:
    # One device for all examples of the module: later examples meet a store that already holds a
    # user, a history and earlier imports, which is where a refusal could do damage.
    return make_device(Path(tempfile.mkdtemp(prefix="hostile-ingest-")), num_items=40)


def snapshot(store_path: Path) -> dict[str, list[tuple]]:
    """Every row of every table of the store, read through a separate read-only connection."""
    conn = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
    try:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: conn.execute(f'SELECT * FROM "{t}" ORDER BY rowid').fetchall() for t in tables if t != "sqlite_sequence"}
    finally:
        conn.close()


# ---------------------------------------------------------------------------- files

items = st.one_of(st.integers(1, 45).map(lambda i: f"m{i}"), st.sampled_from(["m1", "x", "\u00e9t\u00e9", "9" * 50]))
times = st.one_of(st.integers(0, 2**40), st.floats(0, 1e12, allow_nan=False))
users = st.sampled_from(["u1", "u1", "u1", "u2"])  # mostly the device's own user; u2 must be refused once u1 is stored
HOSTILE = ["", " ", "nan", "inf", "-1", "1e400", "9" * 400, "9" * 5000, "\\ud800", "\x00", "\ufeff", '"', ",", "\t", "::",
           "[" * 2000, "2024-13-45", "\u0661", "null"]
hostile = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=10))


def _render(fmt: str, rows: list[tuple[str, str, float]]) -> str:
    if fmt == "csv":
        return "user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows)
    if fmt == "tsv":
        return "user\titem\ttimestamp\n" + "".join(f"{u}\t{i}\t{t}\n" for u, i, t in rows)
    if fmt == "jsonl":
        return "".join(json.dumps({"user": u, "item": i, "timestamp": t}) + "\n" for u, i, t in rows)
    if fmt == "ml-100k":  # numeric ids only: the catalogue does not know them (kept, not used)
        return "".join(f"{u[1:]}\t{i.removeprefix('m') if i.removeprefix('m').isdigit() else 7}\t3\t{int(t)}\n" for u, i, t in rows)
    by_user: dict[str, list[str]] = {}
    for u, i, _ in rows:
        by_user.setdefault(u, []).append(i if i.strip() and " " not in i else "m1")
    return "".join(f"{u} {' '.join(seq)}\n" for u, seq in by_user.items())


@st.composite
def files(draw: st.DrawFn) -> tuple[str, str | bytes]:
    """A format and a file of it: valid, damaged at one place, or arbitrary bytes."""
    fmt = draw(st.sampled_from(sorted(SUFFIXES)))
    user = draw(users)
    rows = draw(st.lists(st.tuples(st.just(user), items, times), min_size=1, max_size=8))
    if draw(st.booleans()):
        rows.append((draw(users), draw(items), draw(times)))  # perhaps a second user in the file
    text = _render(fmt, rows)
    kind = draw(st.sampled_from(["valid", "valid", "insert", "truncate", "bytes", "crlf_bom"]))
    if kind == "insert":
        at = draw(st.integers(0, len(text)))
        return fmt, text[:at] + draw(hostile) + text[at:]
    if kind == "truncate":
        raw = text.encode("utf-8")
        return fmt, raw[: draw(st.integers(0, len(raw)))]
    if kind == "bytes":
        return fmt, draw(st.binary(max_size=200))
    if kind == "crlf_bom":
        return fmt, "\ufeff" + text.replace("\n", "\r\n")
    return fmt, text


_counter = iter(range(10**9))


def _write(device: DeviceDir, fmt: str, content: str | bytes) -> Path:
    # A new file name per example: the store keeps the resolved path of each import.
    path = device.root.parent / f"history-{next(_counter)}{SUFFIXES[fmt]}"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    return path


# ---------------------------------------------------------------------------- properties


@SETTINGS
@given(file=files())
@example(file=("jsonl", '{"user": "\\ud800", "item": "m1", "timestamp": 1}\n')).via(
    "lone surrogate user id: was accepted by the loader, then UnicodeEncodeError inside the store's transaction")
@example(file=("ml-100k", "1\t1\t3\t" + "9" * 400 + "\n")).via("huge MovieLens timestamp: was OverflowError")
def test_ingest_imports_or_refuses_and_a_refusal_changes_nothing(device: DeviceDir, file) -> None:
    fmt, content = file
    path = _write(device, fmt, content)
    before = snapshot(device.store_path)
    with device.store() as store:
        try:
            result = ingest_file(store, path, fmt=fmt)
        except REFUSALS as err:
            event(f"refused: {type(err).__name__}")
            assert path.name in str(err), str(err)  # the message says which file
            str(err).encode("utf-8")  # and can be printed
            assert snapshot(device.store_path) == before
            assert store.integrity_check() == "ok"
            return
        event("already imported" if result.already_imported else "imported")
        assert store.integrity_check() == "ok"
        after = snapshot(device.store_path)
        if result.already_imported:  # the same bytes were imported by an earlier example
            assert after == before and result.rows_added == 0
        else:
            assert len(after["store_imports"]) == len(before["store_imports"]) + 1
            assert len(after["store_events"]) == len(before["store_events"]) + result.rows_added
            assert result.rows_added + result.duplicates == result.rows_read >= 1
            # Earlier rows are untouched: the import only appended.
            assert after["store_events"][: len(before["store_events"])] == before["store_events"]
            assert store.user_id() == result.user_id
        # Importing the same file again adds nothing and changes nothing.
        again = ingest_file(store, path, fmt=fmt)
        assert again.already_imported and again.rows_added == 0
        assert snapshot(device.store_path) == after


@settings(max_examples=25, deadline=None)
@given(file=files())
def test_device_ingest_command_exits_2_with_a_one_line_error_or_imports(device: DeviceDir, file) -> None:
    """Through the `device ingest` command: exit 0, or exit 2 with `error: FILE...`, never a traceback."""
    fmt, content = file
    path = _write(device, fmt, content)
    before = snapshot(device.store_path)
    result = CliRunner().invoke(app, ["ingest", str(path), "--dir", str(device.root), "--format", fmt])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (0, 2), result.output
    event(f"exit {result.exit_code}")
    if result.exit_code == 2:
        assert "error: " in result.output and path.name in result.output and "Traceback" not in result.output
        assert snapshot(device.store_path) == before
    with device.store() as store:
        assert store.integrity_check() == "ok"
