"""Names on the wire between the ServerApp and the ClientApp, defined once for both sides.

A device's train reply carries exactly one ArrayRecord (the model, under ARRAYS) and
one MetricRecord (under METRICS) holding only TRAIN_REPLY_METRICS; an evaluate reply
holds only EVAL_REPLY_METRICS. Nothing else leaves a device (docs/privacy.md).
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

# Device -> server metrics.
NUM_EXAMPLES = "num-examples"  # FedAvg weights by this (its `weighted_by_key` default)
TRAIN_LOSS = "train-loss"  # mean local training loss of this round
EPSILON = "epsilon"  # the device's cumulative example-level epsilon after this round, at the run's delta
REFUSED = "refused"  # 1.0 when the device declined to train because of its privacy budget, else 0.0
HIT_RATE_10 = "hr@10"
NDCG_10 = "ndcg@10"

TRAIN_REPLY_METRICS = (NUM_EXAMPLES, TRAIN_LOSS, EPSILON, REFUSED)
EVAL_REPLY_METRICS = (NUM_EXAMPLES, HIT_RATE_10, NDCG_10)
