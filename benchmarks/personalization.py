"""Personalization benchmark: the devices' own held-out NDCG@10 / HR@10 with and without adapting the global model.

    python -m fedinterest.benchmarks.personalization              # measure, print, rewrite docs/benchmarks.md's section
    python -m fedinterest.benchmarks.personalization --no-write   # measure and print only

Each sampled user is a device: it takes the user-level-DP global model of Amazon Toys
(a finished `fedinterest simulate` run: its resolved config and one checkpoint), adapts a
copy with client/personalization.py on its own history, and ranks the full catalogue
with the project's own `common.evaluation.model_ranks` (leave-one-out, the user's earlier
items excluded). Two stages, as the evaluation protocol splits each user:

- valid: adapted on the train part only, ranks the validation item (used to choose the
  defaults, so the test item plays no part in choosing them);
- test: adapted on the train part plus the validation item (the history a device holds
  before the test item, as `UserSplit.history("test")` gives it), ranks the test item.
  The test item is never among the adaptation windows.

The step counts are points along one adaptation path per (user, stage, learning rate):
ranking after 0, 1, 3, ... steps of the same Adam run, which is what `personalized_model`
computes for that step count. Step 0 is the global model itself. The cost column is the
mean wall time of one device's adaptation (copy plus steps, not the ranking) on one thread,
measured while other simulations shared the machine's 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from fedinterest.benchmarks.report import publish
from fedinterest.client.personalization import PersonalizationSettings, adaptation_path
from fedinterest.common.datasets import load_split
from fedinterest.common.evaluation import model_ranks
from fedinterest.common.metrics import hit_rate, ndcg
from fedinterest.common.model import InterestModel
from fedinterest.common.run_config import RunConfig
from fedinterest.common.run_files import CHECKPOINT_DIR, RESOLVED_JSON, read_resolved
from fedinterest.common.split import LeaveOneOut

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = REPO / "docs" / "benchmarks.md"
SECTION = "personalization"
DEFAULT_RUN = Path("/work/bench-runs/simulate-toys-20261202-051330")
DEFAULT_CHECKPOINT = "round-00040.safetensors"
COMMAND = "python -m fedinterest.benchmarks.personalization"
STAGES = ("valid", "test")


def _commit() -> str:
    """Short HEAD, "+dirty" when the device code or this script has uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO, timeout=10).stdout.strip()

    dirty = git("status", "--porcelain", "--", "client", "common", "benchmarks/personalization.py")
    return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")


def load_global_model(run_dir: Path, checkpoint: str) -> tuple[InterestModel, LeaveOneOut]:
    """The run's global model (as server/evaluation.py builds it) and its leave-one-out split."""
    run = RunConfig.from_flower(read_resolved(run_dir)["run"])
    split = load_split(run.dataset_spec())
    model = InterestModel(run.model_config(split.num_items, split.dataset.item_ids))
    model.load_state_dict(load_file(run_dir / CHECKPOINT_DIR / checkpoint))
    return model.eval(), split


def measure(model: InterestModel, users: list, *, lrs: list[float], steps: list[int]) -> dict:
    """Ranks per (stage, lr, steps) over `users`, and the mean adaptation time per (stage, lr) at max(steps)."""
    ranks: dict[str, list[int]] = {}
    seconds: dict[str, float] = {}
    longest = max(steps)
    for stage in STAGES:
        for lr in lrs:
            settings = PersonalizationSettings(steps=longest, lr=lr)
            adapting = 0.0
            for user in users:
                own: dict[int, int] = {}
                started = time.perf_counter()
                for taken, adapted in adaptation_path(model, user.history(stage), settings):
                    adapting += time.perf_counter() - started
                    if taken in steps:
                        own[taken] = int(model_ranks(adapted, [user], stage)[0])
                    started = time.perf_counter()
                for count in steps:
                    # A history without a window ends the path at step 0: every count ranks as the global model.
                    ranks.setdefault(f"{stage}|{lr}|{count}", []).append(own.get(count, own[0]))
            seconds[f"{stage}|{lr}"] = adapting / len(users)
            print(f"{stage} lr {lr}: " + ", ".join(
                f"{s} steps NDCG@10 {ndcg(np.array(ranks[f'{stage}|{lr}|{s}']), 10).mean():.4f}" for s in steps), file=sys.stderr)
    return {"ranks": ranks, "adapt_seconds": seconds}


