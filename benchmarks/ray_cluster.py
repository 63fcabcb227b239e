"""A `fedinterest simulate` run on a Ray cluster that already exists (docs/simulations.md).

Flower 1.41's simulation engine calls `ray.init()` without an address (RayBackend
.init_ray; its federation config carries no address, only init-args num-cpus, num-gpus,
logging-level and log-to-driver), so Ray's own rule decides where the run goes: the
RAY_ADDRESS environment variable if set, else the cluster last started with `ray start`
under the default temp dir, else a new private instance. `fedinterest simulate` passes its
environment to the SuperLink, and the SuperLink to the simulation process, so

    RAY_ADDRESS=127.0.0.1:P fedinterest simulate CONFIG

runs on the cluster at P. This script proves it on loopback: a head node and a second
node of one CPU each (`ray start --head`, `ray start --address`), a tiny simulation with
RAY_ADDRESS set, and then, from the cluster's own tables, that two nodes were alive and the
ClientApp actors of the run were placed on both.

    python -m fedinterest.benchmarks.ray_cluster --out /tmp/ray-cluster-run

Why not `ray stop` at the end: it kills every Ray process on the machine, other users'
simulations included. Each node runs under `ray start --block` in its own process group,
and only those two groups are terminated. Why a private --temp-dir: `ray start` writes the
cluster's address into `<temp-dir>/ray_current_cluster`, and with the default /tmp/ray
every `ray.init()` on the machine (every other simulation) would join this cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedinterest.common.run_files import read_resolved
from fedinterest.simulations.simulate import run_simulation
from fedinterest.simulations.simulation_config import resolve_config

RAY = str(Path(sys.executable).parent / "ray")
NODE_START_SECONDS = 90.0
# The tiny federation of tests/simulation_helpers.py, four users on four virtual devices.
TINY_CONFIG = """
[run]
dataset = "sequences"
data-path = "tiny.seq"
num-server-rounds = 2
clients-per-round = 4
local-epochs = 1
batch-size = 2
noise-multiplier = 1.0
max-grad-norm = 1.0
epsilon-budget = 1000.0
max-len = 10
dim = 8
num-blocks = 1
dropout = 0.0
eval-every = 1
round-timeout = 120.0

