"""Quality benchmark: dataset x method table of HR@10, NDCG@10, NDCG@20, MRR and train time.

Each (dataset, method, seed) is one `fedinterest centralized` run; its results.json is
kept under benchmarks/results/quality/ (small, committed, no data in it) and the table
in docs/benchmarks.md is rebuilt from every stored result. A run made directly with
the CLI can be added with --import-run, so a long run is never repeated for the table.

    python -m fedinterest.benchmarks.quality --datasets synthetic ml-100k ml-1m
    python -m fedinterest.benchmarks.quality --import-run runs/centralized-ml-1m-...
    python -m fedinterest.benchmarks.quality --table-only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fedinterest.benchmarks.report import publish
from fedinterest.common.datasets import DatasetSpec
from fedinterest.common.run_files import HIT_RATE_10, NDCG_10
from fedinterest.simulations.centralized import CentralizedConfig, run_centralized

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "quality"
BENCHMARKS_MD = REPO / "docs" / "benchmarks.md"
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data"

# Real datasets as found under the data root (read by path, never copied).
DATA_FILES = {"ml-100k": ("ml-100k", "ml-100k/u.data"), "ml-1m": ("ml-1m", "ml-1m/ratings_u1-2999.dat")}
DATASET_LABELS = {"synthetic": "synthetic (600 users)", "ml-100k": "ML-100K", "ml-1m": "ML-1M users 1-2999"}
METHODS: dict[str, dict[str, Any]] = {"sasrec": {"loss": "full"}, "sasrec-sampled": {"loss": "sampled", "negatives": 256}}
MODEL_OPTIONS = dict(max_len=200, dim=64, num_blocks=2, num_heads=1, dropout=0.2)


def _spec(dataset: str, data_root: Path) -> DatasetSpec | None:
    if dataset == "synthetic":
        return DatasetSpec()
    kind, relative = DATA_FILES[dataset]
    path = data_root / relative
    if not path.is_file():
        print(f"skipping {dataset}: {path} is absent", file=sys.stderr)
        return None
    return DatasetSpec(kind=kind, path=str(path))


def _method_of(payload: dict) -> str:
    # Runs made before the loss option existed trained with full softmax.
    return "sasrec" if payload["training"].get("loss", "full") == "full" else "sasrec-sampled"


def _dataset_of(payload: dict) -> str:
    return payload["dataset"]["spec"].split(":", 1)[0]


def _store(payload: dict, run_dir: Path) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / f"{_dataset_of(payload)}-{_method_of(payload)}-seed{payload['training']['seed']}.json"
    payload = {**payload, "run_dir": run_dir.name}
    target.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return target


def run(datasets: list[str], methods: list[str], seeds: list[int], data_root: Path, max_minutes: float, threads: int, out: Path) -> None:
    """Train every requested combination and store its result."""
    for dataset in datasets:
        spec = _spec(dataset, data_root)
        if spec is None:
            continue
        for method in methods:
            for seed in seeds:
                config = CentralizedConfig(epochs=1000, patience=15, max_minutes=max_minutes, seed=seed, **METHODS[method])
                print(f"training {dataset} / {method} / seed {seed} (at most {max_minutes} min)", file=sys.stderr)

                def progress(report) -> None:  # one line per epoch: these runs are long
                    print(f"  epoch {report.epoch}: loss {report.loss:.4f} valid NDCG@10 {report.valid_ndcg10}", file=sys.stderr)

                run_dir, payload = run_centralized(spec, MODEL_OPTIONS, config, threads=threads, out=out, on_epoch=progress)
                print(f"  stored {_store(payload, run_dir)}", file=sys.stderr)


def import_runs(run_dirs: list[Path], commit: str | None = None, note: str | None = None) -> None:
    """Add runs made with `fedinterest centralized` to the stored results.

    `commit` corrects the recorded commit (with `note` saying why), e.g. for runs whose
    CLI stamped the commit at the end of training instead of the start.
    """
    for run_dir in run_dirs:
        results = run_dir / "results.json"
        if not results.is_file():
            raise SystemExit(f"{results}: no results.json in this run directory")
        payload = json.loads(results.read_text())
        if commit is not None:
            payload = {**payload, "commit": commit, "recorded_commit": payload.get("commit"), "provenance_note": note}
        print(f"imported {_store(payload, run_dir)}", file=sys.stderr)


def _mean(values: list[float]) -> str:
    return f"{sum(values) / len(values):.4f}"


def table() -> str:
    """The markdown table of every stored result, seeds averaged."""
    rows: dict[tuple[str, str], list[dict]] = {}
    for path in sorted(RESULTS.glob("*.json")):
        payload = json.loads(path.read_text())
        rows.setdefault((_dataset_of(payload), _method_of(payload)), []).append(payload)
    lines = [
        "| dataset | method | HR@10 | NDCG@10 | NDCG@20 | MRR | train time | epochs (best) | seeds | commit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dataset in DATASET_LABELS:
        runs_of_dataset = [(m, rows[(d, m)]) for (d, m) in rows if d == dataset]
        if not runs_of_dataset:
            continue
        popularity = runs_of_dataset[0][1][0]["popularity_test"]
        lines.append(
            f"| {DATASET_LABELS[dataset]} | popularity | {popularity[HIT_RATE_10]:.4f} | {popularity[NDCG_10]:.4f} | "
            f"{popularity['ndcg@20']:.4f} | {popularity['mrr']:.4f} | - | - | - | - |"
        )
        for method, payloads in sorted(runs_of_dataset):
            test = [p["test"] for p in payloads]
            minutes = ", ".join(f"{p['train_seconds'] / 60:.1f} min" for p in payloads)
            epochs = ", ".join(f"{p['epochs_run']} ({p['best_epoch']})" for p in payloads)
            seeds = ", ".join(str(p["training"]["seed"]) for p in payloads)
            commits = ", ".join(sorted({str(p.get("commit")) for p in payloads}))
            lines.append(
                f"| {DATASET_LABELS[dataset]} | {method} | {_mean([t[HIT_RATE_10] for t in test])} | "
                f"{_mean([t[NDCG_10] for t in test])} | {_mean([t['ndcg@20'] for t in test])} | "
                f"{_mean([t['mrr'] for t in test])} | {minutes} | {epochs} | {seeds} | {commits} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run, import, and rebuild the table in docs/benchmarks.md."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="*", default=list(DATASET_LABELS), choices=list(DATASET_LABELS))
    parser.add_argument("--methods", nargs="*", default=["sasrec"], choices=list(METHODS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--max-minutes", type=float, default=75.0, help="training time budget per run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs"), help="where run directories go")
    parser.add_argument("--import-run", nargs="*", type=Path, default=[], help="run directories of `fedinterest centralized`")
    parser.add_argument("--commit", help="with --import-run: the commit the imported runs really ran on")
    parser.add_argument("--note", help="with --commit: why the recorded commit is corrected")
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table from stored results")
    args = parser.parse_args(argv)
    if args.import_run:
        import_runs(args.import_run, args.commit, args.note)
    elif not args.table_only:
        run(args.datasets, args.methods, args.seeds, args.data_root, args.max_minutes, args.threads, args.out)
    publish(BENCHMARKS_MD, "quality", table())


if __name__ == "__main__":
    main()
