"""Run directories: where a command writes its results, never over an earlier run."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from fedinterest.common.serialization import atomic_write_text


def new_run_dir(root: Path, prefix: str) -> Path:
    """A fresh directory `root/prefix-YYYYmmdd-HHMMSS[-n]` (created)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", prefix).strip("_") or "run"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = root / f"{safe}-{stamp}"
    n = 1
    while candidate.exists():
        n += 1
        candidate = root / f"{safe}-{stamp}-{n}"
    candidate.mkdir(parents=True)
    return candidate


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Pretty JSON, written atomically."""
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")
