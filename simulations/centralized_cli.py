"""`fedinterest centralized`: train the non-federated, non-private baseline and report it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedinterest.common.errors import JobFailed
from fedinterest.common.model_config import ModelConfig
from fedinterest.common.run_files import HIT_RATE_10, NDCG_10
from fedinterest.common.split import LeaveOneOut
from fedinterest.simulations import cli_options as opt
from fedinterest.simulations.centralized import CentralizedConfig, EpochReport, run_centralized


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
    max_minutes: Annotated[float | None, typer.Option(help="Stop training after this many minutes.")] = None,
    patience: Annotated[int, typer.Option(help="Evaluations without a better validation NDCG@10 before stopping.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Training windows per step.")] = 128,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    max_len: Annotated[int, typer.Option(help="Longest history the model reads.")] = 200,
    dim: Annotated[int, typer.Option(help="Embedding and hidden size.")] = 64,
    blocks: Annotated[int, typer.Option(help="Transformer blocks.")] = 2,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 1,
    dropout: Annotated[float, typer.Option(help="Dropout rate.")] = 0.2,
    item_vectors: Annotated[str, typer.Option(help="'free' item vectors, or 'attributes': the mean of the items' public attributes' vectors.")] = "free",
    item_attributes: Annotated[Path | None, typer.Option(help="The catalogue's attribute file (S3-Rec item2attributes JSON, ML-1M movies.dat, ML-100K u.item).")] = None,
    tie_item_vectors: Annotated[bool, typer.Option("--tie-item-vectors", help="The head reuses the item table.")] = False,
    loss: Annotated[str, typer.Option(help="'full' softmax over the catalogue, or 'sampled' negatives.")] = "full",
    negatives: Annotated[int, typer.Option(help="Uniform negatives per batch with --loss sampled.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and batch order.")] = 0,
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 2,
    out: Annotated[Path, typer.Option(help="Parent directory of the run directory.")] = Path("runs"),
    export_bundle: Annotated[Path | None, typer.Option("--export-bundle", help="Also write the trained model as a device bundle (and catalogue.txt in the run directory).")] = None,
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
        train_config = CentralizedConfig(
            epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, max_minutes=max_minutes, seed=seed,
            loss=loss, negatives=negatives,
        )
        model_options: dict[str, Any] = dict(
            max_len=max_len, dim=dim, num_blocks=blocks, num_heads=heads, dropout=dropout, item_vectors=item_vectors, tie_item_vectors=tie_item_vectors,
        )
        if (item_vectors == "attributes") != (item_attributes is not None):
            raise ValueError("--item-vectors attributes and --item-attributes go together")
        ModelConfig(num_items=1, **model_options, item_attributes=((), (1,)) if item_vectors == "attributes" else ())  # checked before any data is read
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err

    progress = Progress(
        TextColumn("[bold]epoch"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
        console=console, disable=as_json,
    )
    task = progress.add_task("train", total=epochs, status="")

    item_ids: list[tuple[str, ...]] = []

    def on_data(split: LeaveOneOut) -> None:
        item_ids.append(split.dataset.item_ids)
        for line in split.dataset.reports:
            console.print(f"[dim]{line}[/dim]", soft_wrap=True)
        console.print(f"[dim]leave-one-out: {len(split)} users split, {split.users_left_out} with fewer than 3 interactions left out[/dim]")
        progress.start()  # only once the data is in: a bad file never shows an empty bar

    def on_epoch(report: EpochReport) -> None:
        valid = "-" if report.valid_ndcg10 is None else f"{report.valid_ndcg10:.4f}"
        status = f"loss {report.loss:.4f}  valid NDCG@10 {valid}  best {report.best_ndcg10:.4f}"
        progress.update(task, completed=report.epoch, status=status)
        if not console.is_terminal and not as_json:
            # Logs and CI have no live bar: one line per epoch instead.
            console.print(f"epoch {report.epoch}: {status}  ({report.elapsed:.0f} s)", soft_wrap=True)

    try:  # a DataFormatError ends the command by the rule of common/errors.py (exit 2), as the `fedinterest` group applies it
        run_dir, payload = run_centralized(
            spec, model_options, train_config, threads=threads, out=out, on_epoch=on_epoch, on_data=on_data,
            item_attributes=item_attributes
        )
    finally:
        if progress.live.is_started:
            progress.stop()

    if export_bundle is not None:
        from fedinterest.common.bundle import BundleError
        from fedinterest.simulations.centralized_export import export_centralized

        try:
            payload["bundle"] = export_centralized(run_dir, item_ids[0], payload, export_bundle)
        except (BundleError, OSError, ValueError) as err:
            # The training ran: a bundle it could not write fails the job (exit 1), its results stay in run_dir.
            raise JobFailed(f"the run finished in {run_dir}, but its bundle was not written: {err}") from err
        if not as_json:
            console.print(f"bundle {payload['bundle']['bundle']} (catalogue {payload['bundle']['catalogue']})")
    if as_json:
        typer.echo(json.dumps({k: v for k, v in payload.items() if k != "history"}, indent=2))
        return
    console.print(f"results in {run_dir}")
    t, p = payload["test"], payload["popularity_test"]
    typer.echo(f"{'method':<12} {'HR@10':>7} {'NDCG@10':>8} {'NDCG@20':>8} {'MRR':>7}")
    typer.echo(f"{'sasrec':<12} {t[HIT_RATE_10]:>7.4f} {t[NDCG_10]:>8.4f} {t['ndcg@20']:>8.4f} {t['mrr']:>7.4f}")
    typer.echo(f"{'popularity':<12} {p[HIT_RATE_10]:>7.4f} {p[NDCG_10]:>8.4f} {p['ndcg@20']:>8.4f} {p['mrr']:>7.4f}")
    typer.echo(
        f"trained {payload['epochs_run']} epochs in {payload['train_seconds']:.0f} s "
        f"(best epoch {payload['best_epoch']}; stopped: {payload['stopped_because']})"
    )
