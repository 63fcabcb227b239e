"""Federated benchmark: FedAvg without DP and with on-device DP at several noise levels.

Each (dataset, variant) is one `fedinterest simulate` run of the dataset's config in
simulations/configs/ with the variant's overrides. Its summary is kept under
benchmarks/results/federated/ (small JSON, no data), and the table in
docs/benchmarks.md is rebuilt from every stored result, beside popularity and the
centralized model of the quality benchmark (benchmarks/results/quality/).

    python -m fedinterest.benchmarks.federated --datasets ml-100k --variants no-dp dp-1.0
    python -m fedinterest.benchmarks.federated --import-run runs/simulate-ml-100k-...
    python -m fedinterest.benchmarks.federated --table-only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fedinterest.benchmarks.report import WINDOW_COUNT_HIDDEN, layer1_epsilon, old_relation_note, publish, store_result
from fedinterest.common.run_files import FINAL_FILE, HIT_RATE_10, NDCG_10, RoundRow, read_resolved
from fedinterest.simulations.simulate import run_simulation
from fedinterest.simulations.simulation_config import parse_overrides, resolve_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "simulations" / "configs"
RESULTS = REPO / "benchmarks" / "results" / "federated"
QUALITY = REPO / "benchmarks" / "results" / "quality"
BENCHMARKS_MD = REPO / "docs" / "benchmarks.md"
DATASETS = {"ml-100k": "ML-100K", "ml-1m": "ML-1M users 1-2999", "synthetic": "synthetic"}

# Overrides of the dataset's config. Without DP the devices take more local steps (they
# have no budget to spend). With DP, a device's history is cut into windows of 10 pairs
# (11 items, neighbours sharing their boundary item; one window = one DP unit,
# docs/privacy.md) so that it holds several examples, and the sampling is sized for 4
# windows (dp-windows: q = 1/2, 2 steps; a device's own count stays private) so that
# Poisson sampling amplifies privacy; at q = 1 one round costs epsilon 4.73 at sigma 1.
# The noise multiplier then sets how many rounds a device affords within its budget
# (epsilon 8 at delta 1e-5). The rows in docs/benchmarks.md were measured before
# dp-windows, with q derived from each device's own count (see the note there).
_DP = ["max-len=10", "batch-size=2", "dp-windows=4", "local-lr=0.005"]
_NO_DP = ["noise-multiplier=0", "local-epochs=5", "local-lr=0.005"]
# FedAvg with server momentum (FedAvgM, Hsu et al. 2019): the server applies the averaged
# update through momentum 0.9 at server lr 0.3, i.e. steps up to 3x FedAvg's along the
# directions rounds agree on. 20-round pilots on ML-100K (docs/benchmarks.md, "Server
# momentum"): validation NDCG@10 0.0703 against FedAvg's 0.0553; server lr 1 (momentum
# 0.9 or 0.8) peaks at round 10 and then falls back, the steps too large to settle.
_MOMENTUM = ["strategy=fedavgm", "server-momentum=0.9", "server-lr=0.3"]
# On-device DP with plain SGD on the device (Adam turns the noise on every coordinate
# into a step of the whole learning rate, tests/test_client_training.py) and the
# server momentum above. Measured on ML-100K (docs/benchmarks.md): at local lr 0.1 the
# noise of 5 steps (sigma C / B = 1 per weight per step) swamps the device's model
# (training loss 12-14, above ln of the catalogue) and the global model stays random.
_DP_SGD = ["max-len=10", "batch-size=2", "dp-windows=4", "local-optimizer=sgd", "local-lr=0.1", *_MOMENTUM]
# FedSGD with a server Adam: each device takes one plain gradient step (lr 1, so its
# update is minus its gradient, the batch size covering every window it has) and the
# server runs Flower's FedAdam on the mean, with Adam's usual lr 1e-3 and a small tau.
# A round of 100 devices (~120 windows) is then one step of the centralized trainer's
# Adam at batch 128 (benchmarks/quality.py), which reaches its best after ~170 steps on
# ML-100K.
_FEDSGD_ADAM = [
    "noise-multiplier=0", "local-epochs=1", "local-optimizer=sgd", "local-lr=1.0", "batch-size=16",
    "strategy=fedadam", "server-lr=0.001", "server-tau=1e-8",
]
VARIANTS: dict[str, list[str]] = {
    "no-dp": _NO_DP,
    "no-dp-fedavgm": [*_NO_DP, *_MOMENTUM],
    "no-dp-sgd-fedadam": _FEDSGD_ADAM,
    "dp-1.0": ["noise-multiplier=1.0", *_DP],
    "dp-2.0": ["noise-multiplier=2.0", *_DP],
    "dp-4.0": ["noise-multiplier=4.0", *_DP],
    "dp-2.0-sgd-fedavgm": ["noise-multiplier=2.0", *_DP_SGD],
}


def variant_of(overrides: list[str]) -> str:
    """The variant whose overrides a run used: its noise multiplier, then its strategy if not FedAvg."""
    settings = parse_overrides(overrides)  # as `fedinterest simulate` reads them: a later --set wins
    noise: Any = settings.get("noise-multiplier")  # a TOML literal; float() reads the numbers
    if noise is None:
        base = "config-default"
    else:
        base = "no-dp" if float(noise) == 0 else f"dp-{float(noise):.1f}"
    if settings.get("local-optimizer") == "sgd":
        base += "-sgd"
    strategy = settings.get("strategy")
    return base if strategy in (None, "fedavg") else f"{base}-{strategy}"


def _model_label(summary: dict) -> str:
    """The table's model name: the strategy (with its server settings) and the variant."""
    strategy = summary.get("strategy", "fedavg")  # results stored before strategies were recorded ran FedAvg
    if strategy == "fedavg":
        return f"FedAvg {summary['variant']}"
    settings = ", ".join(f"{k} {v:g}" for k, v in summary.get("server", {}).items())
    name = {"fedavgm": "FedAvgM", "fedadam": "FedAdam", "fedyogi": "FedYogi", "fedprox": "FedProx"}.get(strategy, strategy)
    variant = summary["variant"].removesuffix(f"-{strategy}")
    if variant.endswith("-sgd"):
        variant = variant.removesuffix("-sgd") + " (device SGD)"
    return f"{name} ({settings}) {variant}" if settings else f"{name} {variant}"


