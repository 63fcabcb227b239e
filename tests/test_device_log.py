"""Issue 16, item 5: the ClientApp's log on a device says why a round was refused, once, with no blank lines.

Run in a fresh interpreter, as `flwr-clientapp` runs the app: Flower's logger with its
console handler, the ClientApp imported (and with it Opacus, which configures the root
logger at import), one real train message to a device whose policy leaves no budget.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

SCRIPT = r"""
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from logging import INFO
from flwr.supercore.logger import log  # Flower's logger, as in flwr-clientapp
import torch
from device_helpers import make_device, message, store_context, tiny_run, user_rows, write_csv
from fedinterest.client.app import app
from fedinterest.client.ingest import ingest_file
from fedinterest.client.privacy_policy import PrivacyPolicy, save_policy
from fedinterest.common import wire
from fedinterest.common.model import InterestModel

tmp = Path(sys.argv[1])
device = make_device(tmp, num_items=40)
with device.store() as store:
    ingest_file(store, write_csv(tmp / "h.csv", user_rows("u1", [f"m{i}" for i in range(1, 21)])))
    save_policy(store, PrivacyPolicy(max_epsilon=0.01))  # no round fits: the ledger refuses
run = tiny_run(40)
log(INFO, "")  # Flower's spacer record, as before every "[RUN ...]" line
reply = app(message("train", InterestModel(run.model_config(40)), {wire.SERVER_ROUND: 1}), store_context(device.store_path, run))
print("REFUSED", reply.content[wire.METRICS][wire.REFUSED])
"""


def test_a_budget_refusal_is_logged_once_and_no_line_is_blank(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(TESTS)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] in ("1", "1.0")  # the refused count (one user, the device's)
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in done.stderr.splitlines()]
    reasons = [line for line in lines if "refusing round 1" in line]
    assert len(reasons) == 1, done.stderr[-3000:]
    assert "the privacy budget: epsilon 0 already spent at delta 1e-05" in reasons[0] and "budget of 0.01" in reasons[0]
    # Opacus's root handler printed Flower's spacers as "12/02/2026 00:57:31:INFO:" with nothing after.
    assert not [line for line in lines if re.fullmatch(r"\d\d/\d\d/\d{4} [\d:]+:[A-Z]+:\s*", line)], done.stderr[-3000:]