[federation]
num-supernodes = 4
client-cpus = 1
"""
TINY_SEQUENCES = "\n".join(f"u{u} " + " ".join(f"i{(u * 7 + k) % 40 + 1}" for k in range(10)) for u in range(4)) + "\n"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _node_ports() -> list[str]:
    # Another Ray instance on the machine holds Ray's fixed default ports (the dashboard
    # agent's 52365 among them): every per-node port is a free one instead.
    return [
        f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
        f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
    ]


class LoopbackRayCluster:
    """A head and `workers` more nodes of one CPU each on 127.0.0.1, stopped (only them) on exit."""

    def __init__(self, root: Path, workers: int = 1, object_store_bytes: int = 100_000_000) -> None:
        self.root = Path(root)
        self.workers = workers
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Ray's socket paths must stay under 108 bytes: a short temp dir of its own.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="fi-ray-"))
        self.object_store_bytes = object_store_bytes
        self.processes: list[subprocess.Popen[bytes]] = []
        self.commands: list[list[str]] = []

    def _start(self, args: list[str], name: str) -> None:
        command = [
            RAY, "start", *args, "--num-cpus=1", "--node-ip-address=127.0.0.1",
            f"--object-store-memory={self.object_store_bytes}", "--disable-usage-stats", *_node_ports(), "--block",
        ]
        self.commands.append(command)
        log = open(self.root / f"ray-{name}.log", "wb")  # noqa: SIM115 - the node writes to it until it stops
        self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def __enter__(self) -> LoopbackRayCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._start(["--head", f"--port={self.port}", f"--temp-dir={self.temp_dir}", "--include-dashboard=false",
                         f"--ray-client-server-port={_free_port()}"], "head")
            self.wait_for_nodes(1)
            for index in range(self.workers):
                self._start([f"--address={self.address}"], f"worker-{index + 1}")
            self.wait_for_nodes(1 + self.workers)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for_nodes(self, count: int) -> None:
        """Until `count` nodes are alive (`ray status` at the cluster's address), else RuntimeError."""
        deadline = time.monotonic() + NODE_START_SECONDS
        while time.monotonic() < deadline:
            dead = [str(p.args) for p in self.processes if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a Ray node exited while starting: {dead[0]} (logs in {self.root})")
            status = subprocess.run([RAY, "status", f"--address={self.address}"], capture_output=True, text=True, check=False)
            if status.returncode == 0 and _active_nodes(status.stdout) >= count:
                return
            time.sleep(1.0)
        raise RuntimeError(f"{count} Ray node(s) were not up at {self.address} after {NODE_START_SECONDS:.0f} s (logs in {self.root})")

    def stop(self) -> None:
        """SIGTERM each node's `ray start --block` process group, workers first; SIGKILL what lingers."""
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
            try:  # the node's raylet and workers share its group; none may outlive it
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # The sessions' logs go with it; `ray start`'s own output stays in root/ray-*.log.
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _active_nodes(status_text: str) -> int:
    """The node lines under "Active:" in `ray status` output."""
    lines = status_text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Active:")
    except StopIteration:
        return 0
    count = 0
    for line in lines[start + 1:]:
        if not line.strip().startswith("1 node_"):
            break
        count += 1
    return count


def cluster_facts(address: str) -> dict[str, Any]:
    """The cluster's nodes, and on which nodes the ClientApp actors of finished jobs ran, from its GCS tables."""
    import ray

    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    try:
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        this_job = ray.get_runtime_context().get_job_id()
        # ray._private.state.actors: the GCS actor table (public ray.util.state needs the dashboard, off here).
        actors = [a for a in ray._private.state.actors().values() if a["ActorClassName"] == "ClientAppActor"]
        jobs = [j for j in ray._private.state.jobs() if j["JobID"] != this_job]
    finally:
        ray.shutdown()
    return {
        "alive_nodes": len(nodes),
        "client_actor_nodes": len({a["Address"]["NodeID"] for a in actors}),
        "client_actors": len(actors),
        "other_jobs": len(jobs),
    }


def run(out: Path) -> dict[str, Any]:
    """Start the two-node cluster, run the tiny simulation on it, check the cluster was used."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tiny.seq").write_text(TINY_SEQUENCES)
    (out / "tiny.toml").write_text(TINY_CONFIG)
    with LoopbackRayCluster(out) as cluster:
        os.environ["RAY_ADDRESS"] = cluster.address
        try:
            result = run_simulation(resolve_config(out / "tiny.toml"), out / "runs", timeout=600)
        finally:
            del os.environ["RAY_ADDRESS"]
        facts = cluster_facts(cluster.address)
        commands = [" ".join(c) for c in cluster.commands]
    verdict = {
        "address": cluster.address,
        "ray_start": commands,
        "run_dir": str(result.run_dir),
        "recorded_ray_address": read_resolved(result.run_dir).get("ray_address"),
        "rounds": len(result.rows),
        "aggregated": result.final.counts.get("aggregated"),
        **facts,
    }
    verdict["used_cluster"] = (
        facts["alive_nodes"] == 2 and facts["client_actor_nodes"] == 2 and facts["other_jobs"] >= 1
        and verdict["recorded_ray_address"] == cluster.address
    )
    (out / "ray_cluster.json").write_text(json.dumps(verdict, indent=2) + "\n")
    return verdict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Directory for the Ray logs, the config and the run.")
    args = parser.parse_args(argv)
    verdict = run(args.out)
    print(json.dumps(verdict, indent=2))
    return 0 if verdict["used_cluster"] and verdict["rounds"] == 2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