def table(runs: list[dict]) -> str:
    """The markdown section of docs/benchmarks.md: one row per (run, stage, lr, steps)."""
    lines = [
        "Devices' own held-out figures with and without personalization (client/personalization.py): Amazon Toys, "
        f"the user-level-DP global model `{runs[0]['model']}`; users drawn at random from the {runs[0]['population']} "
        "(seeded; the same users in every row of one seed and count); full-catalogue ranking, the user's earlier items "
        "excluded. valid: adapted on the train part, ranks the validation item (the defaults were chosen on these rows); "
        "test: adapted on train + validation item, ranks the test item (never adapted on). Full-batch Adam on all "
        "parameters, dropout off; steps 0 is the global model. Cost: one device's adaptation (copy + steps) at the "
        "run's largest step count, one thread, on a machine shared with other simulations.",
        "",
        "| stage | users (seed) | lr | steps | NDCG@10 | HR@10 | vs global (NDCG@10) | adaptation cost (ms, at max steps) | command | commit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for stage in STAGES:
        for results in runs:
            for lr in results["lrs"]:
                base = ndcg(np.array(results["ranks"][f"{stage}|{lr}|0"]), 10).mean()
                for count in results["steps"]:
                    ranks = np.array(results["ranks"][f"{stage}|{lr}|{count}"])
                    value = ndcg(ranks, 10).mean()
                    ratio = f"{value / base:.2f}x" if base > 0 else "-"
                    cost = f"{1000 * results['adapt_seconds'][f'{stage}|{lr}']:.0f}"
                    lines.append(
                        f"| {stage} | {results['users']} ({results['seed']}) | {lr:g} | {count} | {value:.4f} | "
                        f"{hit_rate(ranks, 10).mean():.4f} | {ratio} | {cost} | `{results['command']}` | {results['commit']} |"
                    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--users", type=int, default=800, help="Users drawn at random (0: all).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-2])
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 1, 3, 10])
    parser.add_argument("--results", type=Path, help="Also write the raw results (JSON) here.")
    parser.add_argument("--no-write", action="store_true", help="Print only; leave docs/benchmarks.md alone.")
    parser.add_argument("--table-from", type=Path, nargs="+", help="Measure nothing: write the table of these --results files.")
    args = parser.parse_args(argv)
    if args.table_from:
        _write([json.loads(path.read_text(encoding="utf-8")) for path in args.table_from], args.no_write)
        return
    if 0 not in args.steps:
        parser.error("--steps must include 0 (the global model, the baseline)")
    torch.set_num_threads(1)  # a device has one core for this; the machine runs other simulations
    if not (args.run_dir / RESOLVED_JSON).is_file():
        print(f"skipped: {args.run_dir}/config.resolved.json is absent", file=sys.stderr)
        return
    commit = _commit()
    model, split = load_global_model(args.run_dir, args.checkpoint)
    population = len(split.users)
    rng = np.random.default_rng(args.seed)
    chosen = np.sort(rng.choice(population, size=min(args.users or population, population), replace=False))
    users = [split.users[i] for i in chosen]
    results = measure(model, users, lrs=args.lrs, steps=sorted(set(args.steps)))
    shown_argv = " ".join(argv if argv is not None else sys.argv[1:])
    results.update(
        model=f"{args.run_dir.name}/{args.checkpoint}", users=len(users), population=population, seed=args.seed, lrs=args.lrs,
        steps=sorted(set(args.steps)), commit=commit, command=f"{COMMAND} {shown_argv}".strip(),
    )
    if args.results:
        args.results.write_text(json.dumps(results), encoding="utf-8")
    _write([results], args.no_write)


def _write(runs: list[dict], print_only: bool) -> None:
    text = table(runs)
    if print_only:
        print(text)
    else:
        publish(BENCHMARKS_MD, SECTION, text)


if __name__ == "__main__":
    main()
