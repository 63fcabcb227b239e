"""A simulation attached to a Ray cluster the user already runs (head + one joined node on
loopback, benchmarks/ray_cluster.py): the run completes and its ClientApps ran on both nodes."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedinterest.benchmarks.ray_cluster import run


@pytest.mark.slow
def test_a_simulation_runs_on_an_existing_two_node_ray_cluster(tmp_path: Path) -> None:
    verdict = run(tmp_path)
    assert verdict["rounds"] == 2 and verdict["aggregated"] == 8, verdict  # 4 users a round, 2 rounds
    assert verdict["alive_nodes"] == 2, verdict
    # The run's ClientApp actors were placed on both nodes, by a driver other than this test's check.
    assert verdict["client_actor_nodes"] == 2 and verdict["other_jobs"] >= 1, verdict
    assert verdict["recorded_ray_address"] == verdict["address"], verdict
    assert verdict["used_cluster"] is True
