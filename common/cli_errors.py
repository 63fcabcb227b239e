"""The exit-code rule of common/errors.py around every command of a typer app.

`fedinterest` (simulations/cli.py), `fedinterest server` (server/operator_cli.py) and
`fedinterest device` / `fedinterest-device` (client/device_cli.py) build their typer apps
with a `ReportingGroup` class: a FedinterestError out of any of their commands is printed
as one `error: <message>` line on stderr and ends the command with exit code 2, or 1 for
a job that ran and failed (`JobFailed`). Click's own usage errors exit 2 as well.
"""

from __future__ import annotations

from typing import Any

import click
import typer
from typer.core import TyperGroup

from fedinterest.common.errors import run_command


class ReportingGroup(TyperGroup):
    """A typer group whose commands end by the rule of common/errors.py, never with a traceback of a product error."""

    # Builtin exceptions this command line treats as the user's to fix too (exit 2): a file
    # a command was pointed at is missing (the device commands add ValueError and OSError).
    user_errors: tuple[type[BaseException], ...] = (FileNotFoundError,)

    def invoke(self, ctx: click.Context) -> Any:
        result: list[Any] = []
        code = run_command(
            lambda: result.append(super(ReportingGroup, self).invoke(ctx)),
            self.user_errors,
            echo=lambda line: typer.echo(line, err=True),
        )
        if code:
            raise typer.Exit(code)
        return result[0] if result else None
