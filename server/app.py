"""The fedinterest ServerApp: parse the run config once, then run the round loop."""

from __future__ import annotations

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fedinterest.common.run_config import RunConfig
from fedinterest.server import simulation_dispatch
from fedinterest.server.rounds import run

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Train the global model over the federation (server/rounds.py) and write the run directory."""
    # The server shares the machine with the simulated devices: one thread for evaluation.
    torch.set_num_threads(1)
    if isinstance(grid, InMemoryGrid):
        # Simulation: this process also holds the SuperLink's in-memory state, whose
        # per-node message lookup is the engine's bottleneck (server/simulation_dispatch.py).
        simulation_dispatch.install()
    run(grid, RunConfig.from_flower(context.run_config))
