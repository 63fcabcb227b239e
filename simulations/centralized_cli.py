"""`fedinterest centralized`: train the non-federated, non-private baseline and report it."""

from __future__ import annotations

import json
import platform
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedinterest.common.datasets import load_split
from fedinterest.common.interactions import DataFormatError
from fedinterest.common.metrics import summarize
from fedinterest.common.model import ModelConfig
from fedinterest.common.serialization import save_model
from fedinterest.simulations import cli_options as opt
from fedinterest.simulations.baselines import popularity_ranks
from fedinterest.simulations.centralized import CentralizedConfig, EpochReport, train_centralized
from fedinterest.simulations.runs import new_run_dir, write_json


def git_commit() -> str | None:
    """The commit of the code that ran, when run from a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def centralized(
    dataset: opt.DatasetOpt = "synthetic",
    data: opt.DataPathOpt = None,
    user_col: opt.UserColOpt = "user",
    item_col: opt.ItemColOpt = "item",
    time_col: opt.TimeColOpt = "timestamp",
    rating_col: opt.RatingColOpt = None,
    min_rating: opt.MinRatingOpt = None,
    k_core: opt.KCoreOpt = None,
    min_length: opt.MinLengthOpt = None,
    synthetic_users: opt.SynthUsersOpt = 600,
    synthetic_items: opt.SynthItemsOpt = 500,
    synthetic_seed: opt.SynthSeedOpt = 0,
    epochs: Annotated[int, typer.Option(help="Most epochs to train.")] = 200,
    max_minutes: Annotated[Optional[float], typer.Option(help="Stop training after this many minutes.")] = None,
    patience: Annotated[int, typer.Option(help="Evaluations without a better validation NDCG@10 before stopping.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Training windows per step.")] = 128,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    max_len: Annotated[int, typer.Option(help="Longest history the model reads.")] = 200,
    dim: Annotated[int, typer.Option(help="Embedding and hidden size.")] = 64,
    blocks: Annotated[int, typer.Option(help="Transformer blocks.")] = 2,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 1,
    dropout: Annotated[float, typer.Option(help="Dropout rate.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and batch order.")] = 0,
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 2,
    out: Annotated[Path, typer.Option(help="Parent directory of the run directory.")] = Path("runs"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Train the model on all users' training data (no federation, no DP); report test HR/NDCG/MRR
    over the full catalogue beside the popularity baseline."""
    console = Console(stderr=True)
    spec = opt.dataset_spec(
        dataset, data, user_col, item_col, time_col, rating_col, min_rating, k_core, min_length,
        synthetic_users, synthetic_items, synthetic_seed,
    )
    try:
        train_config = CentralizedConfig(epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, max_minutes=max_minutes, seed=seed)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    torch.set_num_threads(threads)
    try:
        split = load_split(spec)
    except (DataFormatError, FileNotFoundError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(code=2) from err
    try:
        model_config = ModelConfig(num_items=split.num_items, max_len=max_len, dim=dim, num_blocks=blocks, num_heads=heads, dropout=dropout)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    for line in split.dataset.reports:
        console.print(f"[dim]{line}[/dim]")
    console.print(f"[dim]leave-one-out: {len(split)} users split, {split.users_left_out} with fewer than 3 interactions left out[/dim]")

    with Progress(
        TextColumn("[bold]epoch"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
        console=console, disable=as_json,
    ) as progress:
        task = progress.add_task("train", total=epochs, status="")

        def on_epoch(report: EpochReport) -> None:
            valid = "-" if report.valid_ndcg10 is None else f"{report.valid_ndcg10:.4f}"
            status = f"loss {report.loss:.4f}  valid NDCG@10 {valid}  best {report.best_ndcg10:.4f}"
            progress.update(task, completed=report.epoch, status=status)
            if not console.is_terminal and not as_json:
                # Logs and CI have no live bar: one line per epoch instead.
                console.print(f"epoch {report.epoch}: {status}  ({report.elapsed:.0f} s)", soft_wrap=True)

        result = train_centralized(split, model_config, train_config, on_epoch)

    run_dir = new_run_dir(out, f"centralized-{spec.kind}")
    save_model(result.model, run_dir)
    payload = {
        "command": "centralized",
        "commit": git_commit(),
        "machine": {"cpus_used": threads, "platform": platform.platform(), "torch": torch.__version__},
        "dataset": {"spec": spec.label, "users": len(split), "items": split.num_items,
                    "interactions": split.dataset.num_interactions, "reports": list(split.dataset.reports),
                    "users_left_out": split.users_left_out},
        "model": asdict(model_config),
        "training": asdict(train_config),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "stopped_because": result.stopped_because,
        "train_seconds": round(result.train_seconds, 1),
        "valid": result.valid,
        "test": result.test,
        "popularity_test": summarize(popularity_ranks(split, "test")),
        "history": [asdict(r) for r in result.history],
    }
    write_json(run_dir / "results.json", payload)
    if as_json:
        typer.echo(json.dumps({k: v for k, v in payload.items() if k != "history"}, indent=2))
        return
    console.print(f"results in {run_dir}")
    t, p = payload["test"], payload["popularity_test"]
    typer.echo(f"{'method':<12} {'HR@10':>7} {'NDCG@10':>8} {'NDCG@20':>8} {'MRR':>7}")
    typer.echo(f"{'sasrec':<12} {t['hr@10']:>7.4f} {t['ndcg@10']:>8.4f} {t['ndcg@20']:>8.4f} {t['mrr']:>7.4f}")
    typer.echo(f"{'popularity':<12} {p['hr@10']:>7.4f} {p['ndcg@10']:>8.4f} {p['ndcg@20']:>8.4f} {p['mrr']:>7.4f}")
    typer.echo(f"trained {result.epochs_run} epochs in {result.train_seconds:.0f} s (best epoch {result.best_epoch}; stopped: {result.stopped_because})")
