"""A device process for the crash test: trains rounds through the real ClientApp on a device store.

    python tests/device_train_worker.py STORE FIRST_ROUND LAST_ROUND

Prints `start R` before each round and `done R EPSILON REFUSED` after it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from device_helpers import message, store_context, tiny_run  # noqa: E402

from fedinterest.client.app import app  # noqa: E402
from fedinterest.common import wire  # noqa: E402
from fedinterest.common.model import InterestModel  # noqa: E402

NUM_ITEMS = 40


def main() -> None:
    """Train rounds FIRST..LAST of one run, as a SuperNode would deliver them."""
    store, first, last = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    run = tiny_run(NUM_ITEMS, local_epochs=6, epsilon_budget=1e6, noise_multiplier=1.0)
    torch.manual_seed(0)
    global_model = InterestModel(run.model_config(NUM_ITEMS))
    context = store_context(store, run, run_id=11)
    for server_round in range(first, last + 1):
        print(f"start {server_round}", flush=True)
        reply = app(message("train", global_model, {wire.SERVER_ROUND: server_round}, run_id=11), context)
        if reply.has_error():
            raise SystemExit(f"round {server_round} failed: {reply.error}")
        metrics = reply.content.metric_records[wire.METRICS]
        print(f"done {server_round} {metrics[wire.EPSILON][0]!r} {metrics[wire.REFUSED]}", flush=True)


if __name__ == "__main__":
    main()
