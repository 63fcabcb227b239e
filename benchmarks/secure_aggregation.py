"""Secure aggregation's cost: messages, bytes and seconds of one round, secure against plain.

Each case is one training round of n devices (one user each, all sampled: Poisson at
q = 1) run by the ServerApp's own round code (`server.train_round.train_round`) with user-level
DP (sigma 1, C 1), once with `aggregation = "plain"` (every clipped update to the server,
which adds the noise) and once with `"secagg+"` (Flower's SecAgg+ workflow and mod, noise
shares on the devices). The devices are fedinterest's real ClientApp (FedSGD, no
on-device DP-SGD) on `simulations/inprocess_grid.py`: every message is serialized to
Flower's protobuf and back, which is what the bytes count, but the nodes answer one
after another in this process and no network is crossed. So "round seconds" is the
whole federation's CPU time on one core (server and every device), "server seconds"
the part outside the ClientApps, and "seconds per device" the ClientApps' part over n:
what one device spends in a round, the figure that matters on a phone. Flower's
simulation engine (Ray) adds its own per-message cost on top (docs/simulations.md).

Quantization error: a third round of the secure path without noise, on the same global
model, is compared with the plain sum of the same clipped updates (each device's update
through the plain train path): the largest and the root-mean-square error per coordinate
of the decoded sum, beside the plan's bound (one quantization step per device).

    python -m fedinterest.benchmarks.secure_aggregation --devices 10 100 1000 --shares-above 100=21
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import DEFAULT_TTL, ConfigRecord, Metadata, RecordDict
from flwr.app.message import make_message

from fedinterest.benchmarks.report import publish, store_result
from fedinterest.client.app import app
from fedinterest.common import wire
from fedinterest.common.datasets import load_split
from fedinterest.common.run_config import RunConfig
from fedinterest.server.cohort import survey
from fedinterest.server.evaluation import arrays_to_numpy, initial_arrays
from fedinterest.server.reply_checks import ArraySpec
from fedinterest.server.round_result import RoundResult
from fedinterest.server.secure_rounds import SecureRound, secure_train_round
from fedinterest.server.strategies import build_strategy
from fedinterest.server.train_round import train_round
from fedinterest.server.user_dp_strategy import UserLevelDP
from fedinterest.server.user_privacy import UserLevelAccountant, settings_of
from fedinterest.simulations.inprocess_grid import InProcessGrid, node_contexts, server_task

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "secure_aggregation"
SECTION = "secure-aggregation"
# FedSGD devices on a small synthetic catalogue: the protocol's cost, not training, is measured.
MODEL: dict[str, Any] = dict(
    synthetic_items=1000, max_len=20, dim=32, num_blocks=1, dropout=0.0, batch_size=16, local_optimizer="sgd",
    local_lr=1.0, local_epochs=1, noise_multiplier=0.0, round_timeout=600.0, user_clip_norm=1.0, user_delta=1e-3,
)


def run_config(devices: int, aggregation: str, sigma: float, shares: int) -> RunConfig:
    """The run of one case: n synthetic users, all sampled, layer 2 at sigma (0: off)."""
    return RunConfig(
        **MODEL, synthetic_users=devices, clients_per_round=devices, aggregation=aggregation,
        user_noise_multiplier=sigma, secagg_num_shares=shares,
    )


def one_round(config: RunConfig, devices: int) -> dict:
    """One round of `config`'s aggregation on a fresh federation of n devices: traffic and seconds."""
    grid = InProcessGrid(app, node_contexts(config.to_flower(), devices), keep_replies=False)
    arrays = initial_arrays(config.model_config(load_split(config.dataset_spec()).num_items), config.seed)
    with server_task():
        cohort = survey(grid, grid.get_node_ids(), timeout=60)
        grid.traffic = type(grid.traffic)()  # count the round only, not the survey
        strategy = build_strategy(config, devices)
        accountant = UserLevelAccountant.start(settings_of(config), cohort.population) if config.user_private else None
        started = time.perf_counter()
        result: SecureRound | RoundResult
        if config.secure_aggregation:  # what train_round delegates to, called directly for its plan and decoded sum
            result = secure_train_round(grid, strategy, arrays, 1, config, cohort, cohort.assign(range(devices)), accountant)
        else:
            private = UserLevelDP(strategy, accountant) if accountant is not None else strategy  # layer 2 wraps the strategy
            result = train_round(grid, private, arrays, 1, config, ArraySpec.of(arrays), cohort)
        seconds = time.perf_counter() - started
    totals = grid.traffic.totals()
    return {
        "aggregation": config.aggregation, "devices": devices, "round_seconds": seconds,
        "server_seconds": seconds - grid.traffic.node_seconds, "seconds_per_device": grid.traffic.node_seconds / devices,
        **totals, "messages_by_stage": grid.traffic.messages, "bytes_from_nodes_by_stage": grid.traffic.bytes_from_nodes,
        "parameters": int(sum(a.size for a in arrays_to_numpy(arrays).values())), "result": result, "arrays": arrays,
    }


