"""The cohort-speed benchmark's cases, its one-thread floor and its before/after table (no timing here)."""

from __future__ import annotations

import pytest
import torch

from fedinterest.benchmarks import cohort_speed
from fedinterest.common.run_config import RunConfig


def _row(case: str, variant: str = "", **figures: float) -> dict:
    return {
        "case": case, "dataset": "ml-1m", "population": 2999, "users_per_node": 1, "nodes": 2999, "cohort": 100,
        "seconds_per_round": figures.get("seconds", 4.0), "updates_per_second": 25.0, "floor_seconds_per_user": 0.015,
        "overhead_ratio": figures.get("ratio", 2.7), "peak_rss_bytes": 2**32, "commit": "abc", "load_before": 3.0,
        "load_after": 2.0, "variant": variant,
    }


def test_a_case_may_name_the_code_before_the_fixes() -> None:
    case = cohort_speed.parse_case("ml-1m:1:100:before")
    assert (case.dataset, case.users_per_node, case.cohort, case.variant) == ("ml-1m", 1, 100, "before")
    assert case.name == "ml-1m-k1-c100-before"
    assert cohort_speed.parse_case("synthetic:100000:half:1000").name == "synthetic-100000-khalf-c1000"
    assert cohort_speed.VARIANTS["before"] == {"FEDINTEREST_FLOWER_DISPATCH": "scan", "FEDINTEREST_WARM_NODE": "off"}
    with pytest.raises(ValueError, match="DATASET"):
        cohort_speed.parse_case("ml-1m:1:100:later")


def test_before_rows_stay_out_of_the_main_table_and_pair_up_in_their_own() -> None:
    rows = [_row("ml-1m-k1-c100-before", "before", seconds=4.07, ratio=2.71), _row("ml-1m-k1-c100", seconds=3.23, ratio=2.12)]
    main = cohort_speed.table(rows).splitlines()[2:]
    assert len(main) == 1 and "| 3.23 |" in main[0]
    fixes = cohort_speed.fixes_table(rows).splitlines()[2:]
    assert [line.split(" | ")[3] for line in fixes] == ["before: scan, cold node", "after: index, warm node"]
    assert "| 2.71 |" in fixes[0] and "| 2.12 |" in fixes[1]


def test_the_floor_trains_on_one_thread_as_each_simulated_device() -> None:
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run = RunConfig(synthetic_users=30, synthetic_items=160, max_len=10, dim=8, num_blocks=1, clients_per_round=5)
        assert cohort_speed.floor_seconds_per_user(run, [2, 3]) > 0
        assert torch.get_num_threads() == cohort_speed.FLOOR_THREADS == 1
    finally:
        torch.set_num_threads(saved)
