"""Every field of the model card is public or listed as outside the guarantee (issue 13, defect 5).

docs/privacy.md said the user-level guarantee covers "the exported bundle", but the card
in it (server/export.py) also carries averages of the devices' evaluation metrics, reply
counts and device epsilons, none noised. Now the card lists the fields no guarantee
covers, docs/privacy.md lists the same, and every other field is public (configuration,
or a function of the configuration and the accountants alone).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from reply_helpers import deployed_device
from scripted_grid import ScriptedGrid, as_server_task

from fedinterest.common import wire
from fedinterest.common.run_config import RunConfig
from fedinterest.common.run_files import FinalReport
from fedinterest.server import checkpoint as ckpt
from fedinterest.server.card_disclosure import OUTSIDE_THE_GUARANTEE, classify, unclassified
from fedinterest.server.export import model_card
from fedinterest.server.rounds import run

PRIVACY_MD = Path(__file__).resolve().parents[1] / "docs" / "privacy.md"
RUN = RunConfig(
    dataset="deployed", num_items=30, max_len=8, dim=8, num_blocks=1, dropout=0.0, num_server_rounds=2,
    clients_per_round=3, eval_every=1, round_timeout=5.0, share_metrics=True,
)


@pytest.fixture(autouse=True)
def server_task():
    with as_server_task():
        yield


def _card(tmp_path: Path, **changes) -> dict:
    """The card `server export` writes for a real (scripted-device) run of RUN with `changes`."""
    cfg = dataclasses.replace(RUN, run_dir=str(tmp_path), **changes)
    final = run(ScriptedGrid({n: deployed_device(epsilon=3.0) for n in range(1, 7)}), cfg)
    record = {"run_id": 99, "submitted_at": "2026-01-01T00:00:00+00:00", "run_config": cfg.to_flower(), "catalogue_sha256": "0" * 64}
    return model_card(None, tmp_path, record, FinalReport(final), ckpt.latest(tmp_path).round, "completed")


@pytest.mark.parametrize("layers", ["1", "1+2"])
def test_every_card_field_is_public_or_listed_outside_the_guarantee(tmp_path: Path, layers: str) -> None:
    changes = {"user_noise_multiplier": 1.0, "user_epsilon_budget": 1000.0} if layers == "1+2" else {}
    card = _card(tmp_path, **changes)
    assert unclassified(card) == []
    assert card["privacy"]["outside_the_guarantee"] == OUTSIDE_THE_GUARANTEE
    kinds = classify(card)
    # The noiseless figures are the ones listed outside, never passed off as public.
    assert kinds["evaluation.test.ndcg@10"] == kinds["run.replies.refused"] == kinds["privacy.device_epsilon_max"] == "outside"
    assert card["evaluation"]["test"][wire.NDCG_10] == pytest.approx(0.5) and card["privacy"]["device_epsilon_max"] == 3.0
    if layers == "1+2":
        assert kinds["privacy.user_level.delta"] == "outside" and kinds["privacy.user_level.epsilon"] == "public"


def test_the_list_names_real_card_fields_and_the_privacy_docs_repeat_it(tmp_path: Path) -> None:
    card = _card(tmp_path, user_noise_multiplier=1.0, user_epsilon_budget=1000.0)
    leaves = classify(card)
    for name in OUTSIDE_THE_GUARANTEE:
        assert any(path == name or path.startswith(name + ".") for path in leaves), name
    section = PRIVACY_MD.read_text(encoding="utf-8").split("### The model card and the exported bundle", 1)[1].split("\n## ", 1)[0]
    named = {field for line in section.splitlines() if line.startswith("- `")
             for field in re.findall(r"`([a-z_]+\.[a-z_.@0-9]+)`", line.split(":", 1)[0])}
    assert named == set(OUTSIDE_THE_GUARANTEE)
