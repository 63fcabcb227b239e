"""Hostile input for run configs (issue 5, part 4): `RunConfig.from_flower` and `--set key=value` parsing.

Any mapping gives either a RunConfig or a ValueError that names a key it was given; any
`--set` item gives either a value or a ValueError naming the item. Nothing else escapes.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import fields

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fedinterest.common.run_config import RunConfig
from fedinterest.common.run_overrides import parse_set_items, run_config_types, toml_value

SETTINGS = settings(max_examples=300, deadline=None)

KEYS = sorted(run_config_types())
TYPES = run_config_types()

any_value = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(10**30), 10**30), st.floats(), st.text(max_size=12),
    st.sampled_from(["synthetic", "deployed", "ml-100k", "csv", "fedavg", "fedprox", "", "nan"]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def typed_value(key: str) -> st.SearchStrategy:
    """Values of the key's own type (most interesting: they reach the range checks)."""
    kind = TYPES[key]
    if kind is bool:
        return st.booleans()
    if kind is int:
        return st.one_of(st.integers(-3, 300), st.integers())
    if kind is float:
        return st.one_of(st.floats(), st.floats(-2, 2), st.integers(-3, 3))
    return st.one_of(st.sampled_from(["synthetic", "deployed", "ml-100k", "fedavg", "fedyogi", ""]), st.text(max_size=8))


@st.composite
def run_mappings(draw: st.DrawFn) -> dict[str, object]:
    keys = draw(st.lists(st.sampled_from(KEYS), max_size=6, unique=True))
    mapping = {k: draw(st.one_of(typed_value(k), typed_value(k), any_value)) for k in keys}
    if draw(st.booleans()):
        mapping.update(draw(st.dictionaries(st.text(max_size=10), any_value, max_size=2)))  # unknown keys
    return mapping


def _names_a_key(message: str, keys: list[str]) -> bool:
    """Whether the message names one of `keys` (as the run-config key or as its field name)."""
    return any(k in message or k.replace("-", "_") in message or repr(k) in message for k in keys)


def _same(a: dict, b: dict) -> bool:
    """Equality of two run-config mappings where NaN equals NaN."""
    return a.keys() == b.keys() and all(
        a[k] == b[k] or (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k])) for k in a)


@SETTINGS
@given(mapping=run_mappings())
@example(mapping={"dim": 3, "num-heads": 2})
@example(mapping={"max-len": 10**100})
@example(mapping={"epsilon-budget": 2**53 + 1})  # an int for a float key that a float cannot hold
@example(mapping={"dataset": "ml-100k"})
def test_from_flower_gives_a_config_or_a_value_error_naming_a_key(mapping: dict[str, object]) -> None:
    try:
        config = RunConfig.from_flower(mapping)
    except ValueError as err:
        assert _names_a_key(str(err), list(mapping)), (str(err), mapping)
        return
    # Every field has its declared type, and the config survives Flower's round trip.
    for f in fields(RunConfig):
        assert type(getattr(config, f.name)) is type(getattr(RunConfig, f.name)), f.name
    flower = config.to_flower()
    assert _same(RunConfig.from_flower(flower).to_flower(), flower)
    for key, value in mapping.items():
        assert flower[key] == value or (isinstance(value, float) and math.isnan(value))


def test_non_string_keys_are_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown run-config keys"):
        RunConfig.from_flower({1: 2, "not-a-key": 3})


def test_a_data_path_on_the_synthetic_dataset_names_the_key() -> None:
    with pytest.raises(ValueError, match="data-path"):
        RunConfig.from_flower({"data-path": "events.csv"})


@pytest.mark.parametrize("key, value", [
    ("noise-multiplier", math.nan), ("local-lr", math.inf), ("max-grad-norm", math.inf), ("server-lr", math.nan),
    ("proximal-mu", math.nan),
])
def test_non_finite_floats_are_refused(key: str, value: float) -> None:
    with pytest.raises(ValueError, match=key):
        RunConfig.from_flower({key: value})


def test_absurd_integers_are_refused() -> None:
    with pytest.raises(ValueError, match="max-len is out of range"):
        RunConfig.from_flower({"max-len": 10**100})


