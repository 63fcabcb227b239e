"""The privacy report of a finished simulation (privacy_report.json/.md): every figure with its unit and assumptions."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedinterest.common.run_config import RunConfig
from fedinterest.common.run_files import (
    DEVICES_DIR,
    EPSILON_MAX,
    EPSILON_MEAN,
    FinalReport,
    RoundRow,
    device_epsilon,
    json_number,
)
from fedinterest.simulations.simulation_config import SimulationConfig

# What on-device DP-SGD protects (common/examples.py defines the training example).
UNIT_OF_PROTECTION = (
    "one training example of one device: a window of up to max-len consecutive "
    "(input item, next item) pairs of the user's training history, added or removed "
    "(layer 1, on-device DP-SGD; the window count stays on the device)"
)
SEEDED_NOISE_WARNING = (
    "research-noise-seed is set: every DP noise draw and the layer-2 sampling follow from it, so anyone "
    "who knows the seed can reproduce the noise; the privacy figures of this run do not hold"
)
USER_LEVEL_NOTE = (
    "not applied: this run has no server-side DP-FedAvg (layer 2), so a user's whole "
    "history is protected only through the per-example guarantee and its group privacy"
)


def ledger_epsilons(run_dir: Path, delta: float) -> dict[str, tuple[float, int]]:
    """Per user account in the node ledgers under `{run_dir}/devices/`: (epsilon at `delta`, rounds charged).

    The ledger is the devices' own accountant state, so this is the device-side figure,
    recomputed with Opacus's RDP accountant; the ServerApp's figure is what devices reported.
    Keys name the user by its index in the dataset.
    """
    from fedinterest.client.ledger import PrivacyLedger

    found: dict[str, tuple[float, int]] = {}
    for path in sorted((run_dir / DEVICES_DIR).glob("*.sqlite")):
        with PrivacyLedger(path) as node:
            for user in node.users():
                account = node.for_user(user)
                found[f"user-{user}"] = (account.epsilon(delta), len(account.entries()))
    return found


def privacy_report(
    config: SimulationConfig, rows: Sequence[RoundRow], final: FinalReport, ledgers: Mapping[str, tuple[float, int]] | None = None
) -> dict[str, Any]:
    """The privacy facts of a finished run, each with its unit and assumptions."""
    run = config.run
    eps_max, eps_mean = device_epsilon(final, rows)
    counts = final.counts
    per_round_refused = [int(r.number("refused") or 0) for r in rows]
    refused_total = counts.get("refused")
    server = final.privacy
    report: dict[str, Any] = {
        "dp": run.private,
        "layer": "1: on-device DP-SGD (Opacus); each device keeps its own accountant in its privacy ledger"
        + ("; and 2: user-level DP-FedAvg on the server (see user_level)" if run.user_private else ""),
        "unit_of_protection": UNIT_OF_PROTECTION,
        "user_level": _user_level(server.user_level, run),
        "aggregation": run.aggregation,  # "secagg+": the server learns only the sum (Flower's SecAgg+)
        "accountant": "Opacus RDPAccountant (RDP), recomputed by each device from its ledger" if run.private else None,
        "delta": run.delta,
        "epsilon_budget": run.epsilon_budget,
        "noise_multiplier": run.noise_multiplier,
        "max_grad_norm": run.max_grad_norm,
        "expected_batch_size": run.batch_size,
        "local_epochs": run.local_epochs,
        "devices": config.federation.num_supernodes,
        "device_epsilon": {
            "max": json_number(eps_max if run.private else math.inf),
            "mean": json_number(eps_mean if run.private else math.inf),
            "devices_reporting": server.get("devices_reporting"),
            "source": "final.json: the highest cumulative epsilon each device reported to the server",
            "meaning": "cumulative example-level epsilon of each device at the run's delta, over the devices that reported one",
        },
        "refusals": {
            "device_rounds": int(refused_total) if refused_total is not None else sum(per_round_refused),
            "rounds_with_refusals": sum(1 for n in per_round_refused if n > 0),
            "meaning": "a device refuses to train when one more round would take it past the budget; "
            "the ServerApp counts refusals per round, not which devices they came from",
        },
        "per_round": [
            {
                "round": r.round,
                "epsilon_max": json_number(r.number(EPSILON_MAX)),
                "epsilon_mean": json_number(r.number(EPSILON_MEAN)),
                "refused": r.get("refused"),
            }
            for r in rows
        ],
    }
    if ledgers is not None:
        trained = sorted(eps for eps, charged in ledgers.values() if charged > 0)
        finite = [e for e in trained if math.isfinite(e)]
        report["ledgers"] = {
            "source": f"{DEVICES_DIR}/*.sqlite, epsilon recomputed here with Opacus's RDP accountant at the run's delta",
            "devices_with_ledger": len(ledgers),
            "devices_trained": len(trained),
            "epsilon_max": json_number(max(trained)) if trained else None,
            "epsilon_mean": json_number(sum(finite) / len(finite)) if finite and len(finite) == len(trained) else None,
            "epsilon_median": json_number(trained[len(trained) // 2]) if trained else None,
            "devices_over_budget": sum(1 for e in trained if e > run.epsilon_budget),
        }
    if not run.private:
        report["note"] = "noise-multiplier = 0: DP-SGD is off; no clipping, no noise, epsilon is infinite"
    report["noise_source"] = "research-noise-seed (reproducible)" if run.noise_seeded else "OS entropy"
    if run.noise_seeded:
        report["warning"] = SEEDED_NOISE_WARNING
    return report


def _user_level(user: dict[str, Any] | None, run: RunConfig) -> dict[str, Any] | str:
    """Layer 2's figures from final.json (server/user_privacy.py), or why there are none."""
    if not run.user_private or user is None:
        return USER_LEVEL_NOTE
    return user


