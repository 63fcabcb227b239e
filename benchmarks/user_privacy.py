"""User-level privacy-utility benchmark: DP-FedAvg (layer 2) at user-level epsilon 1, 4, 8.

For each dataset and target epsilon, the noise multiplier is calibrated with Opacus
(`get_noise_multiplier`, RDP) so that `--rounds` rounds of Poisson sampling at
q = clients-per-round / users reach the target at delta = 1 / users; the run's own
accountant then reports the epsilon actually spent. Devices train as in the federated
benchmark's "no-dp" variant unless `--layer1` names one of its DP variants (then both
layers are on). Summaries go to benchmarks/results/user_privacy/ and the table to
docs/benchmarks.md (section "user-privacy"), beside popularity and the centralized model.

    python -m fedinterest.benchmarks.user_privacy --datasets ml-100k --epsilons 8 --rounds 30
    python -m fedinterest.benchmarks.user_privacy --table-only
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from opacus.accountants.utils import get_noise_multiplier

from fedinterest.benchmarks import federated
from fedinterest.benchmarks.report import publish
from fedinterest.common.datasets import load_split
from fedinterest.simulations.simulate import resolve_config, run_simulation

RESULTS = federated.REPO / "benchmarks" / "results" / "user_privacy"
# The budget the server enforces sits a hair above the target: the calibrated sigma
# reaches the target only up to Opacus's search tolerance.
BUDGET_SLACK = 1.01


def calibrated_noise(target_epsilon: float, users: int, clients_per_round: int, rounds: int) -> float:
    """The user-noise-multiplier that spends `target_epsilon` at delta 1/users over `rounds` releases."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "optimal order is the largest alpha": still a valid bound
        return float(get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=1.0 / users, sample_rate=min(1.0, clients_per_round / users),
            steps=rounds, accountant="rdp", epsilon_tolerance=0.005,
        ))


def overrides(target_epsilon: float, users: int, clients_per_round: int, rounds: int, clip_norm: float, layer1: str) -> list[str]:
    """The simulate overrides of one (dataset, target epsilon) run."""
    sigma = calibrated_noise(target_epsilon, users, clients_per_round, rounds)
    return [
        *federated.VARIANTS[layer1],
        f"num-server-rounds={rounds}", f"clients-per-round={clients_per_round}",
        f"user-noise-multiplier={sigma!r}", f"user-clip-norm={clip_norm:g}",
        f"user-delta={1.0 / users!r}", f"user-epsilon-budget={target_epsilon * BUDGET_SLACK:g}",
    ]


def summarize(run_dir: Path, target_epsilon: float, layer1: str) -> dict:
    """The federated benchmark's summary plus the user-level figures."""
    summary = federated.summarize_run_dir(run_dir)
    resolved = json.loads((run_dir / "config.resolved.json").read_text())["run"]
    final = json.loads((run_dir / federated.FINAL_FILE).read_text())
    summary.update({
        "target_epsilon": target_epsilon,
        "layer1": layer1,
        "user_level": final["privacy"]["user_level"],
        "stopped_early": final.get("stopped_early"),
        "user_noise_multiplier": resolved["user-noise-multiplier"],
        "user_clip_norm": resolved["user-clip-norm"],
    })
    return summary


def _store(summary: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{summary['dataset']}-{summary['layer1']}-eps{summary['target_epsilon']:g}-{summary['rounds']}x{summary['clients_per_round']}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return path


def run(datasets: list[str], epsilons: list[float], rounds: int, clients_per_round: int, clip_norm: float, layer1: str, out: Path) -> None:
    """Simulate every (dataset, target epsilon) and store its summary."""
    for dataset in datasets:
        config_path = federated.CONFIGS / f"{dataset}.toml"
        users = len(load_split(resolve_config(config_path, []).run.dataset_spec()).users)
        for epsilon in epsilons:
            sets = overrides(epsilon, users, clients_per_round, rounds, clip_norm, layer1)
            print(f"simulating {dataset} at user-level epsilon {epsilon:g} ({users} users): {' '.join(sets)}", file=sys.stderr)
            config = resolve_config(config_path, sets)
            result = run_simulation(config, out, argv=federated.simulate_argv(config_path, sets, out), on_round=federated.print_progress)
            print(f"  stored {_store(summarize(result.run_dir, epsilon, layer1))}", file=sys.stderr)


def table() -> str:
    """Markdown table of every stored result beside popularity and the centralized model."""
    lines = [
        "| dataset | devices train with | target user epsilon | user epsilon spent (delta) | sigma, clip | NDCG@10 (best valid round) | vs centralized | last round NDCG@10 | popularity | rounds x devices/round | wall time | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    stored = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    for dataset, label in federated.DATASETS.items():
        central = federated._centralized(dataset)
        for s in sorted((s for s in stored if s["dataset"] == dataset), key=lambda s: (s["layer1"], s["target_epsilon"])):
            chosen, name = federated._chosen(s)
            user = s["user_level"]
            ratio = f"{chosen['ndcg@10'] / central['test']['ndcg@10']:.0%}" if central else "-"
            popularity = f"{central['popularity_test']['ndcg@10']:.4f}" if central else "-"
            layer1 = "no DP-SGD (layer 2 only)" if s["layer1"] == "no-dp" else f"DP-SGD {s['layer1']} (layers 1+2)"
            stopped = " (stopped at budget)" if s.get("stopped_early") else ""
            lines.append(
                f"| {label} | {layer1} | {s['target_epsilon']:g} | {user['epsilon']:.3f} ({user['delta']:.2g}){stopped} | "
                f"{s['user_noise_multiplier']:.3g}, {s['user_clip_norm']:g} | {chosen['ndcg@10']:.4f}{name} | {ratio} | "
                f"{s['test']['ndcg@10']:.4f} | {popularity} | {s['rounds']} x {s['clients_per_round']} (Poisson, expected) | "
                f"{s['wall_seconds'] / 60:.1f} min | {s['commit']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the user-level privacy-utility simulations, then rebuild their table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="*", default=["ml-100k", "ml-1m"], choices=list(federated.DATASETS))
    parser.add_argument("--epsilons", nargs="*", type=float, default=[1.0, 4.0, 8.0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clients-per-round", type=int, default=100)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--layer1", default="no-dp", choices=list(federated.VARIANTS), help="the devices' local training (a federated benchmark variant)")
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.table_only:
        run(args.datasets, args.epsilons, args.rounds, args.clients_per_round, args.clip_norm, args.layer1, args.out)
    publish(federated.BENCHMARKS_MD, "user-privacy", table())


if __name__ == "__main__":
    main()
