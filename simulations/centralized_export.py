"""A centralized run's model as a device bundle (`fedinterest centralized --export-bundle FILE`).

The centralized baseline is trained without federation and without DP on data the
operator holds; exported, it is what a device can rank with before (or instead of) a
federated model. Its catalogue is the training data's own item list (item index i =
`item_ids[i - 1]`), written as `catalogue.txt` into the run directory too, so a
deployment can be initialised with the same catalogue (`server init --catalogue`). The
model card says plainly that there is no privacy guarantee.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedinterest.common.catalogue import write_catalogue
from fedinterest.common.serialization import load_model

CATALOGUE_FILE = "catalogue.txt"


def export_centralized(run_dir: Path, item_ids: tuple[str, ...], payload: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write the bundle of the centralized run in `run_dir`; its path, SHA-256 and catalogue file."""
    import hashlib

    from fedinterest.common.bundle import write_bundle

    model = load_model(run_dir)
    catalogue = write_catalogue(run_dir / CATALOGUE_FILE, item_ids)
    card = {
        "card_format": 1,
        "model": {"kind": "SASRec-style causal Transformer (common/model.py)", "num_items": model.config.num_items},
        "run": {"name": run_dir.name, "kind": "centralized (no federation)", "epochs": payload.get("epochs_run"), "best_epoch": payload.get("best_epoch")},
        "data": {"source": payload.get("dataset"), "catalogue_items": len(item_ids)},
        "evaluation": {"test": payload.get("test"), "popularity_test": payload.get("popularity_test"),
                       "protocol": "leave-one-out by time, full-catalogue ranking, earlier items excluded"},
        "privacy": {"dp": False, "note": "trained centrally without differential privacy: no privacy guarantee for the users whose data trained it"},
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    path = write_bundle(out, state_dict=model.state_dict(), model_config=model.config, catalogue_ids=list(item_ids), model_card=card)
    return {"bundle": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "catalogue": str(catalogue)}
