"""One front door from a dataset description to the leave-one-out split.

`DatasetSpec` names a source (the embedded synthetic generator, MovieLens, or a generic
interactions file) and its filters; `load_dataset` reads, filters and sequences it and
records every step's report; `load_split` adds the leave-one-out split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedinterest.common.column_values import ColumnMap
from fedinterest.common.filters import apply_filters
from fedinterest.common.interaction_loader import ALL_FORMATS, load_interactions
from fedinterest.common.interactions import SequenceDataset, to_sequences
from fedinterest.common.split import LeaveOneOut, leave_one_out
from fedinterest.common.synthetic import PlantedTruth, SyntheticConfig, generate

SYNTHETIC = "synthetic"
DATASET_KINDS = (SYNTHETIC, *ALL_FORMATS)


@dataclass(frozen=True)
class DatasetSpec:
    """Where the interactions come from and which filters apply (checked on creation)."""

    kind: str = SYNTHETIC
    path: str | None = None
    columns: ColumnMap = field(default_factory=ColumnMap)
    min_rating: float | None = None
    k_core: int | None = None
    min_length: int | None = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        if self.kind not in DATASET_KINDS:
            raise ValueError(f"unknown dataset {self.kind!r}; choose one of {', '.join(DATASET_KINDS)}")
        if self.kind != SYNTHETIC and not self.path:
            raise ValueError(f"dataset {self.kind!r} needs a path to its interactions file")
        if self.kind == SYNTHETIC and self.path:
            raise ValueError("the synthetic dataset is generated in memory and takes no path")
        if self.k_core is not None and self.k_core < 1:
            raise ValueError(f"k_core must be at least 1, got {self.k_core}")
        if self.min_length is not None and self.min_length < 1:
            raise ValueError(f"min_length must be at least 1, got {self.min_length}")

    @property
    def label(self) -> str:
        """A short name for tables and run directories."""
        return self.kind if self.kind == SYNTHETIC else f"{self.kind}:{self.path}"


def load_dataset(spec: DatasetSpec) -> tuple[SequenceDataset, PlantedTruth | None]:
    """Read, filter and sequence the data; the planted truth comes only with synthetic data."""
    truth = None
    if spec.kind == SYNTHETIC:
        table, truth = generate(spec.synthetic)
    else:
        assert spec.path is not None  # DatasetSpec requires a path for every kind but synthetic
        table = load_interactions(spec.path, format=spec.kind, columns=spec.columns)
    table, reports = apply_filters(table, rating_threshold=spec.min_rating, core=spec.k_core, min_user_length=spec.min_length)
    dataset = to_sequences(table, spec.label)
    for report in reports:
        dataset = dataset.with_report(str(report))
    return dataset, truth


def load_split(spec: DatasetSpec) -> LeaveOneOut:
    """The dataset of `spec` split leave-one-out by time, its reports kept."""
    dataset, _ = load_dataset(spec)
    split = leave_one_out(dataset)
    return split
