"""CLI latency: wall time of the operator's and the device owner's quick commands.

    python -m fedinterest.benchmarks.cli_latency              # measure, print, rewrite docs/benchmarks.md's section
    python -m fedinterest.benchmarks.cli_latency --no-write   # measure and print only
    python -m fedinterest.benchmarks.cli_latency --label before --results-only   # keep a JSON result, no docs

Each command runs as a fresh process of the installed `fedinterest` console script (what a
person types), `--repeat` times after one warm-up run (so the page cache holds the code);
the median and the slowest are reported. `server status` and `server devices` read a
deployment directory with one finished-looking run and no SuperLink running (the health
check is refused at once on loopback); `device budget` and `device policy` read a
device directory. Nothing here needs the network.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedinterest.benchmarks.report import publish
from fedinterest.simulations.provenance import git_commit

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = REPO / "docs" / "benchmarks.md"
RESULTS = REPO / "benchmarks" / "results" / "cli_latency"
FEDINTEREST = str(Path(sys.executable).parent / "fedinterest")
COMMAND = "python -m fedinterest.benchmarks.cli_latency"
TARGET_SECONDS = 0.5


def _run(args: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run([FEDINTEREST, *args], capture_output=True, env=env, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"fedinterest {' '.join(args)} exited {done.returncode}: {done.stderr.decode(errors='replace')[-500:]}")
    return seconds


def _fixtures(work: Path, env: dict[str, str]) -> tuple[Path, Path]:
    """A deployment (one submitted-looking run) and a device directory."""
    catalogue = work / "catalogue.txt"
    catalogue.write_text("".join(f"{i}\n" for i in range(1, 201)), encoding="utf-8")
    server, device = work / "server", work / "device"
    subprocess.run([FEDINTEREST, "server", "init", str(server), "--catalogue", str(catalogue), "--port", "1"], check=True, capture_output=True, env=env)
    subprocess.run([FEDINTEREST, "device", "init", str(device), "--catalogue", str(catalogue)], check=True, capture_output=True, env=env)
    run_dir = server / "runs" / "run-20260101-000000"
    run_dir.mkdir(parents=True)
    from fedinterest.common.run_config import RunConfig

    config = RunConfig(dataset="deployed", num_items=200, run_dir=str(run_dir)).to_flower()
    (run_dir / "run.json").write_text(json.dumps({"run_id": 1234567890123456789, "run_config": config}), encoding="utf-8")
    return server, device


def measure(repeat: int) -> list[dict[str, Any]]:
    """One row per command: median and max seconds over `repeat` runs."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        server, device = _fixtures(Path(tmp), env)
        commands = {
            "fedinterest --help": ["--help"],
            "fedinterest server status": ["server", "status", "--dir", str(server)],
            "fedinterest server devices": ["server", "devices", "--dir", str(server)],
            "fedinterest device budget": ["device", "budget", "--dir", str(device)],
            "fedinterest device policy": ["device", "policy", "--dir", str(device)],
        }
        rows = []
        for label, args in commands.items():
            _run(args, env)  # warm-up: code in the page cache
            times = [_run(args, env) for _ in range(repeat)]
            rows.append({"command": label, "median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3), "runs": repeat})
    return rows


def table(results: list[dict[str, Any]]) -> str:
    """The markdown table of every kept result (one column per label)."""
    labels = [r["label"] for r in results]
    commands = [row["command"] for row in results[0]["rows"]]
    head = "| command | " + " | ".join(f"{r['label']} ({r['commit']}) median / max s" for r in results) + " |"
    lines = [head, "|---|" + "---|" * len(labels)]
    for command in commands:
        cells = []
        for result in results:
            row = next(r for r in result["rows"] if r["command"] == command)
            cells.append(f"{row['median_s']:.2f} / {row['max_s']:.2f}")
        lines.append(f"| `{command}` | " + " | ".join(cells) + " |")
    loads = ", ".join(f"{r['label']}: load average {r['load_average']:.1f}" for r in results)
    return "\n".join(lines) + f"\n\nTarget: under {TARGET_SECONDS} s. Measured with `{COMMAND}` ({loads}).\n"


def main(argv: list[str] | None = None) -> None:
    """Measure, keep the result as JSON, and (unless --no-write) rewrite the docs section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--label", default="after", help="Name of this measurement in the table (e.g. before, after).")
    parser.add_argument("--no-write", action="store_true", help="Print only.")
    parser.add_argument("--results-only", action="store_true", help="Keep the JSON result, leave docs/benchmarks.md alone.")
    args = parser.parse_args(argv)
    rows = measure(args.repeat)
    result = {"label": args.label, "commit": git_commit(REPO), "load_average": os.getloadavg()[0], "rows": rows}
    print(json.dumps(result, indent=2))
    if args.no_write:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.label}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if not args.results_only:
        kept = sorted((json.loads(p.read_text()) for p in RESULTS.glob("*.json")), key=lambda r: r["label"] != "before")
        publish(BENCHMARKS_MD, "cli-latency", table(kept))


if __name__ == "__main__":
    main()
