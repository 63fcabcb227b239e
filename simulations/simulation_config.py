"""A simulation's config: the TOML file and `--set` items, resolved and checked once.

A simulation config is a TOML file with two tables:

    [run]          # RunConfig keys, kebab-case (common/run_config.py has the defaults)
    dataset = "ml-100k"
    data-path = "../../../shared/data/ml-100k/u.data"   # relative to this file
    [federation]
    num-supernodes = 943   # virtual devices; default: one per user of the dataset
    client-cpus = 1        # CPUs Ray reserves per virtual device

`resolve_config` parses it (plus `--set key=value` overrides) into a checked
`SimulationConfig`; `resume_config` reads an interrupted run directory's resolved config
back (simulations/run_directory.py wrote it) to run it again in place.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fedinterest.simulations
from fedinterest.common.datasets import load_split
from fedinterest.common.errors import FedinterestError
from fedinterest.common.run_config import RESUME_OVERRIDABLE, RunConfig, keys_with
from fedinterest.common.run_files import RESOLVED_JSON
from fedinterest.common.run_overrides import parse_set_items
from fedinterest.common.structured_files import read_json, read_toml

RUN_TABLE = "run"
# Run keys naming files: relative to the config file (in it) or to the current directory (--set).
PATH_KEYS = ("data-path", "item-attributes")
FEDERATION_TABLE = "federation"
NUM_SUPERNODES = "num-supernodes"
CLIENT_CPUS = "client-cpus"
FEDERATION_KEYS = (NUM_SUPERNODES, CLIENT_CPUS)


class SimulationConfigError(FedinterestError, ValueError):
    """A simulation config or override that cannot run (the message names the key)."""


@dataclass(frozen=True)
class FederationConfig:
    """The simulated federation: how many virtual devices and the CPUs each one holds."""

    num_supernodes: int | None = None  # None: one virtual device per user of the dataset
    client_cpus: int = 1

    def __post_init__(self) -> None:
        for key, value in ((NUM_SUPERNODES, self.num_supernodes), (CLIENT_CPUS, self.client_cpus)):
            if value is None and key == NUM_SUPERNODES:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SimulationConfigError(f"[federation] {key} must be an integer >= 1, got {value!r}")

    def flower_args(self) -> str:
        """The `--federation-config` string of `flwr run` (num-supernodes must be set)."""
        if self.num_supernodes is None:
            raise ValueError("num-supernodes is not resolved yet")
        return f"num-supernodes={self.num_supernodes} client-resources-num-cpus={self.client_cpus}"


@dataclass(frozen=True)
class SimulationConfig:
    """One simulation, resolved and checked: its name, the run config and the federation."""

    name: str
    run: RunConfig
    federation: FederationConfig
    source: str | None = None  # the config file it came from
    overrides: tuple[str, ...] = ()  # the --set items, as given


def parse_overrides(items: Sequence[str]) -> dict[str, object]:
    """`--set key=value` items as a mapping; values are TOML literals, or plain strings.

    A string field takes the text as it is (`dataset=ml-100k`, quotes optional); other
    fields need a TOML literal of their type (`noise-multiplier=0.5`, `seed=3`).
    """
    try:
        return parse_set_items(items, {NUM_SUPERNODES: int, CLIENT_CPUS: int})
    except ValueError as err:
        raise SimulationConfigError(str(err)) from err


def resolve_config(path: Path, overrides: Sequence[str] = (), *, cwd: Path | None = None) -> SimulationConfig:
    """Read a simulation TOML, apply `--set` overrides, check everything through RunConfig.

    A relative `data-path` in the file is relative to the file; one given with `--set`
    is relative to `cwd` (the current directory by default).
    """
    path = Path(path)
    cwd = Path.cwd() if cwd is None else Path(cwd)
    document = read_toml(path, SimulationConfigError, missing=f"{path}: no such config file")
    unknown = sorted(set(document) - {RUN_TABLE, FEDERATION_TABLE})
    if unknown:
        raise SimulationConfigError(f"{path}: unknown tables or keys {unknown}; a config has only [run] and [federation]")
    run_table = _table(document, RUN_TABLE, path)
    federation_table = _table(document, FEDERATION_TABLE, path)
    bad = sorted(set(federation_table) - set(FEDERATION_KEYS))
    if bad:
        raise SimulationConfigError(f"{path}: unknown [federation] keys {bad}; known: {list(FEDERATION_KEYS)}")

    run_values = dict(run_table)
    for key in PATH_KEYS:
        if run_values.get(key):
            run_values[key] = _resolve_path(run_values[key], path.resolve().parent)
    set_values = parse_overrides(overrides)
    for key, value in set_values.items():
        if key in FEDERATION_KEYS:
            federation_table[key] = value
        elif key in PATH_KEYS and value:
            run_values[key] = _resolve_path(value, cwd)
        else:
            run_values[key] = value
    if "run-dir" in run_values:
        raise SimulationConfigError("run-dir is set by the runner (the run directory under --out); leave it out")
    try:
        run = RunConfig.from_flower(run_values)
    except ValueError as err:
        raise SimulationConfigError(str(err)) from err
    federation = FederationConfig(
        num_supernodes=federation_table.get(NUM_SUPERNODES), client_cpus=federation_table.get(CLIENT_CPUS, 1)
    )
    return SimulationConfig(name=path.stem, run=run, federation=federation, source=str(path.resolve()), overrides=tuple(overrides))


def _table(document: Mapping[str, Any], name: str, path: Path) -> dict[str, Any]:
    table = document.get(name, {})
    if not isinstance(table, dict):
        raise SimulationConfigError(f"{path}: [{name}] must be a table")
    nested = sorted(k for k, v in table.items() if isinstance(v, dict))
    if nested:
        raise SimulationConfigError(f"{path}: [{name}] holds sub-tables {nested}; keys are flat (e.g. noise-multiplier = 1.0)")
    return dict(table)


def _resolve_path(value: object, base: Path) -> object:
    if not isinstance(value, str):
        return value  # RunConfig reports the wrong type
    candidate = Path(value).expanduser()
    return str(candidate if candidate.is_absolute() else (base / candidate).resolve())


def check_project(project_dir: Path) -> None:
    """Fail early when the Flower app's pyproject would make flwr reject the run config.

    flwr 1.41 refuses (`Invalid run configuration`) any `--run-config` key that is not
    in `[tool.flwr.app.config]`, and the runner passes every RunConfig key.
    """
    pyproject = project_dir / "pyproject.toml"
    try:
        document = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (FileNotFoundError, tomllib.TOMLDecodeError) as err:
        raise SimulationConfigError(f"{pyproject}: cannot read the Flower app config ({err})") from err
    app = document.get("tool", {}).get("flwr", {}).get("app", {})
    if "components" not in app:
        raise SimulationConfigError(f"{pyproject}: no [tool.flwr.app.components] (serverapp/clientapp)")
    declared = set(app.get("config", {}))
    missing = sorted(set(RunConfig().to_flower()) - declared)
    if missing:
        raise SimulationConfigError(
            f"{pyproject}: [tool.flwr.app.config] lacks run-config keys {missing}; flwr rejects a run that "
            "sets keys its app does not declare (every RunConfig key must be listed there)"
        )


def project_dir() -> Path:
    """The directory holding the Flower app's pyproject.toml (the repository root)."""
    return Path(fedinterest.simulations.__file__).resolve().parents[1]


