"""The simulation runner without a Flower run: config files, --set, checks, run directory, report."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

import fedinterest.simulations
from fedinterest.common.run_config import RunConfig
from fedinterest.common.run_files import FinalReport, MetricsFollower, RoundRow
from fedinterest.common.run_overrides import flat_toml, toml_value
from fedinterest.server.flower_processes import OFFLINE_ENV, flower_env, last_exception
from fedinterest.simulations.cli import app
from fedinterest.simulations.flower_run import SimulationFailed, write_flower_config
from fedinterest.simulations.privacy_report import privacy_markdown, privacy_report
from fedinterest.simulations.run_directory import prepare_run
from fedinterest.simulations.run_summary import check_updates, summarize_run
from fedinterest.simulations.simulation_config import (
    FederationConfig,
    SimulationConfig,
    SimulationConfigError,
    check_project,
    parse_overrides,
    project_dir,
    resolve_config,
)

CONFIGS = Path(fedinterest.simulations.__file__).resolve().parent / "configs"
runner = CliRunner()


def write(tmp_path: Path, text: str, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_config_file_and_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, '[run]\nsynthetic-users = 20\nnoise-multiplier = 2\ndim = 16\n\n[federation]\nnum-supernodes = 10\nclient-cpus = 2\n')
    config = resolve_config(path)
    assert config.name == "exp"
    assert config.run.synthetic_users == 20 and config.run.dim == 16
    assert config.run.noise_multiplier == 2.0 and isinstance(config.run.noise_multiplier, float)  # int accepted for float
    assert config.run.max_len == RunConfig.max_len  # a key left out keeps RunConfig's default
    assert config.federation == FederationConfig(num_supernodes=10, client_cpus=2)
    assert config.federation.flower_args() == "num-supernodes=10 client-resources-num-cpus=2"
    bare = resolve_config(write(tmp_path, "", "empty.toml"))
    assert bare.run == RunConfig() and bare.federation == FederationConfig()


def test_relative_data_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    path = write(tmp_path / "configs", '[run]\ndataset = "ml-100k"\ndata-path = "../data/u.data"\n')
    config = resolve_config(path, cwd=Path("/somewhere/else"))
    assert config.run.data_path == str((tmp_path / "data" / "u.data").resolve())
    # ...and one given with --set is relative to the current directory.
    config = resolve_config(path, ["data-path=mine/u.data"], cwd=tmp_path)
    assert config.run.data_path == str((tmp_path / "mine" / "u.data").resolve())
    config = resolve_config(path, ["data-path=/abs/u.data"])
    assert config.run.data_path == "/abs/u.data"


def test_set_values_are_toml_literals_or_plain_strings() -> None:
    parsed = parse_overrides([
        "noise-multiplier=0.5", "seed=3", "dataset=ml-100k", 'strategy="fedadam"', "delta=1e-6",
        "num-supernodes=8", "data-path=2024.csv",
    ])
    assert parsed == {
        "noise-multiplier": 0.5, "seed": 3, "dataset": "ml-100k", "strategy": "fedadam", "delta": 1e-6,
        "num-supernodes": 8, "data-path": "2024.csv",  # a str field keeps its text even when it looks like a number
    }


def test_set_overrides_file_and_federation(tmp_path: Path) -> None:
    path = write(tmp_path, '[run]\nnoise-multiplier = 1.0\n[federation]\nnum-supernodes = 10\n')
    config = resolve_config(path, ["noise-multiplier=0.5", "num-supernodes=4", "client-cpus=2", "strategy=fedyogi"])
    assert config.run.noise_multiplier == 0.5 and config.run.strategy == "fedyogi"
    assert config.federation == FederationConfig(num_supernodes=4, client_cpus=2)
    assert config.overrides == ("noise-multiplier=0.5", "num-supernodes=4", "client-cpus=2", "strategy=fedyogi")


@pytest.mark.parametrize(
    ("text", "sets", "message"),
    [
        ("[run]\nnoise-multiplyer = 1.0\n", [], "noise-multiplyer"),
        ("[run]\nseed = 1.5\n", [], "'seed' must be int"),
        ("[run]\nclients-per-round = 0\n", [], "clients-per-round must be at least 1"),
        ("[run]\nstrategy = 'fedsgd'\n", [], "strategy must be one of"),
        ("[run]\ndataset = 'ml-1m'\n", [], "needs a path"),
        ("[run]\nrun-dir = '/tmp/x'\n", [], "run-dir is set by the runner"),
        ("[runs]\nseed = 1\n", [], "unknown tables or keys ['runs']"),
        ("[federation]\nnum-clients = 3\n", [], "unknown [federation] keys ['num-clients']"),
        ("[federation]\nnum-supernodes = 0\n", [], "num-supernodes must be an integer >= 1"),
        ("[federation]\nclient-cpus = 0.5\n", [], "client-cpus must be an integer >= 1"),
        ("[run]\n[run.model]\ndim = 3\n", [], "sub-tables ['model']"),
        ("[run\n", [], "not valid TOML"),
        ("", ["seed=abc"], "--set seed=abc: not a valid int"),
        ("", ["noise-multiplier"], "expected key=value"),
        ("", ["noise_multiplier=0.5"], "noise_multiplier"),
        ("", ["dim=7", "num-heads=2"], "num_heads"),
        ("", ["num-supernodes=many"], "--set num-supernodes=many: not a valid int"),
    ],
)
def test_invalid_configs_name_the_key(tmp_path: Path, text: str, sets: list[str], message: str) -> None:
    with pytest.raises(SimulationConfigError) as info:
        resolve_config(write(tmp_path, text), sets)
    assert message in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(SimulationConfigError, match="no such config file"):
        resolve_config(tmp_path / "nope.toml")


def test_cli_reports_config_errors_with_exit_code_2(tmp_path: Path) -> None:
    path = write(tmp_path, "[run]\nnoise-multiplier = -1.0\n")
    result = runner.invoke(app, ["simulate", str(path), "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    assert "noise-multiplier must be >= 0" in result.output
    result = runner.invoke(app, ["simulate", str(path), "--set", "noise-multiplier=0.5", "--set", "bogus=1", "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "bogus" in result.output
    assert not (tmp_path / "runs").exists()  # nothing written for a config that cannot run


def test_cli_help_lists_simulate() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "simulate" in result.output
    result = runner.invoke(app, ["simulate", "--help"])
    assert result.exit_code == 0
    for option in ("--set", "--out", "--json", "--timeout-minutes"):
        assert option in result.output


@pytest.mark.parametrize("name", ["synthetic", "ml-100k", "ml-1m"])
def test_shipped_configs_resolve(name: str) -> None:
    config = resolve_config(CONFIGS / f"{name}.toml")
    assert config.run.dataset == name
    assert config.federation.num_supernodes is None  # one device per user
    if name != "synthetic":
        expected = {"ml-100k": "shared/data/ml-100k/u.data", "ml-1m": "shared/data/ml-1m/ratings_u1-2999.dat"}[name]
        assert config.run.data_path.endswith(expected)
        # The repository's sibling shared/ directory, wherever the checkout is.
        assert Path(config.run.data_path) == (CONFIGS.parents[2] / expected).resolve()


def test_the_app_declares_every_run_config_key(tmp_path: Path) -> None:
    check_project(project_dir())  # flwr rejects --run-config keys pyproject does not declare
    (tmp_path / "pyproject.toml").write_text(
        '[tool.flwr.app.components]\nserverapp = "a:app"\nclientapp = "b:app"\n[tool.flwr.app.config]\ndataset = "synthetic"\n'
    )
    with pytest.raises(SimulationConfigError, match="lacks run-config keys"):
        check_project(tmp_path)


def test_prepare_run_writes_the_resolved_config(tmp_path: Path) -> None:
    path = write(tmp_path, "[run]\nsynthetic-users = 7\nsynthetic-items = 200\nnoise-multiplier = 0.7\n")
    config = resolve_config(path, ["seed=5"])
    prepared = prepare_run(config, tmp_path / "runs", argv=[str(path), "--set", "seed=5"])
    run_dir = prepared.run_dir
    assert run_dir.parent == (tmp_path / "runs").resolve() and run_dir.name.startswith("simulate-exp-")
    assert prepared.flwr_home == run_dir / "flwr-home" and prepared.flwr_home.is_dir()
    assert prepared.config.run.run_dir == str(run_dir)
    assert prepared.config.federation.num_supernodes == 7  # one virtual device per user of the split
    resolved = json.loads((run_dir / "config.resolved.json").read_text())
    assert resolved["run"]["seed"] == 5 and resolved["run"]["run-dir"] == str(run_dir)
    assert resolved["federation"] == {"num-supernodes": 7, "client-cpus": 1}
    assert resolved["dataset"]["users"] == 7 and resolved["overrides"] == ["seed=5"]
    assert "commit" in resolved and resolved["flwr"]
    # The TOML twin runs again as it is (run-dir is commented out) and gives the same config.
    again = resolve_config(run_dir / "config.resolved.toml")
    assert again.run == RunConfig.from_flower({**prepared.config.run.to_flower(), "run-dir": ""})
    assert again.federation == prepared.config.federation


def test_the_ray_cluster_a_run_is_sent_to_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Flower's ray.init() takes its cluster from RAY_ADDRESS (docs/simulations.md, "On a Ray cluster").
    config = resolve_config(write(tmp_path, "[run]\nsynthetic-users = 7\nsynthetic-items = 200\n"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    alone = json.loads((prepare_run(config, tmp_path / "a").run_dir / "config.resolved.json").read_text())
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6390")
    attached = json.loads((prepare_run(config, tmp_path / "b").run_dir / "config.resolved.json").read_text())
    assert alone["ray_address"] is None and attached["ray_address"] == "127.0.0.1:6390"


def test_too_many_supernodes_for_the_synthetic_users(tmp_path: Path) -> None:
    config = resolve_config(write(tmp_path, "[run]\nsynthetic-users = 5\n[federation]\nnum-supernodes = 6\n"))
    with pytest.raises(SimulationConfigError, match="exceeds the 5 synthetic users"):
        prepare_run(config, tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_flower_connection_file_is_what_flwr_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.cli.flower_config import read_superlink_connection

    write_flower_config(tmp_path, 45678)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    connection = read_superlink_connection()
    assert connection.address == "127.0.0.1:45678" and connection.insecure
    env = flower_env(tmp_path)
    assert env["FLWR_HOME"] == str(tmp_path)
    for key, value in OFFLINE_ENV.items():
        assert env[key] == value


def test_run_config_file_round_trips_through_flwr(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    run = RunConfig(dataset="ml-100k", data_path='/data/odd "name"/u.data', delta=1e-6, run_dir=str(tmp_path))
    path = tmp_path / "run-config.toml"
    path.write_text(flat_toml(run.to_flower()))
    assert RunConfig.from_flower(parse_config_args([str(path)])) == run


def test_metrics_follower_reads_only_complete_rows(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    follower = MetricsFollower(tmp_path)
    assert follower.poll() == []
    path.write_text('{"round": 1, "epsilon_max": 1.5}\n{"round": 2, "eps')
    rows = follower.poll()
    assert [r.round for r in rows] == [1] and rows[0].number("epsilon_max") == 1.5
    with open(path, "a") as handle:
        handle.write('ilon_max": Infinity, "ndcg@10": null}\n')
    (row,) = follower.poll()
    assert row.round == 2 and math.isinf(row.number("epsilon_max")) and row.number("ndcg@10") is None


def _fake_run(tmp_path: Path, private: bool = True) -> tuple[SimulationConfig, list[RoundRow], FinalReport]:
    config = resolve_config(write(tmp_path, f"[run]\nnoise-multiplier = {1.0 if private else 0.0}\nepsilon-budget = 4.0\n[federation]\nnum-supernodes = 3\n"))
    rows = [
        RoundRow(1, {"round": 1, "sampled": 3, "answered": 3, "refused": 0, "train_loss": 5.0, "epsilon_max": 1.0, "epsilon_mean": 0.8, "ndcg@10": None}),
        RoundRow(2, {"round": 2, "sampled": 3, "answered": 3, "refused": 1, "train_loss": 4.0, "epsilon_max": 2.0, "epsilon_mean": 1.5, "ndcg@10": 0.1}),
    ]
    final = {
        "valid": {"hr@10": 0.2, "ndcg@10": 0.1}, "test": {"hr@10": 0.25, "ndcg@10": 0.12, "mrr": 0.05},
        "wall_seconds": 12.5, "counts": {"refused": 1},
        "privacy": {"device_epsilon_max": 2.0, "device_epsilon_mean": 1.4, "devices_reporting": 3, "dp": True},
    }
    return config, rows, FinalReport(final)


def test_privacy_report_and_plots(tmp_path: Path) -> None:
    config, rows, final = _fake_run(tmp_path)
    report = privacy_report(config, rows, final, {"partition-0": (2.0, 2), "partition-1": (1.0, 1), "partition-2": (0.0, 0)})
    assert report["device_epsilon"]["max"] == 2.0 and report["device_epsilon"]["mean"] == 1.4
    assert report["delta"] == 1e-5 and report["epsilon_budget"] == 4.0 and "RDP" in report["accountant"]
    assert "training example" in report["unit_of_protection"]
    assert report["refusals"]["device_rounds"] == 1 and report["refusals"]["rounds_with_refusals"] == 1
    assert report["ledgers"]["devices_trained"] == 2 and report["ledgers"]["epsilon_mean"] == 1.5
    assert [r["epsilon_max"] for r in report["per_round"]] == [1.0, 2.0]
    json.dumps(report, allow_nan=False)  # strict JSON
    markdown = privacy_markdown(report)
    assert "| 3 | 3 | 2 | 1.4 | 1 | 1 |" in markdown and "delta" in markdown

    from fedinterest.common.run_plots import plot_epsilon, plot_ndcg

    for path in (plot_ndcg(rows, tmp_path / "ndcg.png", final_test=0.12), plot_epsilon(rows, tmp_path / "eps.png", budget=4.0)):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Nothing measured still gives a (labelled) plot.
    assert plot_ndcg([], tmp_path / "empty.png").is_file()

    summary = summarize_run(config, rows, final, report, wall_seconds=20.0)
    assert summary["test"]["ndcg@10"] == 0.12 and summary["rounds"] == 2 and summary["refused_device_rounds"] == 1


def test_privacy_report_without_dp(tmp_path: Path) -> None:
    config, rows, final = _fake_run(tmp_path, private=False)
    report = privacy_report(config, rows, FinalReport({**final.raw, "privacy": {"dp": False}}))
    assert report["dp"] is False and report["device_epsilon"]["max"] == "inf" and report["accountant"] is None
    assert "DP-SGD is off" in privacy_markdown(report)
    json.dumps(report, allow_nan=False)


def test_resolved_toml_values() -> None:
    assert tomllib.loads("v = " + toml_value(1e-5))["v"] == 1e-5
    assert tomllib.loads("v = " + toml_value("a\\b\"c"))["v"] == "a\\b\"c"
    assert toml_value(True) == "true" and toml_value(3) == "3"


def test_a_run_without_any_aggregated_update_fails(tmp_path: Path) -> None:
    (tmp_path / "flwr.log").write_text(
        "\x1b[91mERROR \x1b[0m: boom\nTraceback (most recent call last):\n  File x\n"
        "OverflowError: Python int too large to convert to SQLite INTEGER\n"
        "ray.exceptions.RayTaskError(ClientAppException): wrapped\n"
        "flwr.clientapp.client_app.ClientAppException: \n"
    )
    assert last_exception(tmp_path / "flwr.log") == "OverflowError: Python int too large to convert to SQLite INTEGER"
    with pytest.raises(SimulationFailed, match="no device update was aggregated in 2 rounds: 8 replies failed.*OverflowError"):
        check_updates(tmp_path, FinalReport({"rounds": 2, "counts": {"aggregated": 0, "failed": 8, "rejected": 0}}))
    check_updates(tmp_path, FinalReport({"rounds": 2, "counts": {"aggregated": 3, "failed": 1}}))  # some updates: a warning, not a failure
    check_updates(tmp_path, FinalReport({"rounds": 2, "counts": {"aggregated": 0, "refused": 8}}))  # budgets spent: a normal outcome


@pytest.mark.parametrize("name", ["demo", "sports", "toys", "sports-private", "toys-private", "ml-100k-private", "ml-1m-private"])
def test_shipped_shard_configs_resolve_to_user_level_or_fedsgd_runs(name: str) -> None:
    config = resolve_config(CONFIGS / f"{name}.toml")
    run = config.run
    assert run.users_per_node > 1 and run.strategy == "fedadam" and run.local_optimizer == "sgd"
    if name.endswith("-private"):  # issue 12's recipe, calibrated to epsilon 8
        assert run.user_target_epsilon == 8.0 and run.noise_multiplier == 0.0
    if name in ("sports-private", "toys-private"):  # attribute vectors from the public catalogue
        assert run.item_vectors == "attributes" and Path(run.item_attributes).is_file()
    if name.startswith("ml-"):  # MovieLens: fewer noised parameters (a tied item table, dim 32)
        assert run.tie_item_vectors and run.dim == 32
    if name == "demo":  # the README's main command: user-level private, calibrated to epsilon 8
        assert run.user_private and run.user_target_epsilon == 8.0 and run.noise_multiplier == 0.0
        assert (run.synthetic_users, run.users_per_node) == (10_000, 5_000)
