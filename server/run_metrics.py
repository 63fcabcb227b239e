"""Reading a run's metrics.jsonl (one row per round, written by server/run_outputs.py), with
each round's wall time from the timings.jsonl beside it (server/run_rows.py)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The files the ServerApp writes into a run directory (server/rounds.py exports them and
# imports Flower and torch; these copies let the operator's quick commands read a run
# without either; tests/test_operator_cli.py checks that they agree).
METRICS_FILE = "metrics.jsonl"
FINAL_FILE = "final.json"


def as_number(value: Any) -> float | None:
    """A JSON value as a float (the string "inf" allowed), None when absent or not a number."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("inf", "infinity", "+inf"):
        return math.inf
    return None


@dataclass(frozen=True)
class RoundRow:
    """One row of metrics.jsonl (a round of the ServerApp); absent or null fields are None."""

    round: int
    raw: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str) -> Any:
        return self.raw.get(key)

    def number(self, key: str) -> float | None:
        """The field as a float (inf allowed), None when absent, null or not a number."""
        return as_number(self.raw.get(key))


def parse_row(line: str) -> RoundRow:
    """One metrics.jsonl line (NaN/Infinity tolerated, as Python's json writes them)."""
    raw = json.loads(line)
    return RoundRow(round=int(raw.get("round", 0)), raw=raw)


TIMINGS_FILE = "timings.jsonl"  # beside metrics.jsonl: round, seconds, time


def read_rows(path: Path) -> list[RoundRow]:
    """Every row of a metrics.jsonl (empty when the file is absent), joined with its round's timing."""
    if not path.is_file():
        return []
    rows = [parse_row(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    timings = path.with_name(TIMINGS_FILE)
    if timings.is_file():
        by_round = {}
        for line in timings.read_text(encoding="utf-8").splitlines():
            try:
                timing = json.loads(line)
            except json.JSONDecodeError:  # a torn last line
                continue
            if isinstance(timing, dict):
                by_round[timing.get("round")] = timing
        rows = [RoundRow(r.round, {**by_round.get(r.round, {}), **r.raw}) for r in rows]
    return rows


class MetricsFollower:
    """Reads the complete rows appended to metrics.jsonl since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def poll(self) -> list[RoundRow]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []  # a row is being written
        self.offset += end + 1
        return [parse_row(line) for line in data[: end + 1].decode("utf-8").splitlines() if line.strip()]
