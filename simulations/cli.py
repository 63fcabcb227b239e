"""The `fedinterest` command: one sub-command or group per module.

`simulate` and `centralized` import torch, Flower's simulation engine and the data code;
every command module is loaded only when one of its commands runs or shows its own help,
so that `--help` and the operator's and device's quick commands answer in a fraction of a
second (issue 16; benchmarks/cli_latency.py).

Every command ends by one rule (common/errors.py): 0 done, 2 a usage or user-fixable error
(nothing ran), 1 a job that ran and failed; the groups of common/cli_errors.py apply it.
"""

from __future__ import annotations

import importlib
from typing import Any

import click
import typer

from fedinterest.common.cli_errors import ReportingGroup

# name -> (module, a command function or a typer app of a group, the one-line help of
# `fedinterest --help`: the start of the command's own help; tests/test_cli_imports.py checks it)
LAZY_COMMANDS = {
    "centralized": ("fedinterest.simulations.centralized_cli", "centralized", "Train the model on all users' training data (no federation, no DP)."),
    "device": ("fedinterest.client.device_cli", "app", "Run fedinterest on a device: local store, federation client, local ranking."),
    "server": ("fedinterest.server.operator_cli", "app", "Operate a deployed federation: deployment directory, SuperLink, devices, runs."),
    "simulate": ("fedinterest.simulations.simulate_cli", "simulate", "Run the ServerApp and ClientApps in Flower's simulation engine (one virtual device per user)."),
}


class _LazyGroup(ReportingGroup):
    """A typer group whose heavy commands are imported on first use, not to list them."""

    _listing = False

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self._listing = True  # the command list needs names and one-line help only
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in LAZY_COMMANDS or cmd_name in self.commands:
            return super().get_command(ctx, cmd_name)
        module, function, short = LAZY_COMMANDS[cmd_name]
        if self._listing:
            return click.Command(cmd_name, help=short, short_help=short)
        target = getattr(importlib.import_module(module), function)
        if isinstance(target, typer.Typer):
            command: Any = typer.main.get_command(target)  # a command group
        else:
            single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
            single.command(cmd_name)(target)
            command = typer.main.get_command(single)
        self.add_command(command, cmd_name)
        return command


app = typer.Typer(
    cls=_LazyGroup,
    help="fedinterest: federated, differentially private modelling of users' long-term interests.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """fedinterest: federated, differentially private modelling of users' long-term interests."""


def main() -> None:
    """Console-script entry point."""
    app()
