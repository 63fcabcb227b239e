"""The `fedinterest` command: one sub-command or group per module."""

from __future__ import annotations

import typer

from fedinterest.client.device_cli import app as device_app
from fedinterest.server.operator_cli import app as server_app
from fedinterest.simulations.centralized_cli import centralized
from fedinterest.simulations.simulate_cli import simulate

app = typer.Typer(
    help="fedinterest: federated, differentially private modelling of users' long-term interests.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(centralized)
app.command("simulate")(simulate)
app.add_typer(server_app, name="server")
app.add_typer(device_app, name="device")


@app.callback()
def _root() -> None:
    """fedinterest: federated, differentially private modelling of users' long-term interests."""


def main() -> None:
    """Console-script entry point."""
    app()
