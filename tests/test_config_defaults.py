"""One source of truth for the run config's defaults: RunConfig (common/run_config.py).

Flower needs every run-config key declared with a value in pyproject.toml
([tool.flwr.app.config]: `flwr run` refuses keys it does not declare), so the defaults are
written twice; this test keeps the copy equal. Shipped simulation configs hold only what
differs from them, so a changed default reaches every config that does not say otherwise."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from fedinterest.common.run_config import RunConfig

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = {f.name.replace("_", "-"): f.default for f in fields(RunConfig)}


def test_pyproject_declares_exactly_the_run_configs_defaults() -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert sorted(declared) == sorted(DEFAULTS)
    assert {k: v for k, v in declared.items() if v != DEFAULTS[k] or type(v) is not type(DEFAULTS[k])} == {}


@pytest.mark.parametrize("path", sorted((REPO / "simulations" / "configs").glob("*.toml")), ids=lambda p: p.stem)
def test_a_shipped_config_sets_only_known_keys_that_differ_from_the_defaults(path: Path) -> None:
    run = tomllib.loads(path.read_text())["run"]
    assert sorted(set(run) - set(DEFAULTS)) == []
    assert sorted(k for k, v in run.items() if v == DEFAULTS[k]) == []


def test_each_key_role_is_declared_once_on_its_field_and_read_by_the_modules_that_use_it() -> None:
    from fedinterest.common.run_config import RESUME_OVERRIDABLE, RUN_MANAGED, UNHASHED, keys_with
    from fedinterest.server.checkpoint import UNHASHED_KEYS, config_hash
    from fedinterest.server.deployment import RUN_MANAGED_KEYS

    assert RUN_MANAGED_KEYS == keys_with(RUN_MANAGED) == ("dataset", "data-path", "synthetic-users", "synthetic-items", "synthetic-seed", "num-items", "run-dir")
    assert UNHASHED_KEYS == keys_with(UNHASHED) == ("num-server-rounds", "run-dir")
    assert keys_with(RESUME_OVERRIDABLE) == ("num-server-rounds",)
    # What the roles mean where they are used: a resumed run may train further and move, nothing else.
    base = RunConfig(num_server_rounds=5, run_dir="/a")
    assert config_hash(RunConfig(num_server_rounds=9, run_dir="/b")) == config_hash(base)
    assert config_hash(RunConfig(num_server_rounds=5, run_dir="/a", seed=1)) != config_hash(base)
