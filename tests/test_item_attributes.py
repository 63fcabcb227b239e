"""Public catalogue attributes (common/item_attributes.py) and attribute item vectors in a
real simulation: the three file layouts, the shared "(none)" attribute, errors that name
the file and line, and a user-level DP run whose model carries attribute vectors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from simulation_helpers import ITEMS, TIMEOUT_MINUTES, write_sequences
from typer.testing import CliRunner

from fedinterest.common.interactions import DataFormatError
from fedinterest.common.item_attributes import item_attribute_rows, read_item_attributes
from fedinterest.common.model import InterestModel
from fedinterest.common.run_config import RunConfig
from fedinterest.simulations.cli import app


def test_s3rec_json_maps_items_to_sorted_attribute_numbers_and_undescribed_items_share_none(tmp_path: Path) -> None:
    path = tmp_path / "Toys_item2attributes.json"
    path.write_text(json.dumps({"7": [3, 1], "9": [], "8": ["1"]}))
    rows = item_attribute_rows(path, ["8", "7", "9", "10"])
    # Names sorted: "(none)" -> 1, "1" -> 2, "3" -> 3; row 0 is the padding item.
    assert rows == ((), (2,), (2, 3), (1,), (1,))


def test_movielens_layouts_give_genres(tmp_path: Path) -> None:
    (tmp_path / "movies.dat").write_bytes("1::Toy Story (1995)::Animation|Children's|Comedy\n2::Caf\xe9 (1999)::Drama\n".encode("latin-1"))
    assert read_item_attributes(tmp_path / "movies.dat") == {"1": ("Animation", "Children's", "Comedy"), "2": ("Drama",)}
    flags = ["0"] * 19
    flags[1] = flags[5] = "1"
    (tmp_path / "u.item").write_bytes(("1|Toy Story (1995)|01-Jan-1995||http://x|" + "|".join(flags) + "\n").encode("latin-1"))
    assert read_item_attributes(tmp_path / "u.item") == {"1": ("genre-1", "genre-5")}


@pytest.mark.parametrize(
    ("name", "content", "where", "reason"),
    [
        ("a.json", "[1, 2]", "a.json", "expected a JSON object"),
        ("b.json", '{"1": [1, {"x": 2}]}', "b.json", "item '1': attributes must be a list"),
        ("c.json", '{"1": [1,', "c.json:1", "not a JSON object of item attributes"),
        ("movies.dat", "1::Toy Story::Comedy\n2::no genres\n", "movies.dat:2", "expected `id::title::Genre|Genre`"),
        ("u.item", "1|Toy Story|x||url|" + "|".join(["0"] * 18 + ["2"]) + "\n", "u.item:1", "19 genre flags of 0 or 1"),
        ("missing.json", None, "missing.json", "cannot read the item attributes"),
    ],
)
def test_malformed_attribute_files_name_the_file_line_and_reason(tmp_path: Path, name, content, where, reason) -> None:
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataFormatError) as err:
        read_item_attributes(tmp_path / name)
    assert where in str(err.value) and reason in str(err.value)


def test_attribute_vectors_carry_fewer_free_parameters(tmp_path: Path) -> None:
    items = [str(i) for i in range(1, 201)]
    (tmp_path / "attrs.json").write_text(json.dumps({item: [int(item) % 5, 10 + int(item) % 3] for item in items}))
    free = RunConfig(dim=16, max_len=8).model_config(200)
    attrs = RunConfig(dim=16, max_len=8, item_vectors="attributes", item_attributes=str(tmp_path / "attrs.json"), tie_item_vectors=True)
    shaped = attrs.model_config(200, items)
    count = lambda config: sum(p.numel() for p in InterestModel(config).parameters())  # noqa: E731
    # 8 attributes plus the shared bias per item replace 2 x 200 x 16 free item weights.
    assert count(shaped) < count(free) - 200 * 16
    with pytest.raises(ValueError, match="needs item-attributes"):
        RunConfig(item_vectors="attributes")


USER_DP_ATTRIBUTES = """
[run]
dataset = "sequences"
data-path = "tiny.seq"
num-server-rounds = 2
clients-per-round = 4
users-per-node = 2
local-optimizer = "sgd"
local-lr = 1.0
local-epochs = 1
batch-size = 64
noise-multiplier = 0.0
strategy = "fedadam"
server-lr = 0.01
server-noise-correction = 1.0
user-target-epsilon = 8.0
user-clip-norm = 0.5
item-vectors = "attributes"
tie-item-vectors = true
item-attributes = "attrs.json"
max-len = 10
dim = 8
num-blocks = 1
num-heads = 1
dropout = 0.0
eval-every = 1
round-timeout = 120.0
"""


def test_a_user_level_dp_simulation_with_attribute_vectors_spends_its_target(tmp_path: Path) -> None:
    write_sequences(tmp_path / "tiny.seq", users=8)
    (tmp_path / "attrs.json").write_text(json.dumps({f"i{i}": [i % 4] for i in range(1, ITEMS + 1)}))
    (tmp_path / "run.toml").write_text(USER_DP_ATTRIBUTES)
    result = CliRunner().invoke(app, ["simulate", str(tmp_path / "run.toml"), "--out", str(tmp_path / "runs"), "--json", "--timeout-minutes", TIMEOUT_MINUTES])
    assert result.exit_code == 0, result.output
    run_dir = Path(json.loads(result.stdout)["run_dir"])
    user = json.loads((run_dir / "final.json").read_text())["privacy"]["user_level"]
    assert user["epsilon"] == pytest.approx(8.0, abs=0.05) and user["epsilon"] <= 8.0
    assert user["delta"] == pytest.approx(8 ** -1.1) and user["noise_multiplier"] > 0
    from safetensors.torch import load_file

    weights = load_file(str(next(run_dir.glob("checkpoints/*.safetensors"))))
    # Tied: the head is the item table; attributes: the table has a row per attribute (4 + padding).
    assert "head.weight" not in weights and weights["item_emb.weight"].shape == (5, 8), sorted(weights)
    assert weights["item_bias.bias"].dim() == 1
    assert all(torch.isfinite(w).all() for w in weights.values())
