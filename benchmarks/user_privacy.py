"""User-level privacy-utility benchmark (issue 12): DP-FedAvg (layer 2) at user-level epsilon 1, 4, 8.

Every figure comes from `fedinterest simulate` on a shipped config (simulations/configs/
NAME.toml): the run sets user-target-epsilon, so the server calibrates sigma itself with
its own accountant (Opacus PRV by default, server/user_privacy.py) to spend exactly that
epsilon over the config's rounds at delta N^-1.1, and the budget equals the target. A
`--set KEY=VALUE` changes the recipe (an ablation row, named by `--label`). Summaries go
to benchmarks/results/user_privacy/ and the table to docs/benchmarks.md (section
"user-privacy"), beside popularity and the centralized model of the same data.

    python -m fedinterest.benchmarks.user_privacy --configs toys --epsilons 8
    python -m fedinterest.benchmarks.user_privacy --configs toys --epsilons 8 --label free-vectors --set item-vectors=free
    python -m fedinterest.benchmarks.user_privacy --table-only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedinterest.benchmarks import federated
from fedinterest.benchmarks.report import publish, store_result
from fedinterest.common.run_files import HIT_RATE_10, NDCG_10, read_resolved
from fedinterest.simulations.simulate import run_simulation
from fedinterest.simulations.simulation_config import resolve_config

RESULTS = federated.REPO / "benchmarks" / "results" / "user_privacy"
LABELS = {"ml-100k": "ML-100K", "ml-1m": "ML-1M users 1-2999", "sports": "Amazon Sports", "toys": "Amazon Toys", "synthetic": "synthetic",
          "sports-private": "Amazon Sports", "toys-private": "Amazon Toys", "demo": "synthetic demo",
          "ml-100k-private": "ML-100K", "ml-1m-private": "ML-1M users 1-2999"}


def overrides(target_epsilon: float, extra: list[str]) -> list[str]:
    """The simulate overrides of one (config, target epsilon) run: layer 2 calibrated to the target."""
    return [f"user-target-epsilon={target_epsilon:g}", f"user-epsilon-budget={target_epsilon:g}", *extra]


def summarize(run_dir: Path, config: str, target_epsilon: float, label: str, extra: list[str], private_popularity: dict | None = None) -> dict:
    """The federated benchmark's summary plus the user-level figures."""
    summary = federated.summarize_run_dir(run_dir)
    resolved = read_resolved(run_dir)["run"]
    final = json.loads((run_dir / federated.FINAL_FILE).read_text())
    user = final["privacy"]["user_level"]
    summary.update({
        "dataset": config, "label": label, "sets": extra, "target_epsilon": target_epsilon,
        "user_level": user, "stopped_early": final.get("stopped_early"),
        "user_noise_multiplier": user["noise_multiplier"], "user_clip_norm": resolved["user-clip-norm"],
        "private_popularity_test": private_popularity,
        "item_vectors": resolved["item-vectors"], "tie_item_vectors": resolved["tie-item-vectors"], "dim": resolved["dim"],
    })
    return summary


def _store(summary: dict) -> Path:
    return store_result(RESULTS, f"{summary['dataset']}-{summary['label']}-eps{summary['target_epsilon']:g}", summary)


def run(configs: list[str], epsilons: list[float], label: str, extra: list[str], out: Path) -> None:
    """Simulate every (config, target epsilon) and store its summary."""
    for name in configs:
        config_path = federated.CONFIGS / f"{name}.toml"
        for epsilon in epsilons:
            sets = overrides(epsilon, extra)
            print(f"simulating {name} ({label}) at user-level epsilon {epsilon:g}: {' '.join(sets)}", file=sys.stderr)
            config = resolve_config(config_path, sets)
            result = run_simulation(config, out, argv=federated.simulate_argv(config_path, sets, out), on_round=federated.print_progress)
            summary = summarize(result.run_dir, name, epsilon, label, extra, result.summary.get("private_popularity_test"))
            print(f"  stored {_store(summary)}", file=sys.stderr)


def table() -> str:
    """Markdown table of every stored result beside popularity and the centralized model."""
    lines = [
        "| dataset (users) | recipe (label: --set) | target user epsilon | epsilon spent (delta, accountant) | sigma, clip | NDCG@10 (best valid round) | HR@10 | vs centralized | vs popularity | vs private popularity | rounds x users/round | wall time | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    stored = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    for s in stored:  # results of the earlier benchmark: sigma calibrated outside the run, RDP, delta 1/N
        s.setdefault("label", f"before issue 12 ({s.get('layer1')}, fedavg)")
        s.setdefault("sets", [])
        s["user_level"].setdefault("accountant", "opacus rdp")
    for s in sorted(stored, key=lambda s: (s["dataset"], s["label"], s["target_epsilon"])):
        chosen, name = federated._chosen(s)
        best = s.get("best_valid") or {}
        if "prior_weight" in best:  # popularity-prior: the blend's figure, and the model's own beside it
            name += f", prior weight {best['prior_weight']:g}; model alone {best['test_model_alone'][NDCG_10]:.4f}"
        user, central = s["user_level"], federated._centralized(s["dataset"].removesuffix("-private"))
        ratio = f"{chosen[NDCG_10] / central['test'][NDCG_10]:.0%}" if central else "-"
        popularity = f"{chosen[NDCG_10] / central['popularity_test'][NDCG_10]:.2f}x" if central else "-"
        stopped = " (stopped at budget)" if s.get("stopped_early") else ""
        private = s.get("private_popularity_test")
        versus_private = f"{chosen[NDCG_10] / private[NDCG_10]:.2f}x ({private[NDCG_10]:.4f})" if private and private[NDCG_10] > 0 else "-"
        users = f" ({chosen['users']:,})" if "users" in chosen else ""
        lines.append(
            f"| {LABELS.get(s['dataset'], s['dataset'])}{users} | {s['label']}: {' '.join(s['sets']) or '(config as shipped)'} | {s['target_epsilon']:g} | "
            f"{user['epsilon']:.3f} ({user['delta']:.2g}, {user['accountant']}){stopped} | {s['user_noise_multiplier']:.3g}, {s['user_clip_norm']:g} | "
            f"{chosen[NDCG_10]:.4f}{name} | {chosen[HIT_RATE_10]:.4f} | {ratio} | {popularity} | {versus_private} | {s['rounds']} x {s['clients_per_round']} (Poisson, expected) | "
            f"{s['wall_seconds'] / 60:.1f} min | {s['commit']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the user-level privacy-utility simulations, then rebuild their table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=["toys-private", "sports-private"], help="shipped configs (simulations/configs/NAME.toml)")
    parser.add_argument("--epsilons", nargs="*", type=float, default=[8.0])
    parser.add_argument("--label", default="shipped", help="the recipe's name in the table")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="a run-config override (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.table_only:
        run(args.configs, args.epsilons, args.label, args.sets, args.out)
    publish(federated.BENCHMARKS_MD, "user-privacy", table())


if __name__ == "__main__":
    main()
