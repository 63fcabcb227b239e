"""Share of centralized against population (issue 12's synthetic curve): the README demo's
recipe (simulations/configs/demo.toml: FedSGD under server Adam, user-level DP calibrated to
a target epsilon) on synthetic populations of 1k, 10k and 100k users, at epsilon 1, 4 and 8.

Every population keeps the demo's sampling rate (clients-per-round = users / 5) and shard
count (two virtual nodes), so only the population changes. Each private figure comes from
`fedinterest simulate` (benchmarks/user_privacy.py's runner: sigma calibrated by the server's
own accountant at delta N^-1.1); its denominator is `fedinterest centralized` on the same
synthetic population with the same model. Results go to benchmarks/results/population_curve/,
the table to docs/benchmarks.md (section "population-curve").

    python -m fedinterest.benchmarks.population_curve --users 1000 10000 100000 --epsilons 1 4 8
    python -m fedinterest.benchmarks.population_curve --table-only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedinterest.benchmarks import federated, user_privacy
from fedinterest.benchmarks.report import publish, store_result
from fedinterest.common.run_files import NDCG_10
from fedinterest.simulations.centralized import CentralizedConfig, run_centralized
from fedinterest.simulations.simulate import run_simulation
from fedinterest.simulations.simulation_config import resolve_config

RESULTS = federated.REPO / "benchmarks" / "results" / "population_curve"
CONFIG = federated.CONFIGS / "demo.toml"
NODES = 2  # as the demo


def population_sets(users: int) -> list[str]:
    """The demo's overrides for a population of `users`: same q (1/5), same two shards."""
    return [f"synthetic-users={users}", f"users-per-node={-(-users // NODES)}", f"clients-per-round={users // 5}"]


def centralized(users: int, out: Path, max_minutes: float) -> dict:
    """The centralized model of the demo's shape on this population (stored once)."""
    path = RESULTS / f"centralized-{users}.json"
    if path.is_file():
        return json.loads(path.read_text())
    run = resolve_config(CONFIG, population_sets(users)).run
    model = dict(max_len=run.max_len, dim=run.dim, num_blocks=run.num_blocks, num_heads=run.num_heads, dropout=run.dropout)
    training = CentralizedConfig(epochs=1000, patience=10, max_minutes=max_minutes, seed=run.seed)
    print(f"centralized on {users:,} synthetic users (at most {max_minutes:g} min)", file=sys.stderr)
    _, payload = run_centralized(run.dataset_spec(), model, training, threads=1, out=out)
    return json.loads(store_result(RESULTS, f"centralized-{users}", {**payload, "users": users}).read_text())


def private(users: int, epsilon: float, out: Path) -> dict:
    """One `fedinterest simulate` run of the demo on this population at this target epsilon."""
    sets = user_privacy.overrides(epsilon, population_sets(users))
    print(f"simulating {users:,} synthetic users at user-level epsilon {epsilon:g}: {' '.join(sets)}", file=sys.stderr)
    config = resolve_config(CONFIG, sets)
    result = run_simulation(config, out, argv=federated.simulate_argv(CONFIG, sets, out), on_round=federated.print_progress)
    summary = user_privacy.summarize(result.run_dir, "demo", epsilon, f"{users}", sets, result.summary.get("private_popularity_test"))
    return json.loads(store_result(RESULTS, f"private-{users}-eps{epsilon:g}", {**summary, "users": users}).read_text())


def table() -> str:
    """One row per (population, epsilon), beside that population's centralized model."""
    lines = [
        "| users | target user epsilon | epsilon spent (delta, accountant) | sigma | NDCG@10 (best valid round) | centralized NDCG@10 | share of centralized | vs popularity | vs private popularity | rounds x users/round | wall time | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = sorted((json.loads(p.read_text()) for p in RESULTS.glob("private-*.json")), key=lambda s: (s["users"], s["target_epsilon"]))
    for s in runs:
        central_path = RESULTS / f"centralized-{s['users']}.json"
        central = json.loads(central_path.read_text())["test"][NDCG_10] if central_path.is_file() else None
        popularity = json.loads(central_path.read_text())["popularity_test"][NDCG_10] if central_path.is_file() else None
        chosen, name = federated._chosen(s)
        user, private_pop = s["user_level"], s.get("private_popularity_test")
        ndcg = chosen[NDCG_10]
        lines.append(
            f"| {s['users']:,} | {s['target_epsilon']:g} | {user['epsilon']:.3f} ({user['delta']:.2g}, {user['accountant']}) | {s['user_noise_multiplier']:.3g} | "
            f"{ndcg:.4f}{name} | {_fmt(central, '.4f')} | {_fmt(central and ndcg / central, '.0%')} | {_fmt(popularity and ndcg / popularity, '.1f')}x | "
            f"{_fmt(private_pop and private_pop[NDCG_10] and ndcg / private_pop[NDCG_10], '.1f')}x | "
            f"{s['rounds']} x {s['clients_per_round']} | {s['wall_seconds'] / 60:.1f} min | {s['commit']} |"
        )
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if not value else format(value, spec)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", nargs="*", type=int, default=[1000, 10000, 100000])
    parser.add_argument("--epsilons", nargs="*", type=float, default=[1.0, 4.0, 8.0])
    parser.add_argument("--centralized-minutes", type=float, default=10.0, help="time cap of each centralized run")
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.table_only:
        for users in args.users:
            centralized(users, args.out, args.centralized_minutes)
            for epsilon in args.epsilons:
                private(users, epsilon, args.out)
    publish(federated.BENCHMARKS_MD, "population-curve", table())


if __name__ == "__main__":
    main()
