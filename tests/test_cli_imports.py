"""The quick commands import neither torch, Opacus nor Flower (issue 16, item 8).

Each runs in a fresh interpreter, as a person's shell runs it; what it imported is read
from `sys.modules` at exit. The timings themselves are in benchmarks/cli_latency.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedinterest.simulations.cli import LAZY_COMMANDS, app

HEAVY = ("torch", "opacus", "flwr", "onnxruntime", "matplotlib", "pyarrow")
SCRIPT = """
import atexit, json, sys
atexit.register(lambda: print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r})), file=sys.__stderr__))
from fedinterest.simulations.cli import app
sys.argv = ['fedinterest', *json.loads(sys.argv[1])]
app()
"""


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("quick")
    catalogue = root / "c.txt"
    catalogue.write_text("".join(f"{i}\n" for i in range(1, 21)))
    runner = CliRunner()
    assert runner.invoke(app, ["server", "init", str(root / "s"), "--catalogue", str(catalogue), "--port", "1"]).exit_code == 0
    assert runner.invoke(app, ["device", "init", str(root / "d"), "--catalogue", str(catalogue)]).exit_code == 0
    return root / "s", root / "d"


@pytest.mark.parametrize("args", [["--help"], ["server", "devices", "--dir", "{s}"], ["server", "status", "--dir", "{s}"],
                                  ["device", "budget", "--dir", "{d}"], ["device", "policy", "--dir", "{d}"], ["device", "status", "--dir", "{d}"]])
def test_quick_commands_import_nothing_heavy(dirs: tuple[Path, Path], args: list[str]) -> None:
    filled = [a.format(s=dirs[0], d=dirs[1]) for a in args]
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(heavy=set(HEAVY)), json.dumps(filled)], capture_output=True, text=True, timeout=120)
    imported = json.loads(done.stderr.strip().splitlines()[-1])
    assert imported == [], f"fedinterest {' '.join(args)} imported {imported[:8]}"


def test_lazy_commands_list_the_help_they_have() -> None:
    """The one-line help `fedinterest --help` shows without importing a command is the command's own."""
    import importlib

    import typer

    for name, (module, attribute, short) in LAZY_COMMANDS.items():
        target = getattr(importlib.import_module(module), attribute)
        text = target.info.help if isinstance(target, typer.Typer) else target.__doc__
        assert " ".join(text.split()).startswith(short.rstrip(".")), (name, short, text)