def quantization_error(config: RunConfig, devices: int) -> dict:
    """The secure round without noise against the plain sum of the same clipped updates."""
    secure = one_round(config, devices)
    decoded = secure["result"].decoded_sum
    global_arrays = arrays_to_numpy(secure["arrays"])
    reference = {k: np.zeros(v.shape, dtype=np.float64) for k, v in global_arrays.items()}
    for node_id, context in node_contexts(config.to_flower(), devices).items():
        metadata = Metadata(
            run_id=7, message_id=f"reference-{node_id}", src_node_id=1, dst_node_id=node_id, reply_to_message_id="",
            group_id="1", created_at=0.0, ttl=DEFAULT_TTL, message_type="train",
        )
        content = RecordDict({wire.ARRAYS: secure["arrays"], wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1, wire.SHARD_USERS: [0]})})
        trained = arrays_to_numpy(app(make_message(metadata, content), context).content.array_records[wire.ARRAYS])
        for k in reference:
            reference[k] += trained[k].astype(np.float64) - global_arrays[k]
    errors = np.concatenate([(decoded[k] - reference[k]).ravel() for k in reference])
    row = secure["result"].row
    return {
        "max_error": float(np.max(np.abs(errors))), "rms_error": float(np.sqrt(np.mean(errors**2))),
        "bound": row["quantization_error_bound"], "bits": row["quantization_bits"], "clipping_range": row["clipping_range"],
    }


def measure(devices: int, shares: int) -> dict:
    """The plain round, the secure round (both sigma 1) and the secure round's quantization error, for n devices."""
    plain = one_round(run_config(devices, "plain", 1.0, 0), devices)
    secure = one_round(run_config(devices, "secagg+", 1.0, shares), devices)
    error = quantization_error(run_config(devices, "secagg+", 0.0, shares), devices)
    keep = ("devices", "round_seconds", "server_seconds", "seconds_per_device", "messages", "bytes_to_nodes", "bytes_from_nodes", "parameters")
    row = secure["result"].row
    return {
        "devices": devices, "shares": row["shares"], "threshold": row["threshold"], "survivors": row["survivors"],
        "plain": {k: plain[k] for k in keep}, "secure": {k: secure[k] for k in keep} | {"messages_by_stage": secure["messages_by_stage"], "bytes_from_nodes_by_stage": secure["bytes_from_nodes_by_stage"]},
        "quantization": error, "sum_noise_std": row["sum_noise_std"], "device_noise_std": row["device_noise_std"],
        "commit": _commit(), "machine": f"{platform.machine()} {torch.get_num_threads()} thread(s)",
    }


def table(results: list[dict]) -> str:
    """The docs/benchmarks.md section."""
    lines = [
        "| devices a round | parameters | shares / threshold | aggregation | messages | MB to devices | MB from devices | round s (one core) | server s | s per device | quantization error max / rms (bound) | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: r["devices"]):
        for name in ("plain", "secure"):
            m = r[name]
            q = r["quantization"]
            error = f"{q['max_error']:.2g} / {q['rms_error']:.2g} ({q['bound']:.2g}, {q['bits']} bits)" if name == "secure" else "-"
            shares = f"{r['shares']} / {r['threshold']}" if name == "secure" else "-"
            lines.append(
                f"| {r['devices']:,} | {m['parameters']:,} | {shares} | {'SecAgg+' if name == 'secure' else 'plain (trusted server)'} | {m['messages']:,} | "
                f"{m['bytes_to_nodes'] / 1e6:.2f} | {m['bytes_from_nodes'] / 1e6:.2f} | {m['round_seconds']:.2f} | {m['server_seconds']:.2f} | "
                f"{m['seconds_per_device'] * 1000:.1f} ms | {error} | {r['commit']} |"
            )
    return "\n".join(lines + [
        "",
        "One round, user-level DP at sigma 1, C 1, the model of the synthetic catalogue the n users touch (at most 1,000 items, dim 32, one block; FedSGD devices), "
        "every device sampled; `server.train_round.train_round` on the in-process Grid of real ClientApps "
        "(benchmarks/secure_aggregation.py: protobuf bytes as Flower sends them, devices one after another on one core, no network). "
        "Quantization error: per coordinate of the decoded sum against the plain sum of the same clipped updates, noise off.",
        "",
        *sorted({"    " + r.get("command", "python -m fedinterest.benchmarks.secure_aggregation") for r in results}),
    ])


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    """Measure the cases, store each result and rewrite the docs/benchmarks.md section."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--shares-above", default="100=21", help="N=K: rounds of more than N devices use SecAgg+ with K neighbours (0 = every node)")
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-docs", action="store_true", help="print the table without rewriting docs/benchmarks.md")
    parser.add_argument("--table-only", action="store_true", help="measure nothing: the table from the stored results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    limit, large_shares = (int(x) for x in args.shares_above.split("="))
    results = []
    for devices in [] if args.table_only else args.devices:
        started = time.perf_counter()
        result = measure(devices, large_shares if devices > limit else 0)
        result["command"] = "python -m fedinterest.benchmarks.secure_aggregation " + " ".join(argv if argv is not None else sys.argv[1:])
        store_result(args.results, f"devices-{devices}", result)
        results.append(result)
        print(f"{devices} devices: {time.perf_counter() - started:.0f} s", flush=True)
    stored = {r["devices"]: r for r in (_load(p) for p in sorted(args.results.glob("devices-*.json")))}
    stored |= {r["devices"]: r for r in results}
    text = table(list(stored.values()))
    if args.no_docs:
        print(text)
    else:
        publish(args.docs, SECTION, text)


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
