"""The run directory's format: every file name, the keys of its records, and one reader.

A run directory is written by three parties: the ServerApp's round loop (metrics.jsonl,
timings.jsonl, final.json, checkpoints/; server/rounds.py and server/run_rows.py), the
simulation runner (config.resolved.*, flower_run.json, privacy_report.*, plots, Flower's
logs; simulations/) and the operator's `server run` (run.json; server/run_admin.py).
Everyone who reads one -- the runner's report, `server status`/`report`/`export`, the
benchmarks -- reads it through this module, so a key is spelled once and a half-written
last line (a reader polling while the round loop appends) is skipped the same way
everywhere.

It imports neither Flower nor torch: the operator's quick commands read runs without them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedinterest.common.errors import FedinterestError
from fedinterest.common.structured_files import read_json
from fedinterest.common.wire import HIT_RATE_10, NDCG_10

# --- files of a run directory
METRICS_FILE = "metrics.jsonl"  # one row per round (ROW_FIELDS), written by the round loop
TIMINGS_FILE = "timings.jsonl"  # one row per round (TIMING_FIELDS): where the round's time went
FINAL_FILE = "final.json"  # the run's result (FinalReport), written once at the end
CHECKPOINT_DIR = "checkpoints"  # server/checkpoint.py
DEVICES_DIR = "devices"  # simulation: the virtual devices' ledgers, one SQLite file per node
RUN_JSON = "run.json"  # deployment: what `server run` submitted (server/run_admin.py)
RESOLVED_TOML = "config.resolved.toml"  # simulation: the config as it ran, runnable again
RESOLVED_JSON = "config.resolved.json"  # simulation: the same with provenance (read by --resume)
FLOWER_RUN_JSON = "flower_run.json"  # simulation: Flower's run id and end state
PRIVACY_JSON = "privacy_report.json"
PRIVACY_MD = "privacy_report.md"
FLWR_LOG = "flwr.log"
SUPERLINK_LOG = "superlink.log"
FLWR_HOME_DIR = "flwr-home"
NDCG_PNG = "ndcg.png"
EPSILON_PNG = "epsilon.png"

# --- keys of the records (the metrics' own names are the wire's: devices report them)
METRIC_KEYS = (HIT_RATE_10, NDCG_10)
EPSILON_MAX = "epsilon_max"  # a round's cumulative example-level epsilon, max over reporting users
EPSILON_MEAN = "epsilon_mean"
DEVICE_EPSILON_MAX = "device_epsilon_max"  # final.json privacy: the run's max over devices
DEVICE_EPSILON_MEAN = "device_epsilon_mean"
REPLY_COUNTS = ("sampled", "answered", "refused", "failed", "rejected", "empty")
ROW_FIELDS = (
    "round", *REPLY_COUNTS, "train_loss", EPSILON_MAX, EPSILON_MEAN, "dp", "user_epsilon", HIT_RATE_10, NDCG_10,
)
TIMING_FIELDS = ("round", "seconds", "devices_seconds", "evaluation_seconds", "checkpoint_seconds", "time")


class RunFileError(FedinterestError, ValueError):
    """A run-directory file that cannot be read (the message names the file and line)."""


def as_number(value: Any) -> float | None:
    """A JSON value as a float (the string "inf" allowed), None when absent or not a number."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("inf", "infinity", "+inf"):
        return math.inf
    return None


def json_number(value: float | None) -> float | str | None:
    """A float for JSON, which has no infinity: inf as the string "inf", NaN as None."""
    if value is None or math.isnan(value):
        return None
    return "inf" if math.isinf(value) else value


def parse_lines(text: str, where: str) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl text. A last line that does not parse is a row being
    written (or torn by a crash mid-append) and is skipped; a bad line before it is an error."""
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    records = []
    for position, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if position == len(lines) - 1:
                break
            raise RunFileError(f"{where}, line {number}: not a JSON object ({err})") from err
        if not isinstance(record, dict):
            raise RunFileError(f"{where}, line {number}: not a JSON object")
        records.append(record)
    return records


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete record of a .jsonl file (empty when the file is absent)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return parse_lines(text, str(path))


def read_resolved(run_dir: Path) -> dict[str, Any]:
    """A simulation's config.resolved.json: its [run] and [federation] tables and provenance."""
    path = Path(run_dir) / RESOLVED_JSON
    resolved = read_json(path, RunFileError)
    if not isinstance(resolved, dict):
        raise RunFileError(f"{path}: not a JSON object")
    return resolved


