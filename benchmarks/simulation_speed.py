"""Simulation speed: Flower 1.41's own message lookup against the per-node one.

Runs the same short `fedinterest simulate` twice per dataset, once with
FEDINTEREST_FLOWER_DISPATCH=stock (Flower's `InMemoryLinkState.get_message_ins`) and
once with fedinterest's per-node lookup (server/simulation_dispatch.py), and tables the
seconds per round. The runs are the federated benchmark's `no-dp` variant (no DP, 5
local epochs), 100 devices a round, one virtual device per user; the first round
(Ray starting) and the last (which also evaluates) are left out of the median.

    python -m fedinterest.benchmarks.simulation_speed --datasets ml-100k ml-1m --rounds 6

With --cohort CASE ..., it runs cohort simulations instead (benchmarks/cohort_speed.py:
users per node, FedSGD users a round, the centralized floor beside each row) and writes
the cohort-speed table:

    python -m fedinterest.benchmarks.simulation_speed --cohort sports:half:1000 ml-1m:1:100 synthetic:100000:half:1000

A case ending in `:before` (e.g. `ml-1m:1:100:before`) runs with the code the issue-11
fixes replaced, for the before/after table (benchmarks/cohort_speed.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from fedinterest.benchmarks import cohort_speed
from fedinterest.benchmarks.federated import CONFIGS, DATASETS, VARIANTS, simulate_argv
from fedinterest.benchmarks.report import publish
from fedinterest.client.data_source import load_device_data
from fedinterest.client.ledger import PrivacyLedger
from fedinterest.client.local_training import train_locally
from fedinterest.common.datasets import load_split
from fedinterest.common.model import InterestModel
from fedinterest.common.run_files import FINAL_FILE, METRICS_FILE, read_jsonl, read_resolved
from fedinterest.server.simulation_dispatch import SWITCH
from fedinterest.simulations.simulate import run_simulation
from fedinterest.simulations.simulation_config import resolve_config

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "simulation_speed"
BENCHMARKS_MD = REPO / "docs" / "benchmarks.md"
LOOKUPS = {"stock": "Flower 1.41 (stock)", "per-node": "per-node (fedinterest)"}


def overrides(rounds: int) -> list[str]:
    # eval-every past the last round: the server evaluates once, after the last round.
    return [*VARIANTS["no-dp"], f"num-server-rounds={rounds}", "clients-per-round=100", f"eval-every={rounds + 1}"]


def summarize_run_dir(run_dir: Path, lookup: str) -> dict:
    """Seconds per round (median over rounds 2..R-1) and per device update of one run."""
    resolved = read_resolved(run_dir)
    final = json.loads((run_dir / FINAL_FILE).read_text())
    rows = read_jsonl(run_dir / METRICS_FILE)
    middle = [row["seconds"] for row in rows[1:-1]] or [row["seconds"] for row in rows]
    per_round = statistics.median(middle)
    return {
        "dataset": resolved["run"]["dataset"],
        "lookup": lookup,
        "devices": resolved["federation"]["num-supernodes"],
        "clients_per_round": resolved["run"]["clients-per-round"],
        "rounds": final["rounds"],
        "seconds_per_round": per_round,
        "seconds_per_device_update": per_round / resolved["run"]["clients-per-round"],
        "round_seconds": [row["seconds"] for row in rows],
        "wall_seconds": final["wall_seconds"],
        "command": " ".join(resolved["command"]),
        "commit": resolved["commit"],
        "run_dir": run_dir.name,
    }


def local_training_seconds(dataset: str, rounds: int, users: int = 50) -> float:
    """Mean seconds of one device update's local training alone (one thread, in this process),
    over `users` devices spread evenly over the partitions, after one untimed warm-up update:
    what a round's training costs the two actors, without Flower or Ray."""
    run = resolve_config(CONFIGS / f"{dataset}.toml", overrides(rounds)).run
    torch.set_num_threads(1)
    split = load_split(run.dataset_spec())
    global_state = InterestModel(run.model_config(split.num_items)).state_dict()
    step = max(1, len(split.users) // users)
    partitions = [0, *range(0, len(split.users), step)][: users + 1]  # the first one warms up
    seconds = []
    for partition in partitions:
        device = load_device_data({"partition-id": partition}, run)
        model = InterestModel(run.model_config(device.num_items))
        model.load_state_dict(global_state)
        user = device.user
        assert user is not None  # the simulated partitions measured each hold a user
        start = time.perf_counter()
        train_locally(model=model, train_history=user.train, run=run, ledger=PrivacyLedger(":memory:"), run_id=1, server_round=1)
        seconds.append(time.perf_counter() - start)
    return statistics.mean(seconds[1:])


def record_training_seconds(dataset: str, seconds: float) -> None:
    """Add the local training time to the dataset's stored runs (it does not depend on the lookup)."""
    for path in RESULTS.glob(f"{dataset}-*.json"):
        summary = json.loads(path.read_text())
        path.write_text(json.dumps({**summary, "local_training_seconds": seconds}, indent=2) + "\n", encoding="utf-8")


def run(datasets: list[str], rounds: int, out: Path) -> None:
    """Each dataset with each lookup, one after the other (never side by side: they share the cores)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    for dataset in datasets:
        for lookup in LOOKUPS:
            config_path = CONFIGS / f"{dataset}.toml"
            config = resolve_config(config_path, overrides(rounds))
            if lookup == "stock":
                os.environ[SWITCH] = "stock"
            else:
                os.environ.pop(SWITCH, None)
            print(f"simulating {dataset} with the {lookup} lookup, {rounds} rounds", file=sys.stderr)
            result = run_simulation(config, out, argv=simulate_argv(config_path, overrides(rounds), out))
            summary = summarize_run_dir(result.run_dir, lookup)
            path = RESULTS / f"{dataset}-{lookup}.json"
            path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
            print(f"  {summary['seconds_per_round']:.1f} s per round; stored {path}", file=sys.stderr)
        record_training_seconds(dataset, local_training_seconds(dataset, rounds))
    os.environ.pop(SWITCH, None)


def table() -> str:
    """Markdown table of the stored runs: seconds per round with each lookup and the speed-up."""
    lines = [
        "| dataset | virtual devices | message lookup | s per round (median) | s per device update | speed-up | local training per update (1 thread) | rounds x devices/round | commit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for dataset, label in DATASETS.items():
        stored = {lookup: RESULTS / f"{dataset}-{lookup}.json" for lookup in LOOKUPS}
        runs = {lookup: json.loads(path.read_text()) for lookup, path in stored.items() if path.is_file()}
        stock = runs.get("stock")
        for lookup, summary in runs.items():
            speedup = f"{stock['seconds_per_round'] / summary['seconds_per_round']:.1f}x" if stock else "-"
            lines.append(
                f"| {label} | {summary['devices']:,} | {LOOKUPS[lookup]} | {summary['seconds_per_round']:.1f} | "
                f"{summary['seconds_per_device_update']:.3f} | {speedup} | {_seconds(summary.get('local_training_seconds'))} | {summary['rounds']} x {summary['clients_per_round']} | {summary['commit']} |"
            )
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="*", default=["ml-100k", "ml-1m"], choices=list(DATASETS))
    parser.add_argument("--rounds", type=int, default=6, help="rounds per run (at least 3: the first and last are left out)")
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--training-only", action="store_true", help="measure local training per update and add it to the stored runs")
    parser.add_argument("--cohort", nargs="*", metavar="CASE", help="cohort cases DATASET:USERS_PER_NODE:COHORT (synthetic:POPULATION:USERS_PER_NODE:COHORT); 'half' = two nodes")
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error(f"--rounds must be at least 3, got {args.rounds}")
    if args.cohort is not None:
        try:
            cases = [cohort_speed.parse_case(text) for text in args.cohort]
        except ValueError as err:
            parser.error(str(err))
        for case in cases:
            print(f"cohort case {case.name}: {args.rounds} rounds", file=sys.stderr)
            path = cohort_speed.store(cohort_speed.run_case(case, args.rounds, args.out))
            print(f"  stored {path}", file=sys.stderr)
        publish(BENCHMARKS_MD, "cohort-speed", cohort_speed.table(cohort_speed.stored()))
        publish(BENCHMARKS_MD, "cohort-speed-fixes", cohort_speed.fixes_table(cohort_speed.stored()))
        return
    if args.training_only:
        for dataset in args.datasets:
            record_training_seconds(dataset, local_training_seconds(dataset, args.rounds))
    elif not args.table_only:
        run(args.datasets, args.rounds, args.out)
    publish(BENCHMARKS_MD, "simulation-speed", table())


if __name__ == "__main__":
    main()
