"""One base error class and one exit-code rule for every CLI (issue 15; common/errors.py).

Every error class the packages define derives from FedinterestError (a new one without it
fails here), and every command line ends by the same rule: 2 for a usage or user-fixable
error found before any job ran, 1 for a job that ran and failed, 0 on success.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from fedinterest.common.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    FedinterestError,
    JobFailed,
    UsageError,
    exit_code,
    run_command,
)

PACKAGES = ("fedinterest.common", "fedinterest.client", "fedinterest.server", "fedinterest.simulations")
runner = CliRunner()


def _error_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined in a module of the packages, by qualified name."""
    found: dict[str, type[BaseException]] = {}
    for package in PACKAGES:
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
            module = importlib.import_module(info.name)
            for name, obj in inspect.getmembers(module, inspect.isclass):
                if obj.__module__ == module.__name__ and issubclass(obj, BaseException):
                    found[f"{module.__name__}.{name}"] = obj
    return found


def test_every_error_class_derives_from_fedinterest_error() -> None:
    classes = _error_classes()
    assert len(classes) >= 25, sorted(classes)  # the walk found the modules (not an empty package list)
    strays = sorted(name for name, cls in classes.items() if not issubclass(cls, FedinterestError))
    assert strays == [], f"derive these from fedinterest.common.errors.FedinterestError: {strays}"


@pytest.mark.parametrize(
    ("qualified", "builtin"),
    [
        ("fedinterest.common.interactions.DataFormatError", ValueError),
        ("fedinterest.common.bundle.BundleError", ValueError),
        ("fedinterest.client.device_store.StoreError", ValueError),
        ("fedinterest.client.device_session.AlreadyRunning", RuntimeError),
        ("fedinterest.client.local_models.NoModelError", LookupError),
        ("fedinterest.server.checkpoint.CheckpointError", RuntimeError),
        ("fedinterest.server.run_admin.RunError", ValueError),
        ("fedinterest.server.catalogue_build.CatalogueExistsError", FileExistsError),
        ("fedinterest.simulations.simulation_config.SimulationConfigError", ValueError),
        ("fedinterest.simulations.flower_run.SimulationFailed", RuntimeError),
    ],
)
def test_error_classes_keep_their_builtin_base(qualified: str, builtin: type[BaseException]) -> None:
    module, name = qualified.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, FedinterestError) and issubclass(cls, builtin)  # `except ValueError` sites still catch it


def test_the_rule() -> None:
    from fedinterest.simulations.flower_run import SimulationFailed
    from fedinterest.simulations.simulation_config import SimulationConfigError

    assert (EXIT_OK, EXIT_FAILED, EXIT_USAGE) == (0, 1, 2)
    assert exit_code(UsageError("x")) == exit_code(SimulationConfigError("x")) == 2
    assert exit_code(SimulationFailed("x", Path("."))) == exit_code(JobFailed("x")) == 1
    shown: list[str] = []

    def fail(err: BaseException):
        def command() -> None:
            raise err
        return command

    assert run_command(lambda: None, echo=shown.append) == 0 and shown == []
    assert run_command(fail(UsageError("bad --x")), echo=shown.append) == 2 and shown == ["error: bad --x"]
    assert run_command(fail(JobFailed("the run failed")), echo=shown.append) == 1 and shown[-1] == "error: the run failed"
    assert run_command(fail(OSError("unreadable")), (OSError,), echo=shown.append) == 2
    with pytest.raises(KeyError):  # anything else is a bug: its traceback is not hidden
        run_command(fail(KeyError("k")), (OSError,), echo=shown.append)


# ----------------------------------------------------------------- `fedinterest simulate`


def test_simulate_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedinterest.simulations import simulate_cli
    from fedinterest.simulations.cli import app
    from fedinterest.simulations.flower_run import SimulationFailed

    usage = runner.invoke(app, ["simulate"])  # neither CONFIG nor --resume: nothing runs
    assert usage.exit_code == 2 and "error: give either CONFIG" in usage.stderr

    def failed_run(*_args, **_kwargs):
        raise SimulationFailed("the Flower run ended finished:failed", tmp_path / "run", log_tail="ServerApp raised")

    monkeypatch.setattr(simulate_cli, "resolve_config", lambda *_: SimpleNamespace(run=SimpleNamespace(num_server_rounds=1)))
    monkeypatch.setattr(simulate_cli, "run_simulation", failed_run)
    ran = runner.invoke(app, ["simulate", str(tmp_path / "any.toml"), "--json"])
    assert ran.exit_code == 1, ran.output
    assert ran.stderr.rstrip().endswith("error: the Flower run ended finished:failed")
    assert "ServerApp raised" in ran.stderr and f"run dir: {tmp_path / 'run'}" in ran.stderr
    assert json.loads(ran.stdout) == {"success": False, "reason": "the Flower run ended finished:failed", "run_dir": str(tmp_path / "run")}


