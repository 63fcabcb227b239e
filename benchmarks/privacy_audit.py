"""Privacy audit: a membership-inference attack on models trained with and without DP.

Who is a member: in simulation partition i is user i of the leave-one-out split, one
virtual device per user. A simulation with `num-supernodes = M` registers only M
devices, the round loop continues with them (server/rounds.py, `wait_for_nodes`), and
so only users 0..M-1 ever train -- the members -- while the item vocabulary stays that
of the whole dataset. Users M..N-1 never train: the non-members. The audit checks this
in every run (the device ledgers under `devices/` name only partitions < M).

The models go through the real product path (`run_simulation`, as
benchmarks/federated.py does), with the same rounds and devices per round:

- `no-dp`: FedAvg without DP (`federated.VARIANTS["no-dp"]`);
- `layer-1`: on-device DP-SGD (`federated.VARIANTS["dp-2.0"]`, per-device budget
  epsilon 8 at delta 1e-5, one window of 10 items = one DP unit);
- `layers-1+2`: layer 1 plus user-level DP-FedAvg, its noise multiplier calibrated with
  Opacus's RDP accountant for user-level epsilon `--target-epsilon` at delta 1/M, with
  Poisson sampling of devices at rate clients-per-round / M, one step per round;
- `layer-2` (an extra): the same user-level DP-FedAvg with devices training as `no-dp`,
  a model that does learn under user-level DP, to show what the attack gets from it.

The attack is the loss threshold of Yeom et al. (2018): for every member and as many
non-members, the score is the final global model's mean next-item cross-entropy over the
user's training history (the leave-one-out split's training part, cut into windows as
local training cuts it, `common/examples.py`); a lower loss says "member". Reported: the
ROC AUC of -loss for members against non-members (0.5 = the attacker learns nothing), its
Hanley-McNeil standard error, and two companions:

- calibrated: the loss minus the same user's loss under a popularity model (the
  difficulty-calibrated attack of Watson et al., 2022), which removes how predictable a
  user's items are in general;
- control: the AUC of the popularity loss alone. The popularity model is fit on every
  user's training items, members and non-members alike, so it carries no membership
  signal: its AUC shows how far the two groups differ by themselves (members are the
  users who appear first in the data file).

Results are kept as small JSON under benchmarks/results/privacy_audit/, and the table in
docs/benchmarks.md is rebuilt from them.

    python -m fedinterest.benchmarks.privacy_audit                      # all three models
    python -m fedinterest.benchmarks.privacy_audit --models no-dp --rounds 20 --clients-per-round 100
    python -m fedinterest.benchmarks.privacy_audit --import-run runs/simulate-ml-100k-... --model no-dp
    python -m fedinterest.benchmarks.privacy_audit --table-only
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fedinterest.benchmarks.privacy_audit_models import DATASET, MODELS, TARGET_EPSILON, overrides_for
from fedinterest.benchmarks.privacy_audit_results import store, table
from fedinterest.benchmarks.privacy_audit_runs import summarize_audit
from fedinterest.benchmarks.report import publish
from fedinterest.common.run_files import NDCG_10, RoundRow

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "simulations" / "configs"
BENCHMARKS_MD = REPO / "docs" / "benchmarks.md"
SECTION = "privacy-audit"


def _progress(row: RoundRow) -> None:
    fields = ("sampled", "answered", "refused", "train_loss", NDCG_10, "epsilon_max")
    print(f"  round {row.round}: " + " ".join(f"{key} {row.get(key)}" for key in fields), file=sys.stderr, flush=True)


def run(models: Sequence[str], *, members: int | None, rounds: int, clients_per_round: int, out: Path, target_epsilon: float) -> None:
    """Simulate and audit each model in turn, storing each result as it comes."""
    from fedinterest.simulations.simulate import run_simulation
    from fedinterest.simulations.simulation_config import count_users, resolve_config

    config_path = CONFIGS / f"{DATASET}.toml"
    if members is None:
        users, _ = count_users(resolve_config(config_path).run)
        members = users // 2
    for name in models:
        overrides = overrides_for(name, members=members, rounds=rounds, clients_per_round=clients_per_round, target_epsilon=target_epsilon)
        config = resolve_config(config_path, overrides)
        print(f"simulating {DATASET} / {name}: {' '.join(overrides)}", file=sys.stderr, flush=True)
        argv = [str(config_path.relative_to(REPO))] + [arg for item in overrides for arg in ("--set", item)]
        result = run_simulation(config, out, argv=argv, on_round=_progress)
        summary = summarize_audit(result.run_dir, name)
        print(f"  {name}: attack AUC {summary['attack']['loss']['auc']:.4f}; stored {store(summary)}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    """Run (or import) the audited simulations, then rebuild the section in docs/benchmarks.md."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--members", type=int, default=None, help="M, the users that train (default: half the users)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients-per-round", type=int, default=100)
    parser.add_argument("--target-epsilon", type=float, default=TARGET_EPSILON, help="user-level epsilon of the layers 1+2 model")
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--import-run", type=Path, default=None, help="audit a finished run directory instead of simulating")
    parser.add_argument("--model", choices=list(MODELS), help="which model an --import-run is")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    if args.import_run is not None:
        if args.model is None:
            parser.error("--import-run needs --model")
        print(f"imported {store(summarize_audit(args.import_run, args.model))}", file=sys.stderr)
    elif not args.table_only:
        run(args.models, members=args.members, rounds=args.rounds, clients_per_round=args.clients_per_round, out=args.out, target_epsilon=args.target_epsilon)
    publish(BENCHMARKS_MD, SECTION, table())


if __name__ == "__main__":
    main()
