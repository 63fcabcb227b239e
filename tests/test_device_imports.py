"""The device package stands alone: every client/ and common/ module imports with server/ and simulations/ blocked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import importlib, importlib.abc, pkgutil, sys

BLOCKED = ("fedinterest.server", "fedinterest.simulations")

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"the device side imported {name}")
        return None

sys.meta_path.insert(0, Block())
imported = []
for package in ("fedinterest.common", "fedinterest.client"):
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__):
        importlib.import_module(f"{package}.{info.name}")
        imported.append(f"{package}.{info.name}")
from typer.testing import CliRunner
from fedinterest.client.device_cli import app
for command in ([], ["init"], ["ingest"], ["start"], ["recommend"], ["budget"], ["policy"], ["serve"], ["install-bundle"]):
    assert CliRunner().invoke(app, [*command, "--help"]).exit_code == 0, command
leaked = [name for name in sys.modules if name.startswith(BLOCKED)]
assert not leaked, leaked
print(len(imported))
"""


def test_client_and_common_never_import_server_or_simulations() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = len(list((REPO / "client").glob("*.py"))) + len(list((REPO / "common").glob("*.py"))) - 2  # minus the __init__s
    assert int(result.stdout.split()[-1]) == expected


def test_the_blocker_does_block() -> None:
    script = SCRIPT.replace('("fedinterest.common", "fedinterest.client")', '("fedinterest.server",)')
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode != 0 and "the device side imported fedinterest.server" in result.stderr