def count_users(run: RunConfig) -> tuple[int, int]:
    """(users with a leave-one-out split, catalogue size) of the run's dataset."""
    split = load_split(run.dataset_spec())
    return len(split), split.num_items


# Keys `--set` may change when resuming: the checkpoint accepts no other change (server/checkpoint.py).
RESUME_KEYS = keys_with(RESUME_OVERRIDABLE)


def resume_config(run_dir: Path, overrides: Sequence[str] = ()) -> SimulationConfig:
    """The resolved config of an earlier run directory, to run again in place (`--resume`).

    Only num-server-rounds may be overridden (to train further): the ServerApp resumes
    from the last checkpoint only under the config it was written with.
    """
    run_dir = Path(run_dir).resolve()
    path = run_dir / RESOLVED_JSON
    missing = f"{run_dir}: no {RESOLVED_JSON}; not a run directory of `fedinterest simulate`"
    resolved = read_json(path, SimulationConfigError, missing=missing)
    set_values = parse_overrides(overrides)
    bad = sorted(set(set_values) - set(RESUME_KEYS))
    if bad:
        raise SimulationConfigError(f"--resume takes only {', '.join(RESUME_KEYS)} as --set; got {bad} (start a new run to change them)")
    # The directory may have moved since: the run writes where it is now (run-dir is not hashed).
    run_values = {**resolved.get(RUN_TABLE, {}), **set_values, "run-dir": str(run_dir)}
    federation_table = resolved.get(FEDERATION_TABLE, {})
    try:
        run = RunConfig.from_flower(run_values)
    except ValueError as err:
        raise SimulationConfigError(f"{path}: {err}") from err
    federation = FederationConfig(num_supernodes=federation_table.get(NUM_SUPERNODES), client_cpus=federation_table.get(CLIENT_CPUS, 1))
    if federation.num_supernodes is None:
        raise SimulationConfigError(f"{path}: [federation] {NUM_SUPERNODES} is missing")
    source = resolved.get("source")
    name = Path(source).stem if source else run_dir.name
    return SimulationConfig(name=name, run=run, federation=federation, source=source, overrides=tuple(resolved.get("overrides") or ()) + tuple(overrides))

