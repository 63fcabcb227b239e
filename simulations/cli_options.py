"""Command-line options shared by the commands that read a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedinterest.common.column_values import ColumnMap
from fedinterest.common.datasets import DATASET_KINDS, SYNTHETIC, DatasetSpec
from fedinterest.common.synthetic import SyntheticConfig

DatasetOpt = Annotated[str, typer.Option("--dataset", help=f"One of: {', '.join(DATASET_KINDS)}.")]
DataPathOpt = Annotated[Path | None, typer.Option("--data", help="Interactions file (not for synthetic).")]
UserColOpt = Annotated[str, typer.Option(help="User column of a csv/tsv/jsonl/parquet file.")]
ItemColOpt = Annotated[str, typer.Option(help="Item column of a csv/tsv/jsonl/parquet file.")]
TimeColOpt = Annotated[str, typer.Option(help="Timestamp column (epoch seconds or ISO 8601).")]
RatingColOpt = Annotated[str | None, typer.Option(help="Optional rating column.")]
MinRatingOpt = Annotated[float | None, typer.Option(help="Keep interactions rated at least this.")]
KCoreOpt = Annotated[int | None, typer.Option(help="Iterative k-core filter on users and items.")]
MinLengthOpt = Annotated[int | None, typer.Option(help="Drop users with fewer interactions.")]
SynthUsersOpt = Annotated[int, typer.Option(help="Synthetic data: number of users.")]
SynthItemsOpt = Annotated[int, typer.Option(help="Synthetic data: number of items.")]
SynthSeedOpt = Annotated[int, typer.Option(help="Synthetic data: generator seed.")]


def dataset_spec(
    dataset: str,
    data: Path | None,
    user_col: str = "user",
    item_col: str = "item",
    time_col: str = "timestamp",
    rating_col: str | None = None,
    min_rating: float | None = None,
    k_core: int | None = None,
    min_length: int | None = None,
    synthetic_users: int = SyntheticConfig.num_users,
    synthetic_items: int = SyntheticConfig.num_items,
    synthetic_seed: int = 0,
) -> DatasetSpec:
    """The options turned into one checked `DatasetSpec` (a typer.BadParameter if invalid)."""
    try:
        columns = ColumnMap(user=user_col, item=item_col, timestamp=time_col, rating=rating_col)
        synthetic = SyntheticConfig(num_users=synthetic_users, num_items=synthetic_items, seed=synthetic_seed)
        return DatasetSpec(
            kind=dataset,
            path=str(data) if data is not None else None,
            columns=columns if dataset != SYNTHETIC else ColumnMap(),
            min_rating=min_rating,
            k_core=k_core,
            min_length=min_length,
            synthetic=synthetic,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
