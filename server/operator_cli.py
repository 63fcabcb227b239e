"""`fedinterest server ...`: the operator's commands for a deployed federation."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Operate a deployed federation: deployment directory, SuperLink, devices, runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
