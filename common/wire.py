"""Names on the wire between the ServerApp and the ClientApp, defined once for both sides.

A device's train reply carries at most one ArrayRecord (the model, under ARRAYS) and
one MetricRecord (under METRICS) holding TRAIN_REPLY_METRICS; an evaluate reply holds
EVAL_REPLY_METRICS. The SHARED_* metrics are noiseless functions of the device's data
(its training loss, the rank of its held-out item): a device adds them only when the run
config sets share-metrics and, on a real device, its own privacy policy allows it
(docs/privacy.md, "What leaves the device"). Nothing else leaves a device.

A node stands for the users of its shard: one on a real device, a contiguous range of
the dataset's users in simulation (run-config users-per-node; docs/simulations.md,
"Shards"). The server asks a simulated node which users it holds (a QUERY_SHARD
message, replied with SHARD_REPLY_METRICS), tells it each round which of them are
sampled (SHARD_USERS), and the node replies for those users together: ARRAYS is then
the global model plus the combined update of the NUM_USERS users that trained.
"""

from __future__ import annotations

# Record keys: Flower's own defaults, so its strategies find them.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# Server -> device, in the ConfigRecord under CONFIG.
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"  # train config under FedProx (Flower's FedProx sends this key)
STAGE = "stage"  # evaluate config: "valid" or "test" (default "test")
# Train config of a device picked by fault-fraction: "fail" or "timeout" (RunConfig FAULT_MODES).
# Honoured only by a simulated ClientApp (node config partition-id); a real device ignores it.
SIMULATED_FAULT = "simulated-fault"
# Train config: indices, within the node's shard, of the users sampled this round (sorted).
# Absent: the shard's first user (a real device has only its own).
SHARD_USERS = "shard-users"
# Train config under adaptive clipping (run-config user-clip-quantile > 0): this round's
# user-level clip norm, which replaces user-clip-norm (server/adaptive_clipping.py).
CLIP_NORM = "clip-norm"

# Train config of a secure round (aggregation "secagg+", Flower's SecAgg+; the legacy
# FitIns config Flower's workflow sends): the global arrays' names, in the order of the
# FitIns parameters and of the reply's masked vector, and the noise multiplier sigma the
# devices' noise shares add up to (0: no noise; each adds sigma C / sqrt(threshold)).
SECURE_ARRAY_KEYS = "secure-array-keys"
SECURE_NOISE_MULTIPLIER = "secure-noise-multiplier"

# Server -> node: which users do you hold? (a query message; simulation only)
QUERY_SHARD = "query.shard"
SHARD_FIRST_USER = "first-user"  # the index in the dataset of the shard's first user; -1 on a real device
SHARD_SIZE = "users"  # how many users the shard holds
SHARD_REPLY_METRICS = (SHARD_FIRST_USER, SHARD_SIZE)

# Server -> simulated node: the per-user bounded item counts of the sampled users (SHARD_USERS),
# for the private popularity prior (run-config popularity-prior; server/popularity_prior.py).
# The reply holds under ARRAYS one array POPULARITY_COUNTS, the mean of those users'
# vectors (each of L2 norm 1: common/popularity.py), and NUM_USERS under METRICS.
# A real device refuses it (simulation only).
QUERY_POPULARITY = "query.popularity"
POPULARITY_COUNTS = "popularity-counts"

# Device -> server metrics.
# FedAvg weights by this (its `weighted_by_key` default): the users in ARRAYS with DP-SGD
# (one each: a window count would reveal a window's removal), their windows without it;
# in an evaluate reply, the users whose held-out item was ranked.
NUM_EXAMPLES = "num-examples"
NUM_USERS = "num-users"  # users whose updates ARRAYS combines (0: no ARRAYS)
TRAIN_LOSS = "train-loss"  # shared only: weighted mean local training loss of those users this round
# One number per sampled user, in SHARD_USERS order: the user's cumulative example-level
# epsilon after this round, at the run's delta (inf: trained without DP).
EPSILON = "epsilon"
REFUSED = "refused"  # how many sampled users declined to train (privacy budget, or a round already charged)
# Sent only when the train config carries CLIP_NORM: how many of the NUM_USERS updates had
# norm at most CLIP_NORM before clipping. The server noises the sum before using it.
UNCLIPPED_USERS = "unclipped-users"
HIT_RATE_10 = "hr@10"
NDCG_10 = "ndcg@10"

TRAIN_REPLY_METRICS = (NUM_EXAMPLES, NUM_USERS, EPSILON, REFUSED)
SHARED_TRAIN_METRICS = (TRAIN_LOSS,)
ADAPTIVE_TRAIN_METRICS = (UNCLIPPED_USERS,)  # only when the train config carries CLIP_NORM
EVAL_REPLY_METRICS = (NUM_EXAMPLES,)
SHARED_EVAL_METRICS = (HIT_RATE_10, NDCG_10)  # the mean over the node's evaluated users
