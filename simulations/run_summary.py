"""What a completed simulation reports: its report files and plots, the summary table, and the check that it trained."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedinterest.common.run_config import RunConfig
from fedinterest.common.run_files import (
    EPSILON_PNG,
    FINAL_FILE,
    FLWR_LOG,
    NDCG_10,
    NDCG_PNG,
    PRIVACY_JSON,
    PRIVACY_MD,
    FinalReport,
    RoundRow,
    as_number,
    best_valid_test,
    read_rows,
)
from fedinterest.common.serialization import atomic_write_text
from fedinterest.server.flower_processes import last_exception, log_tail
from fedinterest.simulations.flower_run import SimulationFailed
from fedinterest.simulations.privacy_report import ledger_epsilons, privacy_markdown, privacy_report
from fedinterest.simulations.runs import write_json
from fedinterest.simulations.simulation_config import SimulationConfig


def summarize_run(config: SimulationConfig, rows: Sequence[RoundRow], final: FinalReport, privacy: Mapping[str, Any], wall_seconds: float) -> dict[str, Any]:
    """The numbers of the final table (and of `--json`)."""
    return {
        "rounds": len(rows),
        "devices": config.federation.num_supernodes,
        "test": final.split("test"),
        "valid": final.split("valid"),
        "best_valid": best_valid_test(final),
        "device_dp": config.run.noise_multiplier > 0,
        "users_per_node": config.run.users_per_node,
        "epsilon_max": privacy["device_epsilon"]["max"],
        "epsilon_mean": privacy["device_epsilon"]["mean"],
        "delta": config.run.delta,
        "epsilon_budget": config.run.epsilon_budget,
        "user_level": privacy["user_level"] if isinstance(privacy["user_level"], dict) else None,
        "stopped_early": final.get("stopped_early"),
        "refused_device_rounds": privacy["refusals"]["device_rounds"],
        "failed_replies": final.counts.get("failed", 0),
        "rejected_replies": final.counts.get("rejected", 0),
        "wall_seconds": round(wall_seconds, 1),
        "server_wall_seconds": as_number(final.get("wall_seconds")),
        "popularity_test": popularity_test(config.run),
        "private_popularity_test": private_popularity_test(config.run, privacy["user_level"]),
        "privacy_warning": privacy.get("warning"),
    }


def popularity_test(run: RunConfig) -> dict[str, float]:
    """The popularity baseline on the same split, shown beside every federated figure (DESIGN.md)."""
    from fedinterest.common.datasets import load_split
    from fedinterest.common.metrics import summarize
    from fedinterest.simulations.baselines import popularity_ranks

    return summarize(popularity_ranks(load_split(run.dataset_spec()), "test"))


def private_popularity_test(run: RunConfig, user_level: Any) -> dict[str, Any] | None:
    """Under layer 2, popularity released with the same user-level (epsilon, delta) the model
    spent (common/popularity.py): the fair private baseline. None without layer 2."""
    if not isinstance(user_level, dict) or not user_level.get("epsilon"):
        return None
    import numpy as np

    from fedinterest.common.datasets import load_split
    from fedinterest.common.metrics import summarize
    from fedinterest.common.popularity import private_popularity_noise, private_popularity_ranks

    accountant = "rdp" if "rdp" in str(user_level.get("accountant", "")) else "prv"
    sigma = private_popularity_noise(float(user_level["epsilon"]), float(user_level["delta"]), accountant)
    ranks = private_popularity_ranks(load_split(run.dataset_spec()), "test", sigma, np.random.default_rng())  # OS entropy, as layer 2
    return {**summarize(ranks), "epsilon": user_level["epsilon"], "delta": user_level["delta"], "noise_multiplier": sigma}


def write_report(config: SimulationConfig, run_dir: Path, wall_seconds: float) -> tuple[list[RoundRow], FinalReport, dict[str, Any], dict[str, Any]]:
    """privacy_report.json/.md and the plots of a completed run; (rows, final, privacy, summary)."""
    from fedinterest.common.run_plots import plot_epsilon, plot_ndcg

    rows = read_rows(run_dir)
    final = FinalReport.read(run_dir)
    if final is None:
        raise SimulationFailed(f"the ServerApp wrote no {FINAL_FILE} in {run_dir}", run_dir)
    privacy = privacy_report(config, rows, final, ledger_epsilons(run_dir, config.run.delta))
    write_json(run_dir / PRIVACY_JSON, privacy)
    atomic_write_text(run_dir / PRIVACY_MD, privacy_markdown(privacy))
    plot_ndcg(rows, run_dir / NDCG_PNG, final_test=final.split("test").get(NDCG_10))
    plot_epsilon(rows, run_dir / EPSILON_PNG, budget=config.run.epsilon_budget if config.run.private else None)
    summary = summarize_run(config, rows, final, privacy, wall_seconds)
    return rows, final, privacy, summary


def check_updates(run_dir: Path, final: FinalReport) -> None:
    """Fail a run that completed without aggregating a single device update because replies
    failed or were rejected: its metrics would describe the initial model."""
    counts = final.counts
    broken = counts.get("failed", 0) + counts.get("rejected", 0)
    if counts.get("aggregated", 0) == 0 and broken > 0:
        hint = last_exception(run_dir / FLWR_LOG)
        reason = (
            f"no device update was aggregated in {final.get('rounds')} rounds: {counts.get('failed', 0)} replies failed "
            f"and {counts.get('rejected', 0)} were rejected"
        )
        if hint:
            reason += f"; last error in {FLWR_LOG}: {hint}"
        raise SimulationFailed(reason, run_dir, log_tail(run_dir / FLWR_LOG))