def test_centralized_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedinterest.simulations import centralized_cli, centralized_export
    from fedinterest.simulations.cli import app

    usage = runner.invoke(app, ["centralized", "--dataset", "ml-100k", "--data", str(tmp_path / "missing.data"), "--out", str(tmp_path)])
    assert usage.exit_code == 2 and "error: " in usage.stderr and "missing.data" in usage.stderr

    # The training ran; the bundle asked for could not be written: the job failed (exit 1).
    class Split:
        dataset = SimpleNamespace(item_ids=("a", "b"), reports=[])
        users_left_out = 0

        def __len__(self) -> int:
            return 2

    def trained(*_args, on_data, **_kwargs):
        on_data(Split())
        return tmp_path / "run", {"test": {}}

    def refused(*_args):
        raise OSError("no space left on device")

    monkeypatch.setattr(centralized_cli, "run_centralized", trained)
    monkeypatch.setattr(centralized_export, "export_centralized", refused)
    ran = runner.invoke(app, ["centralized", "--out", str(tmp_path), "--export-bundle", str(tmp_path / "m.bundle")])
    assert ran.exit_code == 1, ran.output
    assert f"error: the run finished in {tmp_path / 'run'}, but its bundle was not written: no space left on device" in ran.stderr


# ------------------------------------------------------------------- `fedinterest server`


def test_server_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedinterest.server import operator_cli, run_admin
    from fedinterest.simulations.cli import app

    usage = runner.invoke(app, ["server", "status", "--dir", str(tmp_path / "nowhere")])
    assert usage.exit_code == 2 and "error: " in usage.stderr and "not a deployment directory" in usage.stderr
    assert runner.invoke(app, ["server", "status", "--no-such-option"]).exit_code == 2  # click's usage error: the same code

    # `run --wait`: the run was submitted and ran, but did not complete.
    submitted = SimpleNamespace(run_id=7, run_dir=tmp_path / "run-1")
    state = {"run_id": "7", "run": "run-1", "completed": False, "finished": True, "status": "finished:completed",
             "outcome_why": "no device's update was aggregated"}
    monkeypatch.setattr(operator_cli, "_deployment", lambda _: SimpleNamespace())
    monkeypatch.setattr(run_admin, "check_run", lambda *_: (None, ()))
    monkeypatch.setattr(run_admin, "submit_run", lambda *_: submitted)
    monkeypatch.setattr(run_admin, "wait_finished", lambda *_, **__: state)
    ran = runner.invoke(app, ["server", "run", "--wait", "--json"])
    assert ran.exit_code == 1, ran.output
    assert "error: run 7 (run-1) did not complete: no device's update was aggregated" in ran.stderr
    assert json.loads(ran.stdout)["state"] == state  # --json: stdout stays one JSON document
    monkeypatch.setattr(run_admin, "wait_finished", lambda *_, **__: {**state, "completed": True})
    assert runner.invoke(app, ["server", "run", "--wait", "--json"]).exit_code == 0


# ------------------------------------------------- `fedinterest device` and `fedinterest-device`


def test_device_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedinterest.client import device_lifecycle
    from fedinterest.client.device_cli import app as device_app
    from fedinterest.simulations.cli import app

    for invoked in (runner.invoke(device_app, ["status", "--dir", str(tmp_path / "nowhere")]),
                    runner.invoke(app, ["device", "status", "--dir", str(tmp_path / "nowhere")])):
        assert invoked.exit_code == 2 and "error: " in invoked.stderr and "no device directory here" in invoked.stderr
    catalogue = tmp_path / "catalogue.txt"
    catalogue.write_text("a\nb\n")
    bad_policy = runner.invoke(device_app, ["init", str(tmp_path / "dev"), "--catalogue", str(catalogue), "--max-epsilon", "-1"])
    assert bad_policy.exit_code == 2 and "error: " in bad_policy.stderr  # a builtin ValueError of the policy: the user's to fix

    # No device command runs a job that can fail today; the group applies the rule to one that would.
    assert runner.invoke(device_app, ["init", str(tmp_path / "dev"), "--catalogue", str(catalogue)]).exit_code == 0

    def job_failed(_device):
        raise JobFailed("the job ran and failed")

    monkeypatch.setattr(device_lifecycle, "device_status", job_failed)
    ran = runner.invoke(device_app, ["status", "--dir", str(tmp_path / "dev")])
    assert ran.exit_code == 1 and "error: the job ran and failed" in ran.stderr


def test_console_scripts_exit_by_the_rule(tmp_path: Path) -> None:
    """Through the installed entry points (sys.exit), not only typer's CliRunner."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    for command in ([str(bin_dir / "fedinterest-device"), "budget"], [str(bin_dir / "fedinterest"), "server", "devices"]):
        result = subprocess.run([*command, "--dir", str(tmp_path / "nowhere")], capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 2, (command, result.stderr[-2000:])
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
