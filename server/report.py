"""`server report`: a run's plots (common/run_plots.py) and a summary table, from its run directory."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedinterest.common.run_config import RunConfig
from fedinterest.common.run_files import (
    DEVICE_EPSILON_MAX,
    DEVICE_EPSILON_MEAN,
    EPSILON_MAX,
    EPSILON_MEAN,
    EPSILON_PNG,
    METRIC_KEYS,
    NDCG_10,
    NDCG_PNG,
    REPLY_COUNTS,
    FinalReport,
    PrivacySummary,
    RoundRow,
    as_number,
    read_rows,
)
from fedinterest.common.run_plots import plot_epsilon, plot_ndcg
from fedinterest.common.serialization import atomic_write_text
from fedinterest.server.catalogue_build import read_popularity
from fedinterest.server.deployment import Deployment
from fedinterest.server.run_admin import find_run, read_record
from fedinterest.server.run_outcome import outcome

REPORT_MD = "report.md"
# The per-round table leaves out "empty" replies (no user trained, not all refused); the summary counts them.
ROUND_COLUMNS = ("round", *(k for k in REPLY_COUNTS if k != "empty"), "train_loss", EPSILON_MAX, EPSILON_MEAN, "user_epsilon", *METRIC_KEYS, "seconds")


def _fmt(value: Any) -> str:
    number = as_number(value)
    if number is None:
        return "-" if value is None else str(value)
    if math.isinf(number):
        return "inf"
    return str(int(number)) if float(number).is_integer() and abs(number) < 1e12 else f"{number:.4g}"


def summary(
    run_dir: Path, rows: list[RoundRow], final: FinalReport | None, config: RunConfig, record: dict[str, Any],
    popularity: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The numbers of the report (also its `--json`)."""
    privacy = final.privacy if final is not None else PrivacySummary({})
    devices = {key: int(sum(r.number(key) or 0 for r in rows)) for key in REPLY_COUNTS}
    verdict = outcome(final, rows, devices)
    return {
        "run": run_dir.name,
        "run_id": str(record["run_id"]),  # text: 64-bit ids survive every JSON reader
        "rounds_done": len(rows),
        "rounds_planned": config.num_server_rounds,
        "finished": final is not None,
        "trained": verdict["trained"],
        "outcome": verdict["verdict"],
        "outcome_why": verdict["why"],
        "devices": devices,
        "valid": final.get("valid") if final else None,
        "test": final.get("test") if final else None,
        "best_valid": final.get("best_valid") if final else None,
        "epsilon_max": privacy.get(DEVICE_EPSILON_MAX),
        "epsilon_mean": privacy.get(DEVICE_EPSILON_MEAN),
        "delta": config.delta,
        "epsilon_budget": config.epsilon_budget,
        "dp": config.private,
        # Layer 2 (DP-FedAvg on the server), None when the run did not use it.
        "user_level": privacy.get("user_level"),
        "stopped_early": final.get("stopped_early") if final else None,
        "wall_seconds": final.get("wall_seconds") if final else None,
        # From `server catalogue` (server/catalogue_build.py); None for a catalogue made elsewhere.
        "popularity_baseline": popularity,
    }


def markdown(facts: dict[str, Any], rows: list[RoundRow]) -> str:
    """The report page: the summary, then one line per round."""
    lines = [
        f"# Run {facts['run']} (Flower run {facts['run_id']})",
        "",
        "| rounds | devices sampled | answered | refused | failed | rejected | epsilon max | epsilon mean | delta | budget |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {facts['rounds_done']} of {facts['rounds_planned']} | " + " | ".join(_fmt(facts["devices"][k]) for k in ("sampled", "answered", "refused", "failed", "rejected"))
        + f" | {_fmt(facts['epsilon_max']) if facts['dp'] else 'inf (DP off)'} | {_fmt(facts['epsilon_mean']) if facts['dp'] else 'inf'}"
        + f" | {_fmt(facts['delta'])} | {_fmt(facts['epsilon_budget'])} |",
        "",
    ]
    if facts.get("outcome_why"):
        lines += [f"**Nothing trained.** {facts['outcome_why'][0].upper()}{facts['outcome_why'][1:]}.", ""]
    user = facts.get("user_level")
    if user:
        lines += [
            f"User level (layer 2, DP-FedAvg): epsilon {_fmt(user['epsilon'])} at delta {_fmt(user['delta'])} "
            f"after {user['rounds_accounted']} rounds, budget {_fmt(user['epsilon_budget'])}; noise: {user.get('mechanism_detail', 'added by the server')}"
            + (f"; the run stopped early ({facts['stopped_early']})." if facts.get("stopped_early") else "."),
            "",
        ]
    if facts["finished"]:
        metrics = sorted({*(facts.get("valid") or {}), *(facts.get("test") or {})})
        lines += ["| split | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        for split in ("valid", "test"):
            values = facts.get(split) or {}
            lines.append(f"| {split} (final model) | " + " | ".join(_fmt(values.get(m)) for m in metrics) + " |")
        popular = (facts.get("popularity_baseline") or {}).get("popularity_test")
        if popular:
            lines.append("| test, popularity baseline* | " + " | ".join(_fmt(popular.get(m)) for m in metrics) + " |")
        lines += ["", "Metrics: leave-one-out on each device, full-catalogue ranking, averaged over the devices that answered.", ""]
        baseline = facts.get("popularity_baseline")
        lines += ([f"\\* Popularity baseline of the catalogue's source file {baseline['source']} ({baseline['users_evaluated']} users): "
                   "the same protocol on the operator's data, not on the devices' histories.", ""] if baseline else
                  ["No popularity baseline: the catalogue was not built with `fedinterest server catalogue`, and the server holds no interactions.", ""])
    else:
        lines += ["The run has not finished: no final metrics yet.", ""]
    lines += ["| " + " | ".join(ROUND_COLUMNS) + " |", "|" + "---|" * len(ROUND_COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in ROUND_COLUMNS) + " |" for r in rows]
    lines += ["", f"Plots: {NDCG_PNG} (validation NDCG@10 per round), {EPSILON_PNG} (device epsilon per round).", ""]
    return "\n".join(lines)


def write_report(deployment: Deployment, ref: str | None, out: Path | None = None) -> tuple[dict[str, Any], str, Path]:
    """Plots and report.md of run `ref` in `out` (default: the run directory); (summary, markdown, directory)."""
    run_dir = find_run(deployment, ref)
    record = read_record(run_dir)
    config = RunConfig.from_flower(record["run_config"])
    rows = read_rows(run_dir)
    final = FinalReport.read(run_dir)
    target = Path(out) if out is not None else run_dir
    target.mkdir(parents=True, exist_ok=True)
    facts = summary(run_dir, rows, final, config, record, read_popularity(deployment.catalogue))
    test_ndcg = final.split("test").get(NDCG_10) if final else None
    popular = as_number(((facts["popularity_baseline"] or {}).get("popularity_test") or {}).get(NDCG_10))
    plot_ndcg(rows, target / NDCG_PNG, final_test=test_ndcg, baseline=popular)
    plot_epsilon(rows, target / EPSILON_PNG, budget=config.epsilon_budget if config.private else None)
    text = markdown(facts, rows)
    atomic_write_text(target / REPORT_MD, text)
    facts["files"] = [str(target / name) for name in (REPORT_MD, NDCG_PNG, EPSILON_PNG)]
    return facts, text, target
