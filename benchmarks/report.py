"""Writing a benchmark's table into its own section of docs/benchmarks.md, and its result files."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from fedinterest.common.run_files import DEVICE_EPSILON_MAX

# Results measured since issue 13 (defect 1) carry this key: their devices hid their window
# count. Before, a device's layer-1 epsilon was accounted for adding or removing a window
# while its replies revealed the count, so the figure is under the old relation (marked).
WINDOW_COUNT_HIDDEN = "layer1_window_count_hidden"
OLD_RELATION_MARK = "†"
OLD_RELATION_NOTE = (
    f"{OLD_RELATION_MARK} layer-1 ε computed under the old neighbour relation (add/remove one window while the "
    "replies revealed the device's window count): not a valid guarantee for what those replies revealed; corrected "
    "figures are in \"Layer-1 ε measured before issue 13\" (docs/benchmarks.md)."
)


def layer1_epsilon(summary: dict[str, Any]) -> str:
    """A result's largest device epsilon with its delta, marked when measured under the old relation."""
    privacy = summary["privacy"]
    if not privacy.get("dp"):
        return "no DP"
    value = privacy.get(DEVICE_EPSILON_MAX)
    text = f"{'-' if value is None else format(value, '.2f')} ({privacy['delta']:g})"
    return text if summary.get(WINDOW_COUNT_HIDDEN) else f"{text} {OLD_RELATION_MARK}"


def old_relation_note(summaries: list[dict[str, Any]]) -> list[str]:
    """The footnote for the marked figures of a table (empty when none is marked)."""
    marked = any(layer1_epsilon(s).endswith(OLD_RELATION_MARK) for s in summaries)
    return ["", OLD_RELATION_NOTE] if marked else []


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


def store_result(directory: Path, name: str, payload: dict[str, Any]) -> Path:
    """Write one benchmark result as `directory/name.json` (indented, one file per row) and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return path
