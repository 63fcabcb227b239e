"""What a model card (server/export.py) reveals, field by field, against docs/privacy.md's guarantees.

The bundle's weights are the last released global model: covered by layer 2's
user-level guarantee when the run used it, and by every device's layer-1 guarantee
(post-processing of their DP updates). The card beside them also says how the run went.
Each of its fields is either

- public: set by the operator (run config, names, times, the catalogue) or a function
  of the run config and the accountants alone (rounds released, layer 2's epsilon for
  them), so it depends on no user's data; or
- outside every guarantee: computed from the users' data or participation without
  noise. OUTSIDE_THE_GUARANTEE names each with why; the card carries that list, and
  docs/privacy.md ("The model card and the exported bundle") repeats it.

`unclassified(card)` lists fields that are neither (tests/test_card_disclosure.py keeps it empty).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fedinterest.common.run_files import DEVICE_EPSILON_MAX, DEVICE_EPSILON_MEAN

_EVALUATION = (
    "mean HR@10 / NDCG@10 of the users' held-out items under the model, without noise: a function of "
    "those items and of the histories ranked from (in a deployment, of the metrics devices chose to share)"
)
OUTSIDE_THE_GUARANTEE = {
    "run.replies": "counts of users sampled, answered, refused, failed, rejected and aggregated over the run: participation and budget state",
    "data.devices_reporting_epsilon": "how many devices ever reported an epsilon: participation",
    "evaluation.valid": _EVALUATION,
    "evaluation.test": _EVALUATION,
    "evaluation.best_valid": _EVALUATION + "; and the round that validation picked",
    f"privacy.{DEVICE_EPSILON_MAX}": "the largest layer-1 epsilon a device reported: a function of how often it took part",
    f"privacy.{DEVICE_EPSILON_MEAN}": "the mean layer-1 epsilon the devices reported: a function of how often they took part",
    "privacy.user_level.delta": "1 / devices registered at the first round unless user-delta was set: the federation's size",
}
# Everything else, by the card section or field it lives under.
PUBLIC = (
    "card_format", "model", "exported_at",
    "run.name", "run.flower_run_id", "run.flower_status", "run.submitted_at", "run.rounds", "run.checkpoint_round",
    "run.strategy", "run.clients_per_round", "run.local_epochs", "run.local_lr",
    "data.source", "data.catalogue_items", "data.catalogue_sha256",
    "evaluation.protocol",
    "privacy.dp", "privacy.layer", "privacy.aggregation", "privacy.unit_of_protection", "privacy.user_level", "privacy.accountant",
    "privacy.delta", "privacy.epsilon_budget_per_device", "privacy.epsilon_meaning", "privacy.noise_multiplier",
    "privacy.max_grad_norm", "privacy.expected_batch_size", "privacy.dp_windows", "privacy.note", "privacy.outside_the_guarantee",
)


def _leaves(value: Any, path: str) -> Iterator[str]:
    if isinstance(value, dict) and value:
        for key, child in value.items():
            yield from _leaves(child, f"{path}.{key}" if path else str(key))
    else:
        yield path


def _under(path: str, names: Any) -> bool:
    return any(path == name or path.startswith(name + ".") for name in names)


def classify(card: dict[str, Any]) -> dict[str, str]:
    """Every leaf field of `card` (dotted path) -> "outside", "public" or "unclassified"."""
    return {
        path: "outside" if _under(path, OUTSIDE_THE_GUARANTEE) else "public" if _under(path, PUBLIC) else "unclassified"
        for path in _leaves(card, "")
    }


def unclassified(card: dict[str, Any]) -> list[str]:
    """Leaf fields of `card` that are neither public nor listed outside the guarantee."""
    return [path for path, kind in classify(card).items() if kind == "unclassified"]
