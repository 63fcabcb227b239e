"""The item catalogue shared by the operator and the devices: raw item ids <-> model indices.

File format (`catalogue.txt`): UTF-8, one raw item id per line, no header. Line i
(1-based) is model item index i; index 0 is PAD_ID and never names an item. The
operator's deployment and every device bundle carry the same file, so a model's head
column i means the same item everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from fedinterest.common.constants import PAD_ID
from fedinterest.common.interactions import DataFormatError


class Catalogue:
    """An ordered list of distinct raw item ids; item index i is `ids[i - 1]`."""

    def __init__(self, ids: Sequence[str], source: str = "<memory>") -> None:
        """Check the ids (non-empty, distinct, no blanks or line breaks) and index them."""
        self.source = source
        self.ids: tuple[str, ...] = tuple(ids)
        if not self.ids:
            raise DataFormatError(source, None, "the catalogue is empty: it needs at least one item id")
        self._index: dict[str, int] = {}
        for position, item in enumerate(self.ids, start=1):
            if not isinstance(item, str) or not item.strip() or item != item.strip() or "\n" in item or "\r" in item:
                raise DataFormatError(source, position, f"item id {item!r} is blank or has surrounding whitespace or a line break")
            first = self._index.setdefault(item, position)
            if first != position:
                raise DataFormatError(source, position, f"item id {item!r} appears again (first on line {first})")

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item: object) -> bool:
        return item in self._index

    def index(self, item: str) -> int | None:
        """The model index (1..len) of raw id `item`, None when it is not in the catalogue."""
        return self._index.get(item)

    def item(self, index: int) -> str:
        """The raw id of model index `index` (1..len)."""
        if not 1 <= index <= len(self.ids):
            raise IndexError(f"item index {index} is outside the catalogue's 1..{len(self.ids)} (index {PAD_ID} is padding)")
        return self.ids[index - 1]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Catalogue) and self.ids == other.ids

    def __hash__(self) -> int:
        return hash(self.ids)

    def __repr__(self) -> str:
        return f"Catalogue({len(self)} items from {self.source})"


def load_catalogue(path: str | Path) -> Catalogue:
    """Read a `catalogue.txt`; DataFormatError names the file and line of an empty file, blank line or duplicate."""
    src = str(path)
    p = Path(path)
    if not p.is_file():
        raise DataFormatError(src, None, "catalogue file does not exist" if not p.exists() else "is not a regular file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(src, None, f"not valid UTF-8 (byte offset {e.start})") from None
    if text.startswith("\ufeff"):
        text = text[1:]  # a byte-order mark would otherwise become part of the first id
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # one final newline is not a blank line
    if not lines:
        raise DataFormatError(src, None, "the catalogue file is empty: it needs one item id per line")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise DataFormatError(src, number, "blank line in the catalogue (every line is one item id)")
    return Catalogue(lines, source=src)


def write_catalogue(path: str | Path, ids: Iterable[str]) -> Path:
    """Write `ids` as a `catalogue.txt` atomically (checked first; temporary file, fsync, rename)."""
    target = Path(path)
    catalogue = Catalogue(list(ids), source=str(target))
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
        handle.write("".join(f"{item}\n" for item in catalogue.ids))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    return target
