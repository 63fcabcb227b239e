"""`server export`: a finished run's global model as a device bundle, with its model card.

The weights are the run's last complete checkpoint (server/checkpoint.py), the model
shape is the run's own RunConfig, the catalogue is the deployment's, and the model card
says what the model was trained on, how, and what privacy guarantee holds, in numbers
taken from the run's final.json; its fields that no guarantee covers are listed in it
(server/card_disclosure.py). common/bundle.py writes the file and its checksum.
"""

from __future__ import annotations

import hashlib
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedinterest.common.run_config import RunConfig
from fedinterest.common.run_files import DEVICE_EPSILON_MAX, DEVICE_EPSILON_MEAN, FINAL_FILE, FinalReport
from fedinterest.server import checkpoint as ckpt
from fedinterest.server.card_disclosure import OUTSIDE_THE_GUARANTEE
from fedinterest.server.deployment import Deployment
from fedinterest.server.flower_processes import SuperLinkNotReady, run_status
from fedinterest.server.run_admin import RunError, find_run, read_record
from fedinterest.server.superlink import require_ready, superlink_env

CARD_FORMAT = 1
UNIT_OF_PROTECTION = (
    "one training example of one device: a window of up to max-len consecutive (input item, next item) "
    "pairs of the user's history, added or removed (layer 1, on-device DP-SGD with Opacus; the window count stays on the device)"
)
USER_LEVEL = (
    "no server-side DP-FedAvg (layer 2) in this run: a user's whole history is protected only through the "
    "per-example guarantee and its group privacy"
)


def model_card(deployment: Deployment, run_dir: Path, record: dict[str, Any], final: FinalReport, checkpoint_round: int, flower_status: str | None) -> dict[str, Any]:
    """The model card of a run: data, training, evaluation and the privacy guarantee, with units."""
    config = RunConfig.from_flower(record["run_config"])
    privacy, counts = final.privacy, final.counts
    return {
        "card_format": CARD_FORMAT,
        "model": {
            "kind": "SASRec-style causal Transformer over the item history (common/model.py)",
            "config": {k: record["run_config"][k] for k in ("max-len", "dim", "num-blocks", "num-heads", "dropout")},
            "num_items": config.num_items,
        },
        "run": {
            "name": run_dir.name,
            "flower_run_id": str(record["run_id"]),
            "flower_status": flower_status,
            "submitted_at": record.get("submitted_at"),
            "rounds": final.get("rounds"),
            "checkpoint_round": checkpoint_round,
            "strategy": config.strategy,
            "clients_per_round": config.clients_per_round,
            "local_epochs": config.local_epochs,
            "local_lr": config.local_lr,
            "replies": counts,
        },
        "data": {
            "source": "each enrolled device's own interaction history; raw histories never left the devices",
            "devices_reporting_epsilon": privacy.get("devices_reporting"),
            "catalogue_items": config.num_items,
            "catalogue_sha256": record.get("catalogue_sha256"),
        },
        "evaluation": {
            "protocol": "leave-one-out by time on each device, full-catalogue ranking, earlier items excluded; "
            "averaged over the devices that answered the federated evaluation",
            "valid": final.get("valid"),
            "test": final.get("test"),
            "best_valid": final.get("best_valid"),
        },
        "privacy": {
            "dp": config.private,
            "layer": "1: on-device DP-SGD (Opacus); each device keeps its own accountant in its ledger and refuses "
            "to train past its budget"
            + ("; and 2: user-level DP-FedAvg on the server (see user_level)" if config.user_private else ""),
            "unit_of_protection": UNIT_OF_PROTECTION,
            # Layer 2's figures (DP-FedAvg on the server) when the run used it, else why there are none.
            "user_level": privacy.get("user_level") or USER_LEVEL,
            # plain: the server saw each update; secagg+: only their sum (Flower's SecAgg+, docs/privacy.md).
            "aggregation": config.aggregation,
            "accountant": "Opacus RDP accountant, on each device" if config.private else None,
            "delta": config.delta,
            "epsilon_budget_per_device": config.epsilon_budget,
            DEVICE_EPSILON_MAX: privacy.get(DEVICE_EPSILON_MAX),
            DEVICE_EPSILON_MEAN: privacy.get(DEVICE_EPSILON_MEAN),
            "epsilon_meaning": privacy.get("unit"),
            "noise_multiplier": config.noise_multiplier,
            "max_grad_norm": config.max_grad_norm,
            "expected_batch_size": config.batch_size,
            "dp_windows": config.dp_windows,
            "note": None if config.private else "noise-multiplier = 0: trained without DP; epsilon is infinite",
            # The card's fields no guarantee covers (server/card_disclosure.py; docs/privacy.md).
            "outside_the_guarantee": dict(OUTSIDE_THE_GUARANTEE),
        },
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def export_run(deployment: Deployment, ref: str | None, out: Path) -> dict[str, Any]:
    """Write the bundle of run `ref` to `out`; what was exported (path, sha256, round, card)."""
    import torch

    from fedinterest.common.bundle import write_bundle
    from fedinterest.common.catalogue import load_catalogue

    run_dir = find_run(deployment, ref)
    record = read_record(run_dir)
    final = FinalReport.read(run_dir)
    if final is None:
        raise RunError(f"{run_dir}: no {FINAL_FILE} yet; the run has not finished (see `fedinterest server status {run_dir.name}`)")
    checkpoint = ckpt.latest(run_dir)
    if checkpoint is None:
        raise RunError(f"{run_dir / ckpt.CHECKPOINT_DIR}: no checkpoint; the run aggregated no round")
    try:
        require_ready(deployment)
        flower_status = run_status(int(record["run_id"]), superlink_env(deployment)).get("status")
    except (SuperLinkNotReady, RuntimeError, subprocess.SubprocessError):
        flower_status = None  # the SuperLink may be down; the run directory is enough to export
    config = RunConfig.from_flower(record["run_config"])
    catalogue = load_catalogue(deployment.catalogue)
    if hashlib.sha256(deployment.catalogue.read_bytes()).hexdigest() != record.get("catalogue_sha256"):
        raise RunError(f"{deployment.catalogue} changed since run {run_dir.name} was submitted; its model indexes the old catalogue")
    card = model_card(deployment, run_dir, record, final, checkpoint.round, flower_status)
    state_dict = {key: torch.from_numpy(array.copy()) for key, array in checkpoint.arrays.items()}
    path = write_bundle(Path(out), state_dict=state_dict, model_config=config.model_config(config.num_items), catalogue_ids=list(catalogue.ids), model_card=card)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"bundle": str(path), "sha256": digest, "bytes": path.stat().st_size, "run": run_dir.name, "run_id": str(record["run_id"]), "round": checkpoint.round, "card": card}
