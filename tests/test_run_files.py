"""The run directory's one format (common/run_files.py): its reader, records, and that no one else spells its keys."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedinterest.common.run_files import (
    FINAL_FILE,
    METRICS_FILE,
    ROW_FIELDS,
    TIMING_FIELDS,
    TIMINGS_FILE,
    FinalReport,
    RunFileError,
    device_epsilon,
    read_jsonl,
    read_rows,
)

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "simulations", "benchmarks")
# The keys the issue found spelled out in many modules; they live in run_files (and the wire, for metrics).
KEYS = ("ndcg@10", "hr@10", "device_epsilon_max", "device_epsilon_mean")
OWNERS = {ROOT / "common" / "run_files.py", ROOT / "common" / "wire.py"}


def test_a_half_written_last_line_is_skipped_and_a_bad_line_before_it_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / METRICS_FILE
    path.write_text('{"round": 1}\n\n{"round": 2}\n{"round": 3, "sam')
    assert [r["round"] for r in read_jsonl(path)] == [1, 2]
    path.write_text('{"round": 1}\n{"round": 2, "sam\n{"round": 3}\n')
    with pytest.raises(RunFileError, match=r"metrics\.jsonl, line 2"):
        read_jsonl(path)
    path.write_text('{"round": 1}\n[1, 2]\n')
    with pytest.raises(RunFileError, match="line 2: not a JSON object"):
        read_jsonl(path)
    assert read_jsonl(tmp_path / "absent.jsonl") == []


def test_rows_are_joined_with_their_timings(tmp_path: Path) -> None:
    (tmp_path / METRICS_FILE).write_text('{"round": 1, "epsilon_max": Infinity}\n{"round": 2, "epsilon_max": 1.5}\n')
    (tmp_path / TIMINGS_FILE).write_text('{"round": 1, "seconds": 2.5}\n{"round": 2, "sec')
    first, second = read_rows(tmp_path)
    assert first.number("seconds") == 2.5 and first.number("epsilon_max") == float("inf")
    assert second.get("seconds") is None and second.round == 2


def test_final_report_reads_what_the_round_loop_wrote(tmp_path: Path) -> None:
    assert FinalReport.read(tmp_path) is None
    (tmp_path / FINAL_FILE).write_text("{not json")
    with pytest.raises(RunFileError, match="final.json: not valid JSON"):
        FinalReport.read(tmp_path)
    final = {
        "test": {"ndcg@10": 0.12, "hr@10": None}, "counts": {"aggregated": 3, "failed": None},
        "best_valid": {"round": 2, "test": {"ndcg@10": 0.1}},
        "privacy": {"device_epsilon_max": "inf", "device_epsilon_mean": 1.0, "user_level": {"epsilon": 8.0}},
    }
    (tmp_path / FINAL_FILE).write_text(json.dumps(final))
    report = FinalReport.read(tmp_path)
    assert report is not None and report.split("test") == {"ndcg@10": 0.12} and report.split("valid") == {}
    assert report.counts == {"aggregated": 3, "failed": 0}
    assert report.privacy.device_epsilon_max == float("inf") and report.privacy.user_level == {"epsilon": 8.0}
    assert device_epsilon(report, []) == (float("inf"), 1.0)
    assert device_epsilon(FinalReport({}), []) == (None, None)


def test_no_module_spells_a_run_file_key_itself() -> None:
    pattern = re.compile("[\"'](" + "|".join(re.escape(k) for k in KEYS) + ")[\"']")
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if path not in OWNERS
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == [], "use the constants of common/run_files.py:\n" + "\n".join(found)


def test_the_run_directory_docs_list_the_fields_of_both_row_files() -> None:
    text = (ROOT / "docs" / "simulations.md").read_text(encoding="utf-8")
    metrics = re.search(r"^\| `metrics.jsonl` \| ServerApp \| one row per round: `([^`]*)`", text, re.M)
    timings = re.search(r"^\| `timings.jsonl` \| ServerApp \| (.*)$", text, re.M)
    assert metrics is not None and tuple(metrics.group(1).split(", ")) == ROW_FIELDS
    assert timings is not None
    named = {name for quoted in re.findall(r"`([^`]*)`", timings.group(1)) for name in quoted.split(", ")}
    assert set(TIMING_FIELDS) <= named
