"""Cohort simulation speed: seconds per round of FedSGD users, beside the centralized floor.

Each case is one `fedinterest simulate` run of a dataset's config with the FedSGD recipe
(each sampled user returns its gradient; docs/simulations.md, "Matching the centralized
model"), no DP noise, `cohort` users a round and `users-per-node` users on each virtual
node. In the same process, right after it, the floor: the centralized trainer's own
arithmetic (common/training.py: the same model, packed loss, batches of 128 windows of
similar length, an Adam step) over exactly the users those rounds sampled, with one
torch thread, as every simulated ClientApp has (`torch.set_num_threads(1)`). Two threads
were used before; on this shared 2-core machine a second thread made the floor up to 18
times slower under contention, which flattered the ratio. The overhead ratio is the
simulation's seconds per device update over the floor's seconds per user: 1.0 would be a
federation that costs what centralized training on the same users costs on one core; the
simulation trains on two actors at once, so 0.5 would be both cores used perfectly.

A case may name a code variant: `before` runs the same case with the code the issue-11
fixes replaced (FEDINTEREST_FLOWER_DISPATCH=scan: the earlier per-node scan of every
stored message; FEDINTEREST_WARM_NODE=off: the ClientApp opens and closes the node's
ledger and builds a model for every message), so before and after are measured in one
invocation, one after the other, each with its floor.

Seconds per round: the median over rounds 2..R-1 (round 1 warms Ray up; the last one
evaluates). Peak RSS: the highest sum of resident memory over this process and every
process it started (SuperLink, the simulation engine, Ray and its actors), sampled every
0.5 s; shared pages (torch's libraries) count once per process, so it is an upper bound.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fedinterest.benchmarks.report import store_result
from fedinterest.client import warm_node
from fedinterest.common.datasets import load_split
from fedinterest.common.examples import bucketed_batches, stack_windows
from fedinterest.common.model import InterestModel, packed_sequence_loss
from fedinterest.common.run_config import RunConfig
from fedinterest.common.run_files import RoundRow, read_resolved, read_rows
from fedinterest.common.training import train_epoch
from fedinterest.server import simulation_dispatch
from fedinterest.server.train_round import round_seed
from fedinterest.simulations.simulate import run_simulation
from fedinterest.simulations.simulation_config import resolve_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "simulations" / "configs"
RESULTS = REPO / "benchmarks" / "results" / "cohort_speed"
LABELS = {"ml-1m": "ML-1M users 1-2999", "sports": "Amazon Sports", "toys": "Amazon Toys", "synthetic": "synthetic"}
# FedSGD devices, no DP noise (the speed of the arithmetic, not of a privacy setting).
FEDSGD = [
    "noise-multiplier=0", "user-noise-multiplier=0", "local-epochs=1", "local-optimizer=sgd", "local-lr=1.0", "batch-size=16",
    "strategy=fedadam", "server-lr=0.001", "server-tau=1e-8",
]
FLOOR_THREADS = 1  # as each simulated ClientApp (see the module docstring)
# Code variants: the environment a case's simulation runs with ("": the code as it is).
VARIANTS = {"": {}, "before": {simulation_dispatch.SWITCH: "scan", warm_node.SWITCH: "off"}}


@dataclass(frozen=True)
class Case:
    """One row: a dataset (synthetic: its population), users per node (0: half the population) and users per round."""

    dataset: str
    users_per_node: int
    cohort: int
    population: int = 0  # synthetic only
    variant: str = ""  # a key of VARIANTS

    @property
    def name(self) -> str:
        size = f"-{self.population}" if self.population else ""
        variant = f"-{self.variant}" if self.variant else ""
        return f"{self.dataset}{size}-k{self.users_per_node or 'half'}-c{self.cohort}{variant}"


def overrides(case: Case, population: int, rounds: int) -> list[str]:
    """The `--set` items of a case's run."""
    per_node = case.users_per_node or -(-population // 2)
    items = [*FEDSGD, f"users-per-node={per_node}", f"clients-per-round={case.cohort}", f"num-server-rounds={rounds}", f"eval-every={rounds + 1}"]
    if case.dataset == "synthetic":
        items += [f"synthetic-users={case.population}"]
    return items


def population_of(case: Case) -> int:
    if case.dataset == "synthetic":
        return case.population
    return len(load_split(resolve_config(CONFIGS / f"{case.dataset}.toml").run.dataset_spec()).users)


def run_case(case: Case, rounds: int, out: Path) -> dict:
    """Simulate one case, then time the floor on the same users; the row's figures."""
    population = population_of(case)
    config_path = CONFIGS / f"{case.dataset}.toml"
    items = overrides(case, population, rounds)
    config = resolve_config(config_path, items)
    argv = [str(config_path), *(part for item in items for part in ("--set", item)), "--out", str(out)]
    # The machine may be shared: the 1-minute load average before and after says how much.
    load_before = os.getloadavg()[0]
    saved = {key: os.environ.get(key) for key in VARIANTS[case.variant]}
    os.environ.update(VARIANTS[case.variant])  # the SuperLink, the engine and Ray's actors inherit it
    try:
        with PeakMemory() as memory:
            result = run_simulation(config, out, argv=argv)
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    load_after_simulation = os.getloadavg()[0]
    rows = read_rows(result.run_dir)
    seconds = [_seconds(row) for row in rows]
    per_round = statistics.median(seconds[1:-1] or seconds)
    measured = [row.round for row in rows][1:-1] or [row.round for row in rows]
    floor = floor_seconds_per_user(config.run, measured)
    load_after = os.getloadavg()[0]
    resolved = read_resolved(result.run_dir)
    per_update = per_round / case.cohort
    return {
        "case": case.name, "dataset": case.dataset, "population": population, "users_per_node": config.run.users_per_node,
        "nodes": resolved["federation"]["num-supernodes"], "cohort": case.cohort, "rounds": len(rows),
        "seconds_per_round": per_round, "round_seconds": seconds, "updates_per_second": case.cohort / per_round,
        "floor_seconds_per_user": floor, "overhead_ratio": per_update / floor, "peak_rss_bytes": memory.peak,
        "devices_seconds": statistics.median([row.number("devices_seconds") or 0.0 for row in rows][1:-1] or [0.0]),
        "wall_seconds": result.wall_seconds, "command": " ".join(resolved["command"]), "commit": resolved["commit"],
        "run_dir": result.run_dir.name, "load_before": load_before, "load_after_simulation": load_after_simulation,
        "load_after": load_after, "floor_threads": FLOOR_THREADS, "variant": case.variant, "environment": VARIANTS[case.variant],
    }


def floor_seconds_per_user(run: RunConfig, rounds: list[int]) -> float:
    """The centralized trainer's seconds per user over the users sampled in `rounds`."""
    split = load_split(run.dataset_spec())
    population = len(split.users)
    torch.set_num_threads(FLOOR_THREADS)
    torch.manual_seed(run.seed)
    model = InterestModel(run.model_config(split.num_items))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(run.seed)
    timed, users = 0.0, 0
    for index, server_round in enumerate([rounds[0], *rounds]):  # the first pass warms up, untimed
        sample = random.Random(round_seed(run.seed, server_round)).sample(range(population), min(run.clients_per_round, population))
        inputs, targets = stack_windows([split.users[u].train for u in sample], run.max_len)
        start = time.perf_counter()
        train_epoch(model, bucketed_batches(inputs, targets, 128, generator), optimizer, packed_sequence_loss)
        if index > 0:
            timed += time.perf_counter() - start
            users += len(sample)
    return timed / users


class PeakMemory:
    """The peak, over a `with` block, of the summed RSS of this process and its descendants."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        root = os.getpid()
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(root))
            self._stop.wait(self.interval)


def tree_rss(root: int) -> int:
    """Summed resident bytes of process `root` and all its descendants (Linux /proc)."""
    parents, rss = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        parents[int(entry.name)] = int(fields.get("PPid", "0").strip() or 0)
        rss[int(entry.name)] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def table(results: list[dict]) -> str:
    """The cohort-speed table of docs/benchmarks.md."""
    lines = [
        "| dataset | population | users per node | nodes | users per round | s per round | device updates / s | floor per user | overhead ratio | peak RSS | load before/after | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["dataset"], r["population"], r["cohort"], r["users_per_node"])):
        if r.get("variant"):
            continue  # the before/after table's
        lines.append(
            f"| {LABELS.get(r['dataset'], r['dataset'])} | {r['population']:,} | {r['users_per_node']:,} | {r['nodes']:,} | {r['cohort']:,} | "
            f"{r['seconds_per_round']:.2f} | {r['updates_per_second']:.0f} | {r['floor_seconds_per_user'] * 1e3:.2f} ms | "
            f"{r['overhead_ratio']:.2f} | {r['peak_rss_bytes'] / 2**30:.1f} GiB | {_load(r)} | {r['commit']} |"
        )
    return "\n".join(lines)


def fixes_table(results: list[dict]) -> str:
    """Each case measured with the code before the issue-11 fixes beside the same case after them."""
    lines = [
        "| dataset | users per node | users per round | code | s per round | floor per user | overhead ratio | load before/after | commit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    after = {r["case"]: r for r in results if not r.get("variant")}
    for before in sorted((r for r in results if r.get("variant") == "before"), key=lambda r: r["case"]):
        pair = [before, after.get(before["case"].removesuffix("-before"))]
        for r, code in zip(pair, ("before: scan, cold node", "after: index, warm node")):
            if r is None:
                continue
            lines.append(
                f"| {LABELS.get(r['dataset'], r['dataset'])} | {r['users_per_node']:,} | {r['cohort']:,} | {code} | {r['seconds_per_round']:.2f} | "
                f"{r['floor_seconds_per_user'] * 1e3:.2f} ms | {r['overhead_ratio']:.2f} | {_load(r)} | {r['commit']} |"
            )
    return "\n".join(lines)


def _load(result: dict) -> str:
    """The 1-minute load averages around the case ("-" for rows measured before they were kept)."""
    if "load_before" not in result:
        return "-"
    return f"{result['load_before']:.1f} / {result['load_after']:.1f}"


def stored() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]


def store(result: dict) -> Path:
    return store_result(RESULTS, result["case"], result)


def parse_case(text: str) -> Case:
    """DATASET[:POPULATION]:USERS_PER_NODE:COHORT[:VARIANT], e.g. sports:half:1000, synthetic:100000:half:1000, ml-1m:1:100:before."""
    parts = text.split(":")
    variant = parts.pop() if parts[-1] in VARIANTS else ""
    if parts[0] == "synthetic" and len(parts) == 4:
        dataset, population, per_node, cohort = parts
    elif parts[0] != "synthetic" and len(parts) == 3:
        (dataset, per_node, cohort), population = parts, "0"
    else:
        raise ValueError(f"case {text!r} is not DATASET:USERS_PER_NODE:COHORT (synthetic: synthetic:POPULATION:USERS_PER_NODE:COHORT)")
    if dataset not in LABELS:
        raise ValueError(f"case {text!r}: dataset must be one of {', '.join(LABELS)}")
    try:
        return Case(dataset, 0 if per_node == "half" else int(per_node), int(cohort), int(population), variant)
    except ValueError as err:
        raise ValueError(f"case {text!r}: users per node must be a number or 'half', cohort and population numbers") from err


def _seconds(row: RoundRow) -> float:
    """The round's seconds (timings.jsonl), which every round the ServerApp finished has."""
    seconds = row.number("seconds")
    if seconds is None:
        raise ValueError(f"round {row.round} has no seconds in its timings")
    return seconds
