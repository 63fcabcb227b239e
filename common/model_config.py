"""The model's shape (`ModelConfig`), apart from the model so that reading it needs no torch.

RunConfig builds one to check a run's model settings, and every command that reads a
run config (the operator's `status`, `devices`, the device's `policy`) would otherwise
import torch, seconds before it can answer (issue 16). common/model.py re-exports it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from fedinterest.common.constants import PAD_ID

ITEM_VECTORS = ("free", "attributes")


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines the model; passed whole to `InterestModel`.

    `item_attributes` (item_vectors "attributes"): row i holds the attribute indices
    (1..num_attributes) of item i, row PAD_ID none; every item needs at least one.
    """

    num_items: int
    max_len: int = 200
    dim: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.2
    item_vectors: str = "free"
    tie_item_vectors: bool = False
    item_attributes: tuple[tuple[int, ...], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        # From JSON (a saved model's config) the rows arrive as lists.
        object.__setattr__(self, "item_attributes", tuple(tuple(int(a) for a in row) for row in self.item_attributes))
        checks = {
            "num_items": self.num_items >= 1,
            "max_len": self.max_len >= 2,
            "dim": self.dim >= 1,
            "num_blocks": self.num_blocks >= 1,
            "num_heads": self.num_heads >= 1 and self.dim % self.num_heads == 0,
            "dropout": 0.0 <= self.dropout < 1.0,
            "item_vectors": self.item_vectors in ITEM_VECTORS,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            shown = {k: v for k, v in asdict(self).items() if k != "item_attributes"}
            raise ValueError(
                f"invalid model config {bad}: need num_items>=1, max_len>=2, dim>=1, num_blocks>=1, "
                f"num_heads>=1 dividing dim, 0<=dropout<1, item_vectors one of {ITEM_VECTORS}; got {shown}"
            )
        rows = self.item_attributes
        if self.item_vectors == "attributes":
            if len(rows) != self.num_items + 1 or rows[PAD_ID]:
                raise ValueError(f"item_attributes needs one row per item plus an empty row {PAD_ID}: {len(rows)} rows for {self.num_items} items")
            empty = [i for i, row in enumerate(rows) if i != PAD_ID and not row]
            if empty or any(a < 1 for row in rows for a in row):
                raise ValueError(f"every item needs attribute indices >= 1; items {empty[:5]} have none" if empty else "attribute indices must be >= 1")
        elif rows:
            raise ValueError('item_attributes is only for item_vectors = "attributes"')

    @property
    def num_attributes(self) -> int:
        """How many attributes the item vectors are built from (0 for free vectors)."""
        return max((a for row in self.item_attributes for a in row), default=0)

    @property
    def table_rows(self) -> int:
        """Rows of the item table: the items (free) or the attributes (attributes), plus PAD_ID."""
        return (self.num_attributes if self.item_vectors == "attributes" else self.num_items) + 1
