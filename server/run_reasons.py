"""Why each device failed, was rejected or refused in a run, from the ServerApp's log.

The ServerApp (server/train_round.py) logs one line per such reply, naming the node; Flower
keeps the ServerApp's log per run (`flwr log RUN_ID --show`). This module reads it and
names the device (the enrolment table maps node ids to names). A refusal's own reason
stays on the device (its log says why: budget, policy); the server sees the epsilon it
reported.
"""

from __future__ import annotations

import re
import subprocess
from collections import defaultdict

from fedinterest.server.deployment import Deployment
from fedinterest.server.enrollment import load_devices
from fedinterest.server.flower_processes import ANSI, executable
from fedinterest.server.superlink import superlink_env

_LINE = re.compile(r"fedinterest: round (\d+): node (\d+) (failed|rejected|refused): (.*)$")


def parse_reasons(log_text: str, names: dict[int, str]) -> list[str]:
    """One line per device and kind: the rounds and the first reason given (the log's order)."""
    rounds: dict[tuple[str, str], list[int]] = defaultdict(list)
    first: dict[tuple[str, str], str] = {}
    for raw in log_text.splitlines():
        match = _LINE.search(ANSI.sub("", raw).rstrip())
        if not match:
            continue
        server_round, node, kind, reason = int(match.group(1)), int(match.group(2)), match.group(3), match.group(4)
        who = f"{names[node]} (node {node})" if node in names else f"node {node} (not in the enrolment table)"
        rounds[(who, kind)].append(server_round)
        first.setdefault((who, kind), reason)
    return [f"{who} {kind} in round(s) {', '.join(map(str, sorted(set(r))))}: {first[(who, kind)]}" for (who, kind), r in rounds.items()]


def device_reasons(deployment: Deployment, run_id: int) -> list[str]:
    """The reasons of run `run_id` from Flower's log of it; RuntimeError when Flower cannot give it."""
    done = subprocess.run(
        [executable("flwr"), "log", str(run_id), "--show"], capture_output=True, text=True, env=superlink_env(deployment), timeout=60, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"flwr log {run_id} --show failed (exit {done.returncode}): {ANSI.sub('', done.stderr).strip()[-300:]}")
    return parse_reasons(done.stdout, {d.node_id: d.name for d in load_devices(deployment)})