def _user_level_line(user: Mapping[str, Any] | str) -> str:
    if isinstance(user, str):
        return user
    return (
        f"epsilon {user['epsilon']:.4g} at delta {user['delta']:.3g} after {user['rounds_accounted']} rounds "
        f"(budget {user['epsilon_budget']:g}; DP-FedAvg: update clip {user['clip_norm']:g}, noise multiplier "
        f"{user['noise_multiplier']:g}, {user['sampling']} sampling of devices, {user['accountant']} accountant): {user['unit']}"
        + (f"; noise: {user['mechanism_detail']}" if user.get("mechanism_detail") else "")
    )


def privacy_markdown(report: Mapping[str, Any]) -> str:
    """The privacy report as a short Markdown page."""
    eps = report["device_epsilon"]
    ref = report["refusals"]

    def fmt(value: Any) -> str:
        if value is None:
            return "not measured"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = [
        "# Privacy report",
        "",
        *([f"**Warning**: {report['warning']}.", ""] if report.get("warning") else []),
        f"- **Differential privacy**: {'on' if report['dp'] else 'off'} (layer {report['layer']})",
        f"- **Unit of protection**: {report['unit_of_protection']}",
        f"- **User level (layer 2)**: {_user_level_line(report['user_level'])}",
        f"- **Aggregation**: {report.get('aggregation', 'plain')}"
        + (" (Flower's SecAgg+: the server learns only the sum of the devices' vectors)" if report.get("aggregation") == "secagg+" else " (the server sees each update)"),
        f"- **Accountant**: {fmt(report['accountant'])}",
        f"- **delta**: {fmt(report['delta'])}",
        f"- **Budget per device**: epsilon {fmt(report['epsilon_budget'])} at that delta; a device refuses to train "
        "once one more round would exceed it",
        f"- **DP-SGD**: noise multiplier {fmt(report['noise_multiplier'])}, clipping norm {fmt(report['max_grad_norm'])}, "
        f"expected batch size {report['expected_batch_size']} (Poisson sampling), {report['local_epochs']} local epoch(s) per round",
        "",
        "| devices | reporting | epsilon max | epsilon mean | refusals (device-rounds) | rounds with refusals |",
        "|---|---|---|---|---|---|",
        f"| {fmt(report['devices'])} | {fmt(eps.get('devices_reporting'))} | {fmt(eps['max'])} | {fmt(eps['mean'])} "
        f"| {ref['device_rounds']} | {ref['rounds_with_refusals']} |",
        "",
        f"Epsilon is the {eps['meaning']} ({eps['source']}). Refusals: {ref['meaning']}.",
    ]
    ledgers = report.get("ledgers")
    if ledgers:
        lines += [
            "",
            f"Device ledgers ({ledgers['source']}): {ledgers['devices_trained']} of {ledgers['devices_with_ledger']} "
            f"devices trained at least once; epsilon max {fmt(ledgers['epsilon_max'])}, mean {fmt(ledgers['epsilon_mean'])}, "
            f"median {fmt(ledgers['epsilon_median'])}; {ledgers['devices_over_budget']} over the budget.",
        ]
    if report.get("note"):
        lines += ["", f"Note: {report['note']}."]
    if report["per_round"]:
        lines += ["", "| round | epsilon max | epsilon mean | refused |", "|---|---|---|---|"]
        lines += [f"| {r['round']} | {fmt(r['epsilon_max'])} | {fmt(r['epsilon_mean'])} | {fmt(r['refused'])} |" for r in report["per_round"]]
    return "\n".join(lines) + "\n"

