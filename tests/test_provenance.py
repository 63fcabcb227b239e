"""Benchmark provenance: a run's commit is "+dirty" for code changes, not for the
benchmarks' own outputs (docs/benchmarks.md, benchmarks/results/)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from fedinterest.simulations.provenance import git_commit


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def test_benchmark_outputs_do_not_make_the_commit_dirty_but_code_does(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for name in ("server/rounds.py", "docs/benchmarks.md", "benchmarks/results/x.json"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("original\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "start")
    clean = git_commit(repo / "server")
    assert clean is not None and not clean.endswith("+dirty")

    (repo / "docs/benchmarks.md").write_text("a table a benchmark wrote\n")
    (repo / "benchmarks/results/x.json").write_text("{}\n")
    assert git_commit(repo / "server") == clean

    (repo / "server/rounds.py").write_text("changed code\n")
    assert git_commit(repo / "server") == clean + "+dirty"