def summarize_run_dir(run_dir: Path) -> dict:
    """The benchmark's figures from a finished simulation's run directory."""
    resolved = read_resolved(run_dir)
    final = json.loads((run_dir / FINAL_FILE).read_text())
    counts = final["counts"]
    wall = final["wall_seconds"]
    trained = counts["aggregated"]
    return {
        "dataset": resolved["run"]["dataset"],
        "variant": variant_of(list(resolved["overrides"])),
        "command": " ".join(resolved["command"]),
        "commit": resolved["commit"],
        "run_dir": run_dir.name,
        "devices": resolved["federation"]["num-supernodes"],
        "rounds": final["rounds"],
        "clients_per_round": resolved["run"]["clients-per-round"],
        "strategy": resolved["run"]["strategy"],
        "server": _server_settings(resolved["run"]),
        "test": final["test"],
        # Early stopping on the server's validation split: the round it picks and its test metrics.
        "best_valid": final.get("best_valid"),
        "privacy": final["privacy"],
        WINDOW_COUNT_HIDDEN: True,  # measured with the window count hidden (benchmarks/report.py)
        "epsilon_budget": resolved["run"]["epsilon-budget"],
        "noise_multiplier": resolved["run"]["noise-multiplier"],
        "counts": counts,
        "wall_seconds": wall,
        # Wall time of the whole run (server evaluation included) per device update aggregated.
        "seconds_per_device_update": wall / trained if trained else None,
    }


def _server_settings(run: dict) -> dict:
    """The server optimizer's settings a strategy uses (empty for FedAvg)."""
    keys = {"fedavgm": ("server-momentum", "server-lr"), "fedadam": ("server-lr", "server-tau"), "fedyogi": ("server-lr", "server-tau")}
    names = {"server-momentum": "momentum", "server-lr": "server lr", "server-tau": "tau"}
    return {names[key]: run[key] for key in keys.get(run["strategy"], ())}


def _store(summary: dict) -> Path:
    # Keyed by rounds too: runs of one variant for different lengths are all kept.
    return store_result(RESULTS, f"{summary['dataset']}-{summary['variant']}-{summary['rounds']}x{summary['clients_per_round']}", summary)


