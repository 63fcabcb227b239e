"""Writing a benchmark's table into its own section of docs/benchmarks.md."""

from __future__ import annotations

import sys
from pathlib import Path


def replace_section(path: Path, name: str, content: str) -> None:
    """Replace the text between `<!-- name:begin -->` and `<!-- name:end -->` (appended if absent)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{content.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def publish(path: Path, name: str, table: str) -> None:
    """Print a benchmark's table and rewrite its section of `path` with it."""
    print(table)
    replace_section(path, name, table)
    print(f"wrote the {name} table to {path}", file=sys.stderr)