@dataclass(frozen=True)
class RoundRow:
    """One row of metrics.jsonl with its round's timing (absent or null fields are None)."""

    round: int
    raw: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str) -> Any:
        return self.raw.get(key)

    def number(self, key: str) -> float | None:
        """The field as a float (inf allowed), None when absent, null or not a number."""
        return as_number(self.raw.get(key))


def _row(record: dict[str, Any]) -> RoundRow:
    return RoundRow(round=int(record.get("round", 0)), raw=record)


def read_rows(run_dir: Path) -> list[RoundRow]:
    """The rows of a run's metrics.jsonl, each joined with its round's timings.jsonl row."""
    timings = {t.get("round"): t for t in read_jsonl(Path(run_dir) / TIMINGS_FILE)}
    return [_row({**timings.get(r.get("round"), {}), **r}) for r in read_jsonl(Path(run_dir) / METRICS_FILE)]


class MetricsFollower:
    """The complete rows appended to a run's metrics.jsonl since the last call."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / METRICS_FILE
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
        return [_row(r) for r in parse_lines(data[: end + 1].decode("utf-8"), str(self.path))]


@dataclass(frozen=True)
class PrivacySummary:
    """final.json's `privacy`: layer 1 as the devices reported it (server/privacy_tally.py),
    layer 2's figures (server/user_privacy.py; None without it) and the noise's source."""

    raw: Mapping[str, Any]

    @property
    def device_epsilon_max(self) -> float | None:
        return as_number(self.raw.get(DEVICE_EPSILON_MAX))

    @property
    def device_epsilon_mean(self) -> float | None:
        return as_number(self.raw.get(DEVICE_EPSILON_MEAN))

    @property
    def user_level(self) -> dict[str, Any] | None:
        user = self.raw.get("user_level")
        return dict(user) if isinstance(user, dict) else None

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)


@dataclass(frozen=True)
class FinalReport:
    """final.json: what the round loop reports once the run ends (server/rounds.py writes it)."""

    raw: Mapping[str, Any]

    @classmethod
    def read(cls, run_dir: Path) -> FinalReport | None:
        """The run's final.json, None while the run has not written it."""
        path = Path(run_dir) / FINAL_FILE
        try:
            raw = read_json(path, RunFileError)
        except FileNotFoundError:
            return None
        if not isinstance(raw, dict):
            raise RunFileError(f"{path}: not a JSON object")
        return cls(raw)

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    def split(self, name: str) -> dict[str, float]:
        """The final model's metrics of one split ("valid" or "test"), numbers only."""
        return _metrics(self.raw.get(name))

    @property
    def best_valid(self) -> dict[str, Any] | None:
        """The round with the best validation NDCG@10, as written (None when never evaluated)."""
        best = self.raw.get("best_valid")
        return dict(best) if isinstance(best, dict) else None

    @property
    def counts(self) -> dict[str, int]:
        """Reply counts over the whole run (sampled, ..., aggregated, rounds_without_update)."""
        counts = self.raw.get("counts")
        return {k: int(v or 0) for k, v in counts.items()} if isinstance(counts, dict) else {}

    @property
    def privacy(self) -> PrivacySummary:
        privacy = self.raw.get("privacy")
        return PrivacySummary(privacy if isinstance(privacy, dict) else {})


def _metrics(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        return {}
    return {k: float(v) for k, v in value.items() if as_number(v) is not None}


def best_valid_test(final: FinalReport) -> dict[str, Any] | None:
    """The best-validation round and its test metrics (the early-stopping figure)."""
    best = final.best_valid
    if best is None or not isinstance(best.get("round"), int):
        return None
    return {"round": best["round"], "test": _metrics(best.get("test"))}


def device_epsilon(final: FinalReport | None, rows: Sequence[RoundRow]) -> tuple[float | None, float | None]:
    """(max, mean) device epsilon: final.json's privacy summary, else the last row that has one."""
    if final is not None:
        privacy = final.privacy
        if privacy.device_epsilon_max is not None or privacy.device_epsilon_mean is not None:
            return privacy.device_epsilon_max, privacy.device_epsilon_mean
    for row in reversed(rows):
        if row.number(EPSILON_MAX) is not None:
            return row.number(EPSILON_MAX), row.number(EPSILON_MEAN)
    return None, None