def print_progress(row: RoundRow) -> None:
    """One line per finished round on stderr (the run can take an hour)."""
    fields = ("answered", "refused", "train_loss", NDCG_10, "epsilon_max")
    print(f"  round {row.round}: " + " ".join(f"{key} {row.get(key)}" for key in fields), file=sys.stderr, flush=True)


def run(datasets: list[str], variants: list[str], extra: list[str], out: Path) -> None:
    """Simulate every requested (dataset, variant) and store its summary."""
    for dataset in datasets:
        for variant in variants:
            overrides = VARIANTS[variant] + extra
            config = resolve_config(CONFIGS / f"{dataset}.toml", overrides)
            print(f"simulating {dataset} / {variant}: {' '.join(overrides)}", file=sys.stderr)

            result = run_simulation(config, out, argv=simulate_argv(CONFIGS / f"{dataset}.toml", overrides, out), on_round=print_progress)
            print(f"  stored {_store(summarize_run_dir(result.run_dir))}", file=sys.stderr)


def simulate_argv(config_path: Path, overrides: list[str], out: Path) -> list[str]:
    """The `fedinterest simulate` arguments that reproduce one benchmark run (recorded in its run directory)."""
    return [str(config_path), *(part for item in overrides for part in ("--set", item)), "--out", str(out)]


def _centralized(dataset: str) -> dict | None:
    path = QUALITY / f"{dataset}-sasrec-seed0.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _chosen(summary: dict) -> tuple[dict, str]:
    """Test metrics of the round early stopping on validation picks (as the centralized model
    keeps its best epoch), and a label naming that round; the last round for older results."""
    best = summary.get("best_valid")
    if best and best.get("test"):
        return best["test"], f" (round {best['round']})"
    return summary["test"], " (last round)"


def _number(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def table() -> str:
    """Markdown table of every stored federated result beside popularity and centralized."""
    lines = [
        "| dataset | model | NDCG@10 | HR@10 | vs centralized | last round NDCG@10 | device epsilon max (delta) | rounds x devices/round | wall time | s per device update | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    stored = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    for dataset, label in DATASETS.items():
        runs = [s for s in stored if s["dataset"] == dataset]
        if not runs:
            continue
        central = _centralized(dataset)
        if central is not None:
            pop, cen = central["popularity_test"], central["test"]
            lines.append(f"| {label} | popularity | {pop[NDCG_10]:.4f} | {pop[HIT_RATE_10]:.4f} | {pop[NDCG_10] / cen[NDCG_10]:.0%} | - | - | - | - | - | - |")
            lines.append(f"| {label} | centralized (no DP) | {cen[NDCG_10]:.4f} | {cen[HIT_RATE_10]:.4f} | 100% | - | - | - | {central['train_seconds'] / 60:.1f} min | - | {central['commit']} |")
        for s in sorted(runs, key=lambda s: (s["variant"], s["rounds"])):
            eps = layer1_epsilon(s)
            chosen, name = _chosen(s)
            ratio = f"{chosen[NDCG_10] / central['test'][NDCG_10]:.0%}" if central else "-"
            lines.append(
                f"| {label} | {_model_label(s)}{name} | {chosen[NDCG_10]:.4f} | {chosen[HIT_RATE_10]:.4f} | {ratio} | "
                f"{s['test'][NDCG_10]:.4f} | {eps} | {s['rounds']} x {s['clients_per_round']} | {s['wall_seconds'] / 60:.1f} min | "
                f"{_number(s['seconds_per_device_update'], '.2f')} | {s['commit']} |"
            )
    return "\n".join(lines + old_relation_note(stored))


def main(argv: list[str] | None = None) -> None:
    """Run or import simulations, then rebuild the federated table in docs/benchmarks.md."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="*", default=["ml-100k", "ml-1m"], choices=list(DATASETS))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every run, key=value")
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--import-run", nargs="*", type=Path, default=[], help="run directories of `fedinterest simulate`")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    if args.import_run:
        for run_dir in args.import_run:
            print(f"imported {_store(summarize_run_dir(run_dir))}", file=sys.stderr)
    elif not args.table_only:
        run(args.datasets, args.variants, args.extra, args.out)
    publish(BENCHMARKS_MD, "federated", table())


if __name__ == "__main__":
    main()
