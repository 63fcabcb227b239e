"""`fedinterest simulate`: one simulation from its config to its report.

    simulations/simulation_config.py  the TOML and --set items, checked (or an earlier run's, to resume)
    simulations/run_directory.py      the run directory with the resolved config and provenance
    simulations/flower_run.py         a private SuperLink and `flwr run`; metrics.jsonl followed
    simulations/run_summary.py        privacy report, plots, summary; a run that trained nothing fails

The ServerApp (server/app.py, server/rounds.py) writes the run directory's rounds and
final.json (common/run_files.py). With `resume=True` (a config from `resume_config`) the
run goes on in its own directory: the ServerApp resumes after its last checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedinterest.common.run_files import FinalReport, RoundRow
from fedinterest.simulations.flower_run import run_flower
from fedinterest.simulations.run_directory import PreparedRun, prepare_resume, prepare_run
from fedinterest.simulations.run_summary import check_updates, write_report
from fedinterest.simulations.simulation_config import SimulationConfig, check_project, project_dir


@dataclass
class SimulationResult:
    """What a completed simulation left behind."""

    run_dir: Path
    run_id: int
    config: SimulationConfig
    rows: list[RoundRow]
    final: FinalReport
    privacy: dict[str, Any]
    wall_seconds: float
    summary: dict[str, Any]


def run_simulation(
    config: SimulationConfig,
    out: Path,
    *,
    argv: Sequence[str] = (),
    app_dir: Path | None = None,
    on_prepared: Callable[[PreparedRun], None] | None = None,
    on_started: Callable[[int], None] | None = None,
    on_round: Callable[[RoundRow], None] | None = None,
    timeout: float | None = None,
    resume: bool = False,
) -> SimulationResult:
    """Prepare, run and report one simulation (raises SimulationConfigError or SimulationFailed).

    With `resume` (a config from `resume_config`), run again in the config's run
    directory instead of a new one under `out`: the ServerApp continues after the last
    checkpoint, and the devices' ledgers there keep counting.
    """
    app_dir = project_dir() if app_dir is None else Path(app_dir)
    check_project(app_dir)
    prepared = prepare_resume(config, argv=argv) if resume else prepare_run(config, out, argv=argv)
    if on_prepared is not None:
        on_prepared(prepared)
    start = time.perf_counter()
    run_id, _ = run_flower(prepared, app_dir=app_dir, on_round=on_round, on_started=on_started, timeout=timeout)
    wall = time.perf_counter() - start
    rows, final, privacy, summary = write_report(prepared.config, prepared.run_dir, wall)
    check_updates(prepared.run_dir, final)
    return SimulationResult(
        run_dir=prepared.run_dir, run_id=run_id, config=prepared.config, rows=rows, final=final,
        privacy=privacy, wall_seconds=wall, summary=summary,
    )

