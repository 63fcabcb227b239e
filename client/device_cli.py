"""`fedinterest device ...`: the commands a user's device runs (never imports the server side)."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Run fedinterest on a device: local store, federation client, local ranking.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
