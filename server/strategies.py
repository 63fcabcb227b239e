"""Flower's own strategies, built from the RunConfig, and their state for checkpoints.

| strategy | Flower class | settings from RunConfig                                   |
|----------|--------------|-----------------------------------------------------------|
| fedavg   | FedAvg       | --                                                        |
| fedadam  | FedAdam      | eta = server_lr, tau = server_tau, eta_l = local_lr (eta_l is informational); with server_noise_correction > 0 NoiseAwareFedAdam (DP-AdamBC) |
| fedyogi  | FedYogi      | eta = server_lr, tau = server_tau, eta_l = local_lr       |
| fedprox  | FedProx      | proximal_mu, sent in the train config under PROXIMAL_MU    |
| fedavgm  | FedAvgM      | server_momentum, server_learning_rate = server_lr          |
| fedmedian | FedMedian   | -- (coordinate-wise median of the valid replies)           |
| fedtrimmedavg | FedTrimmedAvg | beta = trim_beta (cut from each tail, coordinate-wise) |
| krum     | Krum         | num_malicious_nodes (keeps the one reply closest to the rest) |

FedAvg and its optimizer variants weight updates by NUM_EXAMPLES; the robust three
(FedMedian, FedTrimmedAvg, Krum) ignore the weights, which is what makes them robust:
a device cannot buy influence by claiming many examples. All read/write the wire's
record keys. Sampling:
each round takes exactly min(clients_per_round, nodes registered) devices
(`fit_sampling`, called by the round loop before every round because the number of
registered nodes can change in a deployment); `train_messages` has the strategy write
its train messages for exactly the nodes holding the round's sampled users. A wrapper
(Flower's DP wrappers, server/user_dp_strategy.py) keeps the strategy it wraps as
`.strategy`: that one samples and holds the optimizer state (`base_strategy`).

State that must survive a restart for an exact resume (`strategy_state`):
- FedAdam / FedYogi (FedOpt): the moment estimates `m_t` and `v_t` (dicts by array
  key). `current_arrays` is set again by `configure_train` from the resumed global
  model, which is what it held.
- FedAvgM: `momentum_vector` (a list in the global model's key order; the reply checks
  hand the strategy arrays in that order). `current_arrays` is left None on resume, so
  `configure_train` sets it from the resumed global model, which is what it held.
- FedAvg / FedProx / FedMedian / FedTrimmedAvg / Krum: none.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum, Strategy

from fedinterest.common import wire
from fedinterest.common.run_config import RunConfig
from fedinterest.common.wire import ARRAYS, CONFIG, NUM_EXAMPLES
from fedinterest.server.noise_aware_adam import NoiseAwareFedAdam

# The train-config key under which Flower's FedProx sends mu to the device (set by
# FedProx.configure_train itself); the device then pulls its weights towards the global ones.
PROXIMAL_MU = wire.PROXIMAL_MU

_MOMENTS = ("m_t", "v_t")
_MOMENTUM = "momentum"


def build_strategy(config: RunConfig, num_nodes: int) -> FedAvg:
    """The strategy named by `config.strategy`, sampling for `num_nodes` registered nodes."""
    common: dict[str, Any] = dict(weighted_by_key=NUM_EXAMPLES, arrayrecord_key=ARRAYS, configrecord_key=CONFIG)
    # server-lr = 0 keeps each strategy's own Flower default (FedAdam 0.1, FedYogi 0.01, FedAvgM 1.0).
    server_lr: dict[str, Any] = {"eta": config.server_lr} if config.server_lr > 0 else {}
    # server-tau = 0 keeps Flower's tau (1e-3 for both).
    server_lr |= {"tau": config.server_tau} if config.server_tau > 0 else {}
    name = config.strategy
    if name == "fedavg":
        strategy: FedAvg = FedAvg(**common)
    elif name == "fedadam" and config.server_noise_correction > 0:
        strategy = NoiseAwareFedAdam(**common, **server_lr, eta_l=config.local_lr, noise_floor=config.server_noise_correction)
    elif name == "fedadam":
        strategy = FedAdam(**common, **server_lr, eta_l=config.local_lr)
    elif name == "fedyogi":
        strategy = FedYogi(**common, **server_lr, eta_l=config.local_lr)
    elif name == "fedprox":
        strategy = FedProx(**common, proximal_mu=config.proximal_mu)
    elif name == "fedavgm":
        momentum_lr: dict[str, Any] = {"server_learning_rate": config.server_lr} if config.server_lr > 0 else {}
        strategy = FedAvgM(**common, **momentum_lr, server_momentum=config.server_momentum)
    elif name == "fedmedian":
        strategy = FedMedian(**common)
    elif name == "fedtrimmedavg":
        strategy = FedTrimmedAvg(**common, beta=config.trim_beta)
    elif name == "krum":
        strategy = Krum(**common, num_malicious_nodes=config.num_malicious_nodes)
    else:  # RunConfig already rejects unknown names; this guards a new name without a branch
        raise ValueError(f"no strategy for {name!r}")
    fit_sampling(strategy, num_nodes, config.clients_per_round)
    return strategy


def fit_sampling(strategy: FedAvg, num_nodes: int, clients_per_round: int) -> int:
    """Make `strategy.configure_train` sample min(clients_per_round, num_nodes) nodes; return that size.

    FedAvg samples max(int(nodes * fraction_train), min_train_nodes) and waits until
    min_available_nodes are registered, so all three are set from the same size.
    """
    if num_nodes < 1:
        raise ValueError("no nodes registered: nothing to sample")
    size = min(clients_per_round, num_nodes)
    strategy.fraction_train = size / num_nodes
    strategy.min_train_nodes = size
    strategy.min_available_nodes = size
    return size


def base_strategy(strategy: Strategy) -> FedAvg:
    """The strategy under any wrappers (each keeps the one it wraps as `.strategy`, as Flower's do)."""
    while isinstance(inner := getattr(strategy, "strategy", None), Strategy):
        strategy = inner
    assert isinstance(strategy, FedAvg), f"every strategy of server/strategies.py is a FedAvg, got {type(strategy).__name__}"
    return strategy


def train_messages(
    strategy: Strategy, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid, nodes: list[int],
) -> list[Message]:
    """The strategy's own train messages (its config: server round, FedProx's mu, ...) for exactly `nodes`.

    Server optimizers (FedAdam, ...) keep the arrays given here as the base of their step,
    so the strategy is asked even when the round's messages are then sent another way.
    """
    fit_sampling(base_strategy(strategy), len(nodes), len(nodes))
    return list(strategy.configure_train(server_round, arrays, config, cast(Grid, RoundNodes(grid, nodes))))  # a view of the Grid


class RoundNodes:
    """The run's Grid as the strategy's node sampler sees it: only this round's nodes."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid, self._nodes = grid, list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def strategy_state(strategy: FedAvg) -> dict[str, np.ndarray]:
    """The strategy's optimizer state as flat named arrays (empty when it has none)."""
    state: dict[str, np.ndarray] = {}
    if isinstance(strategy, (FedAdam, FedYogi)):
        for name in _MOMENTS:
            for key, value in (getattr(strategy, name) or {}).items():
                state[f"{name}/{key}"] = np.asarray(value)
    elif isinstance(strategy, FedAvgM) and strategy.momentum_vector is not None:
        for index, value in enumerate(strategy.momentum_vector):
            state[f"{_MOMENTUM}/{index:05d}"] = np.asarray(value)
    return state


def load_strategy_state(strategy: FedAvg, state: dict[str, np.ndarray]) -> None:
    """Put back what `strategy_state` saved; a state that does not fit the strategy is an error."""
    if not state:
        return
    prefixes = {name.split("/", 1)[0] for name in state}
    if isinstance(strategy, (FedAdam, FedYogi)) and prefixes <= set(_MOMENTS):
        for name in _MOMENTS:
            moments = {k.split("/", 1)[1]: v.copy() for k, v in state.items() if k.startswith(f"{name}/")}
            setattr(strategy, name, moments or None)
        return
    if isinstance(strategy, FedAvgM) and prefixes == {_MOMENTUM}:
        strategy.momentum_vector = [state[k].copy() for k in sorted(state)]
        return
    raise ValueError(f"saved strategy state {sorted(prefixes)} does not fit {type(strategy).__name__}")
