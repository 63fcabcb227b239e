"""Deployment load: N SuperNodes on loopback with TLS and node authentication, rounds to completion.

    python -m fedinterest.benchmarks.deployment_load --devices 20 --rounds 3            # resident ClientApp (default)
    python -m fedinterest.benchmarks.deployment_load --devices 3 --rounds 2 --process-per-message --label per-message
    ... --no-write   # print only; otherwise the result is kept in benchmarks/results/deployment_load/ and
                     # docs/benchmarks.md's deployment-load section is rewritten from every kept result

Everything is the product's own commands as a person runs them: `server init` (a CA, a
certificate for 127.0.0.1), `server start` (Flower's SuperLink, TLS, SuperNode
authentication, its SQLite database), per device `device init`, `device ingest` (30
interactions of its own user), `server enroll`, `device start` (Flower's SuperNode), and
one `server run --wait`. Measured:

- seconds per device message: each device's output is read line by line by this script
  and timestamped on arrival; a message's time runs from Flower's "Receiving: ... message"
  to the next "Sent successfully" (pull, ClientApp, push), by message type;
- seconds per round: the ServerApp's own `seconds` of each metrics.jsonl row (train, and
  the federated evaluation when the round has one);
- memory: proportional set size (PSS, /proc/PID/smaps_rollup: shared pages split among
  the processes sharing them, so forked ClientApp tasks are not counted twice) of each
  process tree, sampled every 2 s; the peak of the SuperLink tree (SuperLink + ServerApp)
  and of each device tree (`device start`, SuperNode, ClientApp processes);
- nothing lost: Flower's status is finished:completed, every round ran, every sampled
  device answered and none failed, and every device's ledger holds one charged round per
  round (`device budget --json`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
from pathlib import Path

from fedinterest.benchmarks.loopback_federation import cli, federation
from fedinterest.benchmarks.report import publish
from fedinterest.common.run_files import read_rows
from fedinterest.simulations.provenance import git_commit

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = REPO / "docs" / "benchmarks.md"
RESULTS = REPO / "benchmarks" / "results" / "deployment_load"
# Noise 2 lets a 30-interaction device (one batch, q = 1) train 9 rounds within epsilon 8.
RUN_SETTINGS = ["dim=16", "max-len=20", "num-blocks=1", "batch-size=8", "noise-multiplier=2.0", "round-timeout=900"]


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def _pss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


class MemorySampler:
    """Peak PSS of named process trees, sampled every `every` seconds in a thread."""

    def __init__(self, roots: dict[str, int], every: float = 2.0) -> None:
        self.roots, self.every = roots, every
        self.peak: dict[str, float] = {name: 0.0 for name in roots}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            for name, pid in self.roots.items():
                self.peak[name] = max(self.peak[name], _pss_mib(_tree(pid)))

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(devices: int, rounds: int, resident: bool, work: Path) -> dict:
    """One federation of `devices` SuperNodes, one run of `rounds` rounds; the figures of the module docstring."""
    with federation(devices, work, [] if resident else ["--process-per-message"]) as fed:
        started = fed.devices
        roots = {"superlink": fed.superlink.pid, **{d.name: d.process.pid for d in started}}
        settings = [f"num-server-rounds={rounds}", f"clients-per-round={devices}", f"eval-every={rounds}", *RUN_SETTINGS]
        with MemorySampler(roots) as memory:
            state, run_seconds = fed.run(settings)
        run_dir = Path(state["run_dir"])
        rows = [row.raw for row in read_rows(run_dir)]  # joined with timings.jsonl's seconds
        ledgers = {d.name: cli(["device", "budget", "--dir", str(d.directory)], fed.env)["rounds"] for d in started}
        online_seconds = fed.online_seconds
    messages: dict[str, list[float]] = {}
    for device in started:
        for kind, seconds in device.message_seconds():
            messages.setdefault(kind, []).append(seconds)
    device_peaks = [memory.peak[d.name] for d in started]
    lost = {
        "flower_status": state["status"],
        "rounds_done": state["rounds_done"],
        "sampled": state["devices"]["sampled"],
        "answered": state["devices"]["answered"],
        "failed": state["devices"]["failed"],
        "refused": state["devices"]["refused"],
        "devices_charged_every_round": sum(1 for n in ledgers.values() if n == rounds),
    }
    return {
        "devices": devices, "rounds": rounds, "clientapp": "resident" if resident else "per-message",
        "run_seconds": round(run_seconds, 1), "online_seconds": round(online_seconds, 1),
        "round_seconds": [row["seconds"] for row in rows],
        "message_seconds": {kind: {"n": len(v), "median": round(statistics.median(v), 2), "max": round(max(v), 2)} for kind, v in sorted(messages.items())},
        "superlink_peak_pss_mib": round(memory.peak["superlink"], 1),
        "device_peak_pss_mib": {"median": round(statistics.median(device_peaks), 1), "max": round(max(device_peaks), 1)},
        "nothing_lost": lost,
        "complete": state["completed"] and lost["rounds_done"] == rounds and lost["answered"] == lost["sampled"] == devices * rounds
        and lost["failed"] == 0 and lost["devices_charged_every_round"] == devices,
        "run_settings": RUN_SETTINGS,
    }


def table(results: list[dict]) -> str:
    """The markdown table of every kept result."""
    lines = [
        "| devices x rounds | ClientApp | s per train message (median / max) | s per evaluate message | s per round | run s | SuperLink peak PSS MiB | device peak PSS MiB (median / max) | nothing lost | commit | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        train, evaluate = r["message_seconds"].get("train", {}), r["message_seconds"].get("evaluate", {})
        lost = r["nothing_lost"]
        verdict = (f"yes: {lost['answered']} of {lost['sampled']} answered, {lost['failed']} failed, {lost['devices_charged_every_round']} of "
                   f"{r['devices']} ledgers charged every round" if r["complete"] else f"NO: {lost}")
        lines.append(
            f"| {r['devices']} x {r['rounds']} | {r['clientapp']} | {train.get('median', '-')} / {train.get('max', '-')} | "
            f"{evaluate.get('median', '-')} / {evaluate.get('max', '-')} | {', '.join(f'{s:.0f}' for s in r['round_seconds'])} | {r['run_seconds']:.0f} | "
            f"{r['superlink_peak_pss_mib']:.0f} | {r['device_peak_pss_mib']['median']:.0f} / {r['device_peak_pss_mib']['max']:.0f} | {verdict} | {r['commit']} | {r['load_average']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Measure one federation; keep the result and (unless --no-write) rewrite the docs section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--process-per-message", action="store_true", help="Flower's default: a new ClientApp process per message.")
    parser.add_argument("--label", default=None, help="Result file name (default: DEVICESxROUNDS-CLIENTAPP).")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedinterest-load-") as tmp:
        result = measure(args.devices, args.rounds, not args.process_per_message, Path(tmp))
    result.update(commit=git_commit(REPO), load_average=os.getloadavg()[0], command=" ".join(["python -m fedinterest.benchmarks.deployment_load", *(argv or sys.argv[1:])]))
    print(json.dumps(result, indent=2))
    if args.no_write:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    label = args.label or f"{args.devices}x{args.rounds}-{result['clientapp']}"
    (RESULTS / f"{label}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    kept = sorted((json.loads(p.read_text()) for p in RESULTS.glob("*.json")), key=lambda r: (r["devices"], r["clientapp"] != "per-message"))
    publish(BENCHMARKS_MD, "deployment-load", table(kept))


if __name__ == "__main__":
    main()
