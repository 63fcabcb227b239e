"""What one training round hands back to the loop, on either path: the plain one
(server/train_round.py) or Flower's SecAgg+ (server/secure_rounds.py, which adds its own)."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ArrayRecord

from fedinterest.server.reply_checks import RoundReplies


@dataclass(frozen=True)
class RoundResult:
    """The new global model, the round's classified replies and whether they moved it.

    `epsilons`: the example-level epsilon each user reported, by user name (server/cohort.py).
    """

    arrays: ArrayRecord
    replies: RoundReplies
    aggregated: bool
    epsilons: dict[str, float]
    devices_seconds: float = 0.0  # from sending the train messages to the last reply (or the timeout)
