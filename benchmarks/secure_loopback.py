"""Secure against plain aggregation on the TLS federation on loopback: messages, bytes, seconds a round.

One federation (benchmarks/loopback_federation.py: the operator's SuperLink with TLS and
SuperNode authentication, n enrolled devices, all started with the product's commands)
runs `server run` several times, plain and `aggregation = "secagg+"` alternately (plain,
secure, plain, secure, ...), every run R rounds of all n devices with user-level DP
(sigma 1, C 0.5: the trusted server adds the noise under plain, the devices under SecAgg+).
Alternating runs on the same processes puts both under the same load, which on a shared
machine moves the seconds far more than anything measured; the ratio is the figure.

Per training round:

- messages: the train messages the devices received plus their replies, from each
  device's Flower log ("Receiving: train message" ... "Sent successfully"); checked
  against the ServerApp's own count (secure_aggregation.jsonl's `messages` under SecAgg+,
  metrics.jsonl's sampled + answered under plain);
- bytes to and from the devices: each device reaches the SuperLink through its own byte
  counting relay (benchmarks/tcp_meter.py), so these are the bytes on the wire: TLS,
  HTTP/2 and gRPC framing, the messages, and Flower's polling. A message's bytes are
  those of its device's connection from the device's previous reply to this one, so the
  polling while a device waits for the next stage counts to the round it waits in;
- seconds: the ServerApp's own timings.jsonl, the round without its federated evaluation
  (only the run's last round has one) and the part from sending the train messages to
  decoding the sum or the last reply ("protocol s").

    python -m fedinterest.benchmarks.secure_loopback --devices 3 --rounds 2 --pairs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedinterest.benchmarks.deployment_load import RUN_SETTINGS
from fedinterest.benchmarks.loopback_federation import Device, Federation, federation
from fedinterest.benchmarks.report import publish, store_result
from fedinterest.benchmarks.tcp_meter import Counts, Relay
from fedinterest.common.run_files import METRICS_FILE, TIMINGS_FILE, read_jsonl
from fedinterest.server.secure_rounds import SECURE_ROUNDS_FILE
from fedinterest.simulations.provenance import git_commit

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "secure_loopback"
SECTION = "secure-loopback"
AGGREGATIONS = ("plain", "secagg+")
STAGES = {"plain": 1, "secagg+": 4}  # train messages per device and round: SecAgg+'s four protocol stages
USER_DP = ["user-noise-multiplier=1.0", "user-clip-norm=0.5", "user-delta=0.01"]


def settings(aggregation: str, devices: int, rounds: int) -> list[str]:
    """One run: every device each round, federated evaluation only at the last round."""
    return [f"num-server-rounds={rounds}", f"clients-per-round={devices}", f"eval-every={rounds}", *RUN_SETTINGS, *USER_DP,
            f"aggregation={aggregation}"]


def device_rounds(device: Device, counts: Counts, start: float, end: float, stages: int) -> list[dict]:
    """This device's train messages of the run in (start, end], grouped into rounds of `stages`, with their bytes."""
    rounds: list[dict] = []
    previous = start
    train = 0
    for kind, received, sent in device.messages():
        if received <= start or received > end:  # another run's
            continue
        if kind == "train":
            if train % stages == 0:
                rounds.append({"messages": 0, "bytes_to_devices": 0, "bytes_from_devices": 0, "stages": []})
            to_device, from_device = counts.between(previous, sent)
            rounds[-1]["messages"] += 2  # the message and its reply
            rounds[-1]["bytes_to_devices"] += to_device
            rounds[-1]["bytes_from_devices"] += from_device
            rounds[-1]["stages"].append([to_device, from_device])  # where in the protocol the bytes go
            train += 1
        previous = sent
    return rounds


def one_run(fed: Federation, relays: dict[str, Relay], aggregation: str, rounds: int) -> dict:
    """One `server run` of `aggregation`: its rounds' messages, bytes and seconds, and the server's own counts."""
    devices = len(fed.devices)
    load_before = os.getloadavg()[0]
    start = time.monotonic()
    state, wall = fed.run(settings(aggregation, devices, rounds))
    time.sleep(1.0)  # the last replies' log lines reach the readers
    end = time.monotonic()
    run_dir = Path(state["run_dir"])
    timings = read_jsonl(run_dir / TIMINGS_FILE)
    metrics = read_jsonl(run_dir / METRICS_FILE)
    secure = read_jsonl(run_dir / SECURE_ROUNDS_FILE)
    per_device = [device_rounds(d, relays[d.name].counts, start, end, STAGES[aggregation]) for d in fed.devices]
    out = []
    for r, (timing, row) in enumerate(zip(timings, metrics)):
        here = [rounds_of[r] for rounds_of in per_device if r < len(rounds_of)]
        server_count = secure[r]["messages"] if aggregation == "secagg+" and r < len(secure) else row["sampled"] + row["answered"]
        out.append({
            "round": timing["round"], "devices_answered": len(here), "server_messages": server_count,
            **{k: sum(x[k] for x in here) for k in ("messages", "bytes_to_devices", "bytes_from_devices")},
            "bytes_by_stage": [[sum(x["stages"][i][j] for x in here) for j in (0, 1)] for i in range(STAGES[aggregation])],
            "seconds": round(timing["seconds"] - (timing["evaluation_seconds"] or 0.0), 3), "protocol_seconds": timing["devices_seconds"],
        })
    return {
        "aggregation": aggregation, "rounds": out, "run_seconds": round(wall, 1), "load_average": [load_before, os.getloadavg()[0]],
        "completed": bool(state["completed"]), "answered": state["devices"]["answered"], "failed": state["devices"]["failed"],
        "secure_rows": secure,
    }


