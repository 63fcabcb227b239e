"""Where a result came from: the commit of the code and the machine it ran on."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

# What the benchmarks themselves write into the tree: a change there is a result, not code,
# so it does not make the next run's commit "+dirty".
BENCHMARK_OUTPUTS = ("docs/benchmarks.md", "benchmarks/results")


def git_commit(where: Path | None = None) -> str | None:
    """Short commit of the code, with "+dirty" when it has uncommitted code changes (not
    benchmark outputs); None outside git."""
    here = where or Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)", *(f":(top,exclude){path}" for path in BENCHMARK_OUTPUTS)],
            capture_output=True, text=True, cwd=here, timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine(threads: int) -> dict[str, object]:
    """The facts that make a timing comparable."""
    return {"cpus": os.cpu_count(), "torch_threads": threads, "platform": platform.platform(), "torch": torch.__version__}
