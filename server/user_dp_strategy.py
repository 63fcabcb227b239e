"""Layer 2 (user-level DP-FedAvg) as a wrapper around the run's strategy.

As Flower's `DifferentialPrivacyServerSideFixedClipping` wraps a strategy, `UserLevelDP`
wraps the one server/strategies.py builds and keeps it as `.strategy`:

- who trains: `sample_users` draws the round's Poisson sample of users from the
  accountant (server/user_privacy.py), in place of the plain seeded sample of
  server/train_round.py; `configure_train` adds the round's clip norm to the train
  config under adaptive clipping and lets the wrapped strategy write the messages;
- `aggregate_train` clips every valid reply's update, sums, noises and accounts for
  the release (server/user_privacy.py), then hands the released model to the wrapped
  strategy's own `aggregate_train` as its one reply: FedAvg keeps it as it is, a server
  optimizer (FedAdam, NoiseAwareFedAdam, FedAvgM, ...) takes it as its pseudo-gradient
  step -- post-processing, no further privacy cost.

Unlike Flower's wrapper, every sampled round is released and charged whatever the
number of valid replies (skipping one would depend on the users' data), and only the
replies the loop's checks let through (server/reply_checks.py) are aggregated.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from fedinterest.common.wire import ARRAYS, CLIP_NORM, METRICS, NUM_EXAMPLES, NUM_USERS, SERVER_ROUND, UNCLIPPED_USERS
from fedinterest.server.evaluation import arrays_from_numpy, arrays_to_numpy
from fedinterest.server.noise_aware_adam import NoiseAwareFedAdam
from fedinterest.server.reply_checks import CheckedReply
from fedinterest.server.user_privacy import UserLevelAccountant, noised_mean_update

LOG = logging.getLogger("flwr.fedinterest")


class UserLevelDP(Strategy):
    """The wrapped strategy under layer 2: Poisson sampling of users, clipping, noise and the accountant."""

    def __init__(self, strategy: FedAvg, accountant: UserLevelAccountant) -> None:
        super().__init__()
        self.strategy = strategy
        self.accountant = accountant
        # Set by `sample_users`: the round's global model and the users its sample was drawn from (q and E follow).
        self.current_arrays, self.population = ArrayRecord(), 0

    def __repr__(self) -> str:
        return "User-level DP-FedAvg wrapper (Poisson sampling, fixed clipping)"

    def sample_users(self, server_round: int, arrays: ArrayRecord, population: int) -> list[int]:
        """The round's Poisson sample of users 0..population-1 (from the accountant's secret seed).

        Also what the release is taken against: the global model and the population (a
        sample may be empty, and then no train message is configured at all)."""
        self.current_arrays, self.population = arrays, population
        users = self.accountant.sample(population, server_round)
        LOG.info(
            "fedinterest: round %d: Poisson sample of %d of %d users (q %.4f)",
            server_round, len(users), population, self.accountant.sample_rate(population),
        )
        return users

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """The wrapped strategy's train messages; under adaptive clipping the round's clip norm goes with them."""
        if self.accountant.adaptive is not None:
            config = ConfigRecord({**dict(config), CLIP_NORM: self.accountant.clip_norm})
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Release the round's DP-FedAvg model from the valid `replies` (`user_updates`) and
        account for it; the wrapped strategy sees only that model."""
        replies = list(replies)
        accountant, population = self.accountant, self.population
        clip, expected = accountant.clip_norm, accountant.sample_rate(population) * population
        users = [_count(m, NUM_USERS) for m in replies]
        rng = accountant.noise_rng(server_round)
        noised, norms = noised_mean_update(
            arrays_to_numpy(self.current_arrays), [(arrays_to_numpy(m.content.array_records[ARRAYS]), n) for m, n in zip(replies, users)],
            clip_norm=clip, noise_multiplier=accountant.update_noise_multiplier, expected_size=expected, rng=rng,
        )
        if accountant.adaptive is not None:  # the next round's clip norm, from the noised count (server/adaptive_clipping.py)
            unclipped = [_count(m, UNCLIPPED_USERS) for m in replies]
            fraction = accountant.adaptive.step(list(zip(unclipped, users)), expected, rng)
            LOG.info("fedinterest: round %d: noised unclipped fraction %.3f at clip %.4g; next clip %.4g", server_round, fraction, clip, accountant.clip_norm)
        accountant.record_release(population)
        clipped = sum(1 for n in norms if n > clip * (1 + 1e-6))
        # The median norm before clipping is what user-clip-norm should be chosen near (McMahan et al.).
        LOG.info(
            "fedinterest: round %d: DP-FedAvg over %d user update(s) in %d replies, %d replies clipped again to %g (median norm %s); "
            "user-level epsilon %.3f at delta %g",
            server_round, sum(users), len(norms), clipped, clip,
            f"{float(np.median(norms)):.3g}" if norms else "-", accountant.epsilon(), accountant.delta,
        )
        if isinstance(self.strategy, NoiseAwareFedAdam):  # DP-AdamBC: the per-coordinate variance of the released noise
            self.strategy.noise_variance = (accountant.update_noise_multiplier * clip / expected) ** 2
        new_arrays, metrics = self.strategy.aggregate_train(server_round, [released_reply(noised, server_round)])
        if new_arrays is None:  # no strategy drops its only reply; guard rather than lose the release
            new_arrays = arrays_from_numpy(noised)
        return new_arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()

    def log_plan(self, population: int, rounds_left: int) -> None:
        """What the run will spend: epsilon after its remaining rounds at this population's q, against the budget."""
        accountant = self.accountant
        settings = accountant.settings
        planned = accountant.epsilon_after(population, rounds_left)
        LOG.info(
            "fedinterest: user-level DP: sigma %g, clip %g, q %.4f of %d nodes; epsilon after %d rounds would be %.3f at delta %g (budget %g)",
            accountant.noise_multiplier, settings.clip_norm, accountant.sample_rate(population), population,
            accountant.rounds + rounds_left, planned, accountant.delta, settings.epsilon_budget,
        )
        if planned > settings.epsilon_budget:
            LOG.warning("fedinterest: the user-level budget %g will stop the run before its last round", settings.epsilon_budget)


def user_updates(valid: Iterable[CheckedReply]) -> list[Message]:
    """The valid replies as `UserLevelDP.aggregate_train` reads them: each one's arrays and
    the users it speaks for (NUM_USERS; UNCLIPPED_USERS under adaptive clipping), which the
    reply checks keep beside the message rather than in it (server/reply_checks.py)."""
    return [
        Message(
            content=RecordDict({ARRAYS: _valid_message(c).content.array_records[ARRAYS], METRICS: MetricRecord({NUM_USERS: c.trained, UNCLIPPED_USERS: c.unclipped or 0})}),
            dst_node_id=0, message_type=MessageType.TRAIN,
        )
        for c in valid
    ]


def _count(message: Message, key: str) -> int:
    """A count `user_updates` wrote into the message's metrics."""
    value = message.content.metric_records[METRICS][key]
    assert isinstance(value, (int, float)), f"{key} is a count"
    return int(value)


def _valid_message(checked: CheckedReply) -> Message:
    assert checked.message is not None, "a valid reply carries its message (server/reply_checks.py)"
    return checked.message


def released_reply(arrays: dict[str, np.ndarray], server_round: int) -> Message:
    """A released model as the one reply a strategy aggregates (weight 1: FedAvg keeps it, FedAdam and friends take it as their step)."""
    content = RecordDict({ARRAYS: arrays_from_numpy(arrays), METRICS: MetricRecord({NUM_EXAMPLES: 1, SERVER_ROUND: server_round})})
    return Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)