# ---------------------------------------------------------------------------- --set key=value

HOSTILE_TEXT = [
    "", " ", "1", "-1", "1.5", "nan", "inf", "-inf", "+inf", "true", "false", '"x"', "'x'", '"unclosed', "[1, 2]",
    "{a = 1}", "1979-05-27", "1979-05-27T07:32:00Z", "0x10", "1_000", "1e400", "9" * 5000, "1\nx = 2", "1 # comment",
    "[" * 3000, "\x00", "\ud800", "=", "==", "a=b=c", "\u00e9", "1\r\n",
]
set_value = st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(max_size=15))
set_key = st.one_of(st.sampled_from(KEYS), st.text(max_size=8))


@SETTINGS
@given(items=st.lists(st.one_of(st.tuples(set_key, set_value).map(lambda kv: f"{kv[0]}={kv[1]}"), st.text(max_size=15)), max_size=4))
@example(items=["seed=" + "[" * 3000]).via("deep TOML nesting: was RecursionError")
@example(items=["seed=1\nx = 2"]).via("a second TOML key in the value: was silently dropped (seed=1)")
@example(items=["batch-size=" + "9" * 5000]).via("5000-digit integer: was tomllib's ValueError, naming no item")
def test_set_items_give_values_or_a_value_error_naming_the_item(items: list[str]) -> None:
    try:
        parsed = parse_set_items(items)
    except ValueError as err:
        message = str(err)
        assert "--set" in message and any(
            item.partition("=")[0].strip() in message or repr(item) in message for item in items), (message, items)
        return
    last = {item.partition("=")[0].strip(): item.partition("=")[2].strip() for item in items}  # a later --set wins
    for key, text in last.items():
        value = parsed[key]
        if TYPES.get(key) is str:
            assert isinstance(value, str)
        elif key in TYPES:
            # A typed key gets one complete TOML literal: never a value cut from a longer text.
            document = tomllib.loads(f"v = {text}")
            assert set(document) == {"v"} and _same({"v": document["v"]}, {"v": value})
    # What the commands do next: the mapping becomes a RunConfig or a ValueError naming a key.
    try:
        RunConfig.from_flower(parsed)
    except ValueError as err:
        assert _names_a_key(str(err), list(parsed)), (str(err), parsed)


@SETTINGS
@given(data=st.data())
def test_a_typed_value_written_as_toml_parses_back_to_itself(data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(KEYS))
    value = data.draw(typed_value(key).filter(lambda v: type(v) is TYPES[key]))
    (parsed,) = parse_set_items([f"{key}={toml_value(value)}"]).values()
    assert type(parsed) is type(value)
    assert parsed == value or (isinstance(value, float) and math.isnan(value) and math.isnan(parsed))


def test_a_set_value_is_one_whole_toml_literal() -> None:
    with pytest.raises(ValueError, match=r"--set seed=1\nx = 2: not a valid int"):
        parse_set_items(["seed=1\nx = 2"])
    with pytest.raises(ValueError, match="--set seed=\\[+: not a valid int"):
        parse_set_items(["seed=" + "[" * 3000])
    assert parse_set_items(["seed=3 # a comment", "dataset=ml-100k"]) == {"seed": 3, "dataset": "ml-100k"}


@SETTINGS
@given(text=st.text())
@example(text="\U00010000").via("beyond U+FFFF: json.dumps wrote a surrogate pair, which TOML refuses")
@example(text="\x7f").via("DEL: TOML wants it escaped")
def test_toml_value_writes_any_string_as_toml_that_reads_back(text: str) -> None:
    """What `simulate` and `server run` hand to `flwr run` (flat_toml) is TOML that gives back the same string."""
    assert tomllib.loads(f"v = {toml_value(text)}")["v"] == text


def test_toml_value_refuses_a_lone_surrogate_with_a_value_error() -> None:
    with pytest.raises(ValueError, match="not valid Unicode"):
        toml_value("data\udcff.csv")  # what Python makes of an undecodable byte in argv
