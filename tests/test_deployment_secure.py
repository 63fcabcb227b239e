"""Issue 14's loopback acceptance: the TLS federation of tests/test_deployment_e2e.py (operator
SuperLink with TLS and node authentication, three enrolled devices with their own stores)
runs a round under Flower's SecAgg+ end to end, with user-level DP noise added on the
devices. Skipped, saying why, without MovieLens 100K (cut into the device histories)."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import pytest
from operator_helpers import FEDINTEREST, ServerProcess
from test_deployment_e2e import DATA, DEVICES, cli, cut_histories, process_group, wait_online

from fedinterest.server.deployment import load_deployment
from fedinterest.server.flower_processes import free_port

SECURE_SETTINGS = [
    "num-server-rounds=1", f"clients-per-round={DEVICES}", "dim=16", "max-len=20", "num-blocks=1", "batch-size=4",
    "eval-every=1", "round-timeout=240", "aggregation=secagg+", "user-noise-multiplier=1.0", "user-clip-norm=0.5",
    "user-delta=0.01",
]


@pytest.mark.slow  # minutes: real SuperLink and SuperNodes, four protocol stages, each message a ClientApp task
def test_three_devices_on_tls_loopback_run_a_secure_round(tmp_path: Path) -> None:
    if not DATA.is_file():
        pytest.skip(f"{DATA} is absent: the loopback test cuts its device histories from MovieLens 100K")
    catalogue, files, _ = cut_histories(tmp_path)
    port = free_port()
    init = cli("server", "init", str(tmp_path / "server"), "--san", "127.0.0.1", "--san", "localhost",
               "--catalogue", str(catalogue), "--host", "127.0.0.1", "--port", str(port))
    deployment = load_deployment(Path(init["dir"]))
    devices = []
    for k, path in enumerate(files[:DEVICES]):
        device = tmp_path / f"device-{k}"
        made = cli("device", "init", str(device), "--catalogue", str(catalogue))
        cli("device", "ingest", str(path), "--dir", str(device), "--format", "ml-100k")
        devices.append((device, Path(made["public_key"])))
    with ExitStack() as stack:
        stack.enter_context(ServerProcess(deployment, tmp_path / "server.log"))
        for k, (device, key) in enumerate(devices):
            cli("server", "enroll", str(key), "--name", f"phone-{k}", "--dir", str(deployment.root))
            stack.enter_context(process_group(
                [FEDINTEREST, "device", "start", "--dir", str(device), "--server", f"127.0.0.1:{port}", "--ca", str(deployment.ca_cert)],
                tmp_path / f"device-{k}.log", device / "test-home",
            ))
        wait_online(deployment, {f"phone-{k}" for k in range(DEVICES)})
        sets = [a for s in SECURE_SETTINGS for a in ("--set", s)]
        submitted = cli("server", "run", "--dir", str(deployment.root), *sets, "--wait", "--timeout-minutes", "20")
        assert submitted["state"]["completed"], submitted
        state = cli("server", "status", str(submitted["run_id"]), "--dir", str(deployment.root))
        assert state["rounds_done"] == 1 and state["devices"]["answered"] == DEVICES and state["devices"]["failed"] == 0

    [secure_file] = list(deployment.root.rglob("secure_aggregation.jsonl"))
    [row] = [json.loads(line) for line in secure_file.read_text().splitlines()]
    assert (row["nodes"], row["shares"], row["threshold"], row["survivors"], row["completed"]) == (DEVICES, 3, 2, 3, True)
    final = json.loads((secure_file.parent / "final.json").read_text())
    assert final["privacy"]["user_level"]["mechanism"] == "secagg+" and final["privacy"]["user_level"]["rounds_accounted"] == 1
