"""The private popularity prior: item counts released under layer 2's mechanism, blended into the model.

Issue 12's lever 5. Popularity is a strong ranker where the private model is weak (few
users, a small epsilon), and the model is stronger where it has learnt; so the model's
per-item bias takes beta * log(1 + count) with beta chosen on validation
(common/popularity.py), from 0 (the model alone) to falling back to popularity.

The release, before round 1 (simulation only; run-config popularity-prior):
- Sampling: the accountant's own Poisson sample of users at the run's q, under the
  round number 0 (the training rounds are 1, 2, ...).
- Per user: 1 / sqrt(n) on each of its n distinct training items (L2 norm 1), summed by
  the node that holds it; a node replies the mean of its sampled users' vectors and
  their number (wire.QUERY_POPULARITY), and the server clips that mean to norm 1 and
  counts it once per user it speaks for -- the same bound the round puts on an update
  (server/user_privacy.py), with clip norm 1. Adding or removing one user moves the sum
  by at most 1.
- Noise: N(0, sigma^2) per item, sigma the run's user-level noise multiplier, from the
  accountant's noise source; the sum divided by q estimates the whole population's counts
  (post-processing).
- Accounting: one step (sigma, q) of the run's Opacus accountant, exactly a round's step:
  the noise calibration counts num-server-rounds + 1 releases (settings_of), and the step is
  persisted (releases.json) before the counts are used; the noised counts are kept beside
  the checkpoint, so a resumed run does not release them again.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedinterest.common.popularity import PRIOR_WEIGHTS, log_prior
from fedinterest.common.wire import ARRAYS, CONFIG, METRICS, NUM_USERS, POPULARITY_COUNTS, QUERY_POPULARITY, SHARD_USERS
from fedinterest.server import checkpoint as ckpt
from fedinterest.server.cohort import Cohort
from fedinterest.server.user_privacy import UserLevelAccountant, clip_update

LOG = logging.getLogger("flwr.fedinterest")
# The released counts (float64, one per item index, padding 0), beside the checkpoint.
PRIOR_FILE = "popularity_prior.npy"
# The accountant's round number of the popularity release (the model's rounds are 1, 2, ...).
RELEASE_ROUND = 0


def prior_for_run(grid: Grid, run_dir: Path, cohort: Cohort, user_dp: UserLevelAccountant, num_items: int, *, timeout: float) -> np.ndarray:
    """The run's log-prior (common/popularity.log_prior): the released counts of an earlier
    start of this run, or a new release, accounted and persisted before it is used."""
    path = Path(run_dir) / ckpt.CHECKPOINT_DIR / PRIOR_FILE
    if path.is_file():
        counts = np.load(path, allow_pickle=False)
        if counts.shape != (num_items + 1,):
            raise ckpt.CheckpointError(f"{path}: {counts.shape[0]} counts, but the run's catalogue has {num_items} items")
        LOG.info("fedinterest: popularity prior from %s (released earlier in this run)", path)
        return log_prior(counts)
    if user_dp.would_exceed(cohort.population):
        raise RuntimeError(f"the popularity release would take user-level epsilon past the budget {user_dp.settings.epsilon_budget:g}")
    counts = release_counts(grid, cohort, user_dp, num_items, timeout=timeout)
    ckpt.record_release(run_dir, RELEASE_ROUND, user_dp.to_json())  # counted on disk before the counts are used
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.npy")
    np.save(partial, counts, allow_pickle=False)
    partial.replace(path)
    return log_prior(counts)


def prior_summary(weight: float | None) -> dict[str, Any]:
    """What final.json says of the prior: how it was released and blended, and the weight validation chose."""
    return {
        "release": "per-user L2-bounded item counts (1 / sqrt(n) on each of n distinct training items) of a Poisson sample at the run's q, "
        "plus N(0, sigma^2) per item: one more step of the run's accountant, included in user_level",
        "blend": "the model's per-item bias + weight * log(1 + max(count, 0))",
        "weights_tried": list(PRIOR_WEIGHTS),
        "chosen_weight": weight,
    }


def release_counts(grid: Grid, cohort: Cohort, user_dp: UserLevelAccountant, num_items: int, *, timeout: float) -> np.ndarray:
    """Sample, ask the nodes, clip, sum, noise and account: the released estimate of the per-user bounded counts."""
    population = cohort.population
    q = user_dp.sample_rate(population)
    assignment = cohort.assign(user_dp.sample(population, RELEASE_ROUND))
    messages = [
        Message(content=RecordDict({CONFIG: ConfigRecord({SHARD_USERS: users})}), dst_node_id=node, message_type=QUERY_POPULARITY)
        for node, users in sorted(assignment.items(), key=lambda item: cohort.rank(item[0]))
    ]
    started = time.monotonic()
    total = np.zeros(num_items + 1, dtype=np.float64)
    counted, failed = 0, 0
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    for reply in replies:
        mean, users = _reply_counts(reply, num_items, len(assignment.get(int(reply.metadata.src_node_id), [])))
        if mean is None:
            failed += 1
            continue
        clipped, _ = clip_update({POPULARITY_COUNTS: mean}, 1.0)  # a device's own bound, whatever it sent
        total += users * clipped[POPULARITY_COUNTS]
        counted += users
    # As in a round: every sampled user that failed adds a zero, inside the same bound.
    noised = total + user_dp.noise_rng(RELEASE_ROUND).normal(0.0, user_dp.noise_multiplier, size=total.shape)
    user_dp.record_release(population)
    noised[0] = 0.0
    LOG.info(
        "fedinterest: popularity prior: counts of %d sampled user(s) (q %.4f; %d repl(ies) failed, malformed or missing) released with sigma %g in %.1f s; "
        "user-level epsilon %.3f at delta %g",
        counted, q, failed + len(messages) - len(replies), user_dp.noise_multiplier, time.monotonic() - started,
        user_dp.epsilon(), user_dp.delta,
    )
    return noised / q


def _reply_counts(reply: Message, num_items: int, sampled: int) -> tuple[np.ndarray | None, int]:
    """(mean bounded-count vector, users) of a well-formed reply; (None, 0) otherwise (an error, a wrong shape, not finite)."""
    if reply.has_error() or METRICS not in reply.content.metric_records:
        return None, 0
    users = reply.content[METRICS].get(NUM_USERS)
    if isinstance(users, bool) or not isinstance(users, int) or not 0 <= users <= sampled:
        return None, 0
    if users == 0:
        return np.zeros(num_items + 1), 0
    record = reply.content.array_records.get(ARRAYS)
    if record is None or list(record.keys()) != [POPULARITY_COUNTS]:
        return None, 0
    mean = record[POPULARITY_COUNTS].numpy().astype(np.float64)
    if mean.shape != (num_items + 1,) or not np.all(np.isfinite(mean)):
        return None, 0
    return mean, users
