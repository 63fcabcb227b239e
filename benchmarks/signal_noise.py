"""Signal against noise in one round of user-level DP-FedAvg (issue 12: what limits the private model).

For a shipped config at a user-level target epsilon, this measures what one round of
the product's mechanism adds to the global model: the mean of E users' clipped FedSGD
updates (the batched per-user pass the simulated nodes run, client/user_gradients.py)
against the Gaussian noise on that mean, whose norm is sigma * C * sqrt(d) / E with
sigma the run's own calibration (server/user_privacy.py, Opacus accountant), d the
noised parameters and E the expected users a round. It reads the model at
initialization, or at a run's last checkpoint (`--run-dir`), so the ratio can be read
where training starts and where it ends. In process, not `fedinterest simulate`: the
same model, mechanism and accountant, one round.

    python -m fedinterest.benchmarks.signal_noise --config ml-1m-private --epsilon 8
    python -m fedinterest.benchmarks.signal_noise --config ml-1m-private --epsilon 8 --run-dir runs/simulate-ml-1m-private-...
    python -m fedinterest.benchmarks.signal_noise --table-only
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fedinterest.benchmarks import federated
from fedinterest.benchmarks.report import publish, store_result
from fedinterest.client.user_gradients import fedsgd_user_updates
from fedinterest.common.datasets import load_split
from fedinterest.common.model import InterestModel
from fedinterest.server import checkpoint as ckpt
from fedinterest.server.evaluation import initial_arrays
from fedinterest.server.user_privacy import UserLevelAccountant, settings_of
from fedinterest.simulations.provenance import git_commit
from fedinterest.simulations.simulation_config import resolve_config

RESULTS = federated.REPO / "benchmarks" / "results" / "signal_noise"


def measure(config_name: str, epsilon: float, run_dir: Path | None, users: int | None, seed: int = 0) -> dict:
    """One round's signal and noise norms (in units of the clip norm C) for `config_name` at user-level `epsilon`."""
    sets = [f"user-target-epsilon={epsilon:g}", f"user-epsilon-budget={epsilon:g}"]
    run = resolve_config(federated.CONFIGS / f"{config_name}.toml", sets).run
    split = load_split(run.dataset_spec())
    model = InterestModel(run.model_config(split.num_items, split.dataset.item_ids))
    arrays = {k: v.numpy() for k, v in initial_arrays(model.config, run.seed).items()}
    where = "initialization"
    if run_dir is not None:
        saved = ckpt.latest(run_dir)
        if saved is None:
            raise SystemExit(f"{run_dir}: no checkpoint to read")
        arrays, where = saved.arrays, f"round {saved.round} of {run_dir.name}"
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})
    population = len(split.users)
    accountant = UserLevelAccountant.start(settings_of(run), population)
    expected = accountant.sample_rate(population) * population
    sample = np.random.default_rng(seed).choice(population, size=min(users or round(expected), population), replace=False)
    clip = run.user_clip_norm
    started = time.monotonic()
    torch.manual_seed(seed)
    updates = fedsgd_user_updates(model, [split.users[i].train for i in sample], lr=run.local_lr, clip_norm=clip)
    seconds = time.monotonic() - started
    assert updates.norms is not None  # clip_norm given: the norms come with the updates
    mean = torch.cat([t.flatten() for t in updates.total.values()]) / len(sample)
    noised = sum(int(np.asarray(v).size) for v in arrays.values())
    noise_norm = accountant.noise_multiplier * clip * np.sqrt(noised) / expected
    return {
        "config": config_name, "target_epsilon": epsilon, "where": where, "users_measured": int(len(sample)), "population": population,
        "expected_users_per_round": expected, "sigma": accountant.noise_multiplier, "delta": accountant.delta, "clip_norm": clip,
        "noised_parameters": noised, "signal_norm": float(mean.norm()) / clip, "noise_norm": float(noise_norm) / clip,
        "median_update_norm": float(updates.norms.median()), "clipped_share": float((updates.norms > clip).float().mean()),
        "seconds": round(seconds, 1), "commit": git_commit(federated.REPO),
    }


def table() -> str:
    """Markdown table of every stored measurement."""
    lines = [
        "| config | user epsilon (delta) | model | E users a round (measured) | sigma | noised parameters d | signal: norm of the mean clipped update | noise: sigma C sqrt(d) / E | noise / signal | median update norm (clipped share) | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(RESULTS.glob("*.json")):
        s = json.loads(path.read_text())
        lines.append(
            f"| {s['config']} | {s['target_epsilon']:g} ({s['delta']:.2g}) | {s['where']} | {s['expected_users_per_round']:,.0f} ({s['users_measured']:,}) | "
            f"{s['sigma']:.3g} | {s['noised_parameters']:,} | {s['signal_norm']:.4f} C | {s['noise_norm']:.4f} C | {s['noise_norm'] / s['signal_norm']:.1f} | "
            f"{s['median_update_norm']:.3g} ({s['clipped_share']:.0%}) | {s['commit']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="ml-1m-private", help="a shipped config (simulations/configs/NAME.toml)")
    parser.add_argument("--epsilon", type=float, default=8.0, help="the user-level target epsilon the noise is calibrated to")
    parser.add_argument("--run-dir", type=Path, default=None, help="read the model at this run's last checkpoint (default: initialization)")
    parser.add_argument("--users", type=int, default=None, help="users to measure (default: the expected users a round)")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.table_only:
        result = measure(args.config, args.epsilon, args.run_dir, args.users)
        where = "init" if args.run_dir is None else f"round{result['where'].split()[1]}"
        print(json.dumps(result, indent=2))
        store_result(RESULTS, f"{args.config}-eps{args.epsilon:g}-{where}", result)
    publish(federated.BENCHMARKS_MD, "signal-noise", table())


if __name__ == "__main__":
    main()