def measure(devices: int, rounds: int, pairs: int, work: Path) -> dict:
    """A federation of n devices behind byte-counting relays; `pairs` plain and secure runs, alternated."""
    relays: dict[str, Relay] = {}

    def through_relay(name: str, port: int) -> str:
        relays[name] = Relay(port)
        return f"127.0.0.1:{relays[name].port}"

    runs = []
    try:
        with federation(devices, work, address=through_relay) as fed:
            for _ in range(pairs):
                for aggregation in AGGREGATIONS:
                    runs.append(one_run(fed, relays, aggregation, rounds))
                    print(f"{devices} devices, {aggregation}: {runs[-1]['run_seconds']:.0f} s", flush=True)
    finally:
        for relay in relays.values():
            relay.close()
    return {"devices": devices, "rounds_per_run": rounds, "pairs": pairs, "runs": runs, "run_settings": settings("<aggregation>", devices, rounds)}


def summary(result: dict) -> dict[str, dict]:
    """Per aggregation: the mean per round of every figure over the runs' rounds, and their count."""
    out: dict[str, dict[str, Any]] = {}
    for aggregation in AGGREGATIONS:
        runs = [run["rounds"] for run in result["runs"] if run["aggregation"] == aggregation]
        rounds = [r for run in runs for r in run]
        # A run's first round also carries each device's download of the app bundle (FAB), fetched
        # once per run: bytes are the later rounds', the first round's excess is shown apart.
        later = [r for run in runs for r in run[1:]] or rounds
        first = [run[0] for run in runs]
        keys = ("messages", "server_messages", "seconds", "protocol_seconds")
        out[aggregation] = {"rounds": len(rounds), **{k: statistics.fmean(r[k] for r in rounds) for k in keys}}
        out[aggregation] |= {k: statistics.fmean(r[k] for r in later) for k in ("bytes_to_devices", "bytes_from_devices")}
        out[aggregation]["first_round_extra_to_devices"] = statistics.fmean(r["bytes_to_devices"] for r in first) - out[aggregation]["bytes_to_devices"]
        out[aggregation]["seconds_each"] = [r["seconds"] for r in rounds]
    return out


def table(results: list[dict]) -> str:
    """The docs/benchmarks.md section: a row per aggregation and a ratio row per federation size."""
    lines = [
        "| devices | aggregation | rounds | messages a round (server's count) | MB to devices a round | MB from devices a round | + MB to devices in a run's first round | round s (each, run order) | round s mean | protocol s mean | load avg | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in sorted(results, key=lambda r: r["devices"]):
        s = summary(result)
        loads = [x for run in result["runs"] for x in run["load_average"]]
        for aggregation, name in zip(AGGREGATIONS, ("plain (trusted server)", "SecAgg+")):
            m = s[aggregation]
            lines.append(
                f"| {result['devices']} | {name} | {m['rounds']} | {m['messages']:.0f} ({m['server_messages']:.0f}) | {m['bytes_to_devices'] / 1e6:.3f} | "
                f"{m['bytes_from_devices'] / 1e6:.3f} | {m['first_round_extra_to_devices'] / 1e6:.2f} | {', '.join(f'{x:.1f}' for x in m['seconds_each'])} | {m['seconds']:.1f} | {m['protocol_seconds']:.1f} | "
                f"{min(loads):.1f}–{max(loads):.1f} | {result['commit']} |"
            )
        p, q = s["plain"], s["secagg+"]
        ratio = {k: q[k] / p[k] if p[k] else float("nan") for k in ("messages", "bytes_to_devices", "bytes_from_devices", "seconds", "protocol_seconds")}
        lines.append(
            f"| {result['devices']} | **SecAgg+ / plain** | | **{ratio['messages']:.1f}×** | **{ratio['bytes_to_devices']:.2f}×** | **{ratio['bytes_from_devices']:.2f}×** | | | "
            f"**{ratio['seconds']:.1f}×** | **{ratio['protocol_seconds']:.1f}×** | | |"
        )
    return "\n".join(lines + [
        "",
        "Bytes on the wire between each device and the SuperLink (TLS records, HTTP/2 and gRPC framing, Flower's polling "
        "while a device waits), counted by a relay per device, in the rounds after a run's first (which adds each device's "
        "download of the app bundle, the next column); round s: the ServerApp's timings.jsonl without the federated "
        "evaluation; protocol s: from sending the train messages to the decoded sum (SecAgg+) or the last reply (plain).",
        "",
        *sorted({"    " + r["command"] for r in results}),
    ])


def main(argv: list[str] | None = None) -> None:
    """Measure each federation size, store its result and rewrite the docs/benchmarks.md section."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[3])
    parser.add_argument("--rounds", type=int, default=2, help="rounds per run")
    parser.add_argument("--pairs", type=int, default=2, help="plain and secure runs, alternated")
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-docs", action="store_true", help="print the table without rewriting docs/benchmarks.md")
    parser.add_argument("--table-only", action="store_true", help="measure nothing: the table from the stored results")
    args = parser.parse_args(argv)
    command = "python -m fedinterest.benchmarks.secure_loopback " + " ".join(argv if argv is not None else sys.argv[1:])
    for devices in [] if args.table_only else args.devices:
        with tempfile.TemporaryDirectory(prefix="fedinterest-secure-loopback-") as tmp:
            result = measure(devices, args.rounds, args.pairs, Path(tmp))
        result |= {"commit": git_commit(REPO), "command": command}
        store_result(args.results, f"devices-{devices}", result)
    results = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(args.results.glob("devices-*.json"))]
    text = table(results)
    if args.no_docs:
        print(text)
    else:
        publish(args.docs, SECTION, text)


if __name__ == "__main__":
    main()
