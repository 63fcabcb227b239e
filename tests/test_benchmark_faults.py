"""The fault benchmark compares each faulty run with its fault-free baseline and judges the 5% target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedinterest.benchmarks import faults


def _summary(fraction: float, last: float, best: float, *, seed: int = 0, failed: int = 0) -> dict:
    return {
        "dataset": "ml-100k", "variant": "no-dp", "fault_fraction": fraction, "fault_mode": "fail", "min_replies": 1,
        "seed": seed, "command": f"python -m fedinterest.benchmarks.faults --fractions {fraction:g} --seed {seed}",
        "commit": "abc1234", "rounds": 20, "rounds_requested": 20, "clients_per_round": 100,
        "counts": {"sampled": 2000, "answered": 2000 - failed, "failed": failed, "refused": 0, "rejected": 0, "aggregated": 2000 - failed},
        "rounds_without_update": 0,
        "test": {"ndcg@10": last, "hr@10": 2 * last},
        "best_valid": {"round": 15, "valid_ndcg@10": best, "test": {"ndcg@10": best, "hr@10": 2 * best}},
        "wall_seconds": 420.0,
    }


def test_relative_difference() -> None:
    assert faults.relative(0.048, 0.05) == pytest.approx(-0.04)
    assert faults.relative(0.055, 0.05) == pytest.approx(0.1)
    assert faults.relative(None, 0.05) is None
    assert faults.relative(0.05, 0.0) is None


def test_table_compares_the_faulty_run_with_the_fault_free_one_of_its_seed() -> None:
    runs = [
        _summary(0.3, 0.0480, 0.0500, failed=600),
        _summary(0.0, 0.0500, 0.0520),
        _summary(0.0, 0.0400, 0.0400, seed=1),  # another seed: never the baseline of seed 0
    ]
    header, _, free0, faulty0, free1 = faults.table(runs).splitlines()
    assert header.startswith("| fault fraction (mode) | seed |")
    assert free0 == "| 0 (none) | 0 | 20 of 20 (0) | 100 | 0 / 2000 | 0.0500 | 0.1000 | - | 15: 0.0520 | - | 7.0 min | abc1234 |"
    assert faulty0 == "| 0.3 (fail) | 0 | 20 of 20 (0) | 100 | 600 / 2000 | 0.0480 | 0.0960 | -4.0% | 15: 0.0500 | -3.8% | 7.0 min | abc1234 |"
    assert free1.startswith("| 0 (none) | 1 |")


@pytest.mark.parametrize("last, verdict", [(0.0480, "**holds**"), (0.0470, "**does not hold**"), (0.0530, "**does not hold**")])
def test_verdict_is_computed_from_the_last_round(last: float, verdict: str) -> None:
    (sentence,) = faults.verdicts([_summary(0.0, 0.0500, 0.0520), _summary(0.3, last, 0.0520, failed=600)])
    assert verdict in sentence
    assert "30% of each round's devices failing" in sentence and "the issue's target" in sentence
    assert "+0.0% on test, +0.0% on the validation split" in sentence


def test_verdict_names_the_validation_difference() -> None:
    free, faulty = _summary(0.0, 0.0500, 0.0520), _summary(0.3, 0.0500, 0.0520, failed=600)
    faulty["best_valid"]["valid_ndcg@10"] = 0.0468
    (sentence,) = faults.verdicts([free, faulty])
    assert "-10.0% on the validation split" in sentence and "**holds**" in sentence


def test_no_verdict_without_a_baseline() -> None:
    assert faults.verdicts([_summary(0.3, 0.048, 0.05, failed=600)]) == []
    assert "| 0.3 (fail) | 0 |" in faults.table([_summary(0.3, 0.048, 0.05, failed=600)])


def test_spread_of_fault_free_seeds() -> None:
    (sentence,) = faults.spread([_summary(0.0, 0.05, 0.05), _summary(0.0, 0.04, 0.04, seed=1), _summary(0.3, 0.03, 0.03)])
    assert "seeds 0, 1" in sentence and "0.0400-0.0500" in sentence and "25.0%" in sentence


def test_section_puts_the_command_above_the_table() -> None:
    text = faults.section([_summary(0.0, 0.05, 0.052), _summary(0.3, 0.048, 0.05, failed=600)])
    assert text.index("python -m fedinterest.benchmarks.faults --fractions 0.3") < text.index("| fault fraction")
    assert text.index("| fault fraction") < text.index("**holds**")


def test_table_only_rebuilds_the_section_from_stored_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faults, "RESULTS", tmp_path / "faults")
    monkeypatch.setattr(faults, "BENCHMARKS_MD", tmp_path / "benchmarks.md")
    (tmp_path / "benchmarks.md").write_text("# Benchmarks\n\n<!-- other:begin -->\nkept\n<!-- other:end -->\n")
    for summary in (_summary(0.0, 0.05, 0.052), _summary(0.3, 0.046, 0.05, failed=600)):
        faults._store(summary)
    assert sorted(p.name for p in (tmp_path / "faults").iterdir()) == [
        "ml-100k-fault0-fail-20x100-seed0.json", "ml-100k-fault0.3-fail-20x100-seed0.json",
    ]
    faults.main(["--table-only"])
    text = (tmp_path / "benchmarks.md").read_text()
    assert "kept" in text and "<!-- faults:begin -->" in text and "**does not hold**" in text


def test_summary_from_a_run_directory(tmp_path: Path) -> None:
    (tmp_path / "config.resolved.json").write_text(json.dumps({
        "command": ["fedinterest", "simulate", "ml-100k.toml", "--set", "fault-fraction=0.3"], "commit": "abc1234",
        "run": {"dataset": "ml-100k", "fault-fraction": 0.3, "fault-mode": "fail", "min-replies": 1, "seed": 0,
                "num-server-rounds": 20, "clients-per-round": 100},
        "federation": {"num-supernodes": 943},
    }))
    (tmp_path / "final.json").write_text(json.dumps({
        "rounds": 20, "wall_seconds": 400.0,
        "test": {"ndcg@10": 0.05, "hr@10": 0.1, "mrr": 0.04},
        "best_valid": {"round": 20, "valid": {"ndcg@10": 0.06}, "test": {"ndcg@10": 0.05, "hr@10": 0.1}},
        "counts": {"sampled": 2000, "answered": 1400, "refused": 0, "failed": 600, "rejected": 0, "empty": 0, "aggregated": 1400, "rounds_without_update": 0},
    }))
    summary = faults.summarize_run_dir(tmp_path, "python -m fedinterest.benchmarks.faults")
    assert summary["counts"]["failed"] == 600 and summary["rounds_without_update"] == 0
    assert summary["test"] == {"ndcg@10": 0.05, "hr@10": 0.1}
    assert summary["best_valid"]["round"] == 20 and summary["simulate_command"].startswith("fedinterest simulate")
    assert faults.result_name(summary) == "ml-100k-fault0.3-fail-20x100-seed0.json"
