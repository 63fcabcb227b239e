"""What every interaction loader shares: the file read whole as text, its lines, and the errors.

Every loader reads the whole file first, then validates it row by row and raises a
`DataFormatError` naming the file, the 1-based line and the reason at the FIRST bad
row. Nothing is skipped or repaired silently: a bad row in a dataset would otherwise
change what the experiments measure without anyone noticing.
"""

from __future__ import annotations

from pathlib import Path

from fedinterest.common.errors import FedinterestError
from fedinterest.common.interactions import DataFormatError


class BadValue(FedinterestError):
    """A value-level problem; the row loop adds file and line and re-raises it as DataFormatError."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_file(path: str | Path) -> Path:
    """The path as a Path, after checking that it is an existing regular file."""
    p = Path(path)
    if not p.exists():
        raise DataFormatError(str(path), None, "file does not exist")
    if p.is_dir():
        raise DataFormatError(str(path), None, "is a directory, not a file")
    return p


def read_text(path: str | Path) -> str:
    """The whole file decoded as UTF-8; errors for a missing, unreadable, non-UTF-8 or empty file."""
    p = check_file(path)
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


def split_lines(text: str) -> list[str]:
    """Lines without terminators; one final newline is not a blank line."""
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def blank_line(src: str, line: int) -> DataFormatError:
    return DataFormatError(src, line, "blank line inside the data (only a final newline is allowed)")


def short_repr(value: str, limit: int = 40) -> str:
    """repr() of a value, cut to about `limit` characters so a huge field does not flood the message."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value)} characters)"
