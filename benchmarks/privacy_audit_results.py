"""The privacy audit's stored results and the section of docs/benchmarks.md built from them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedinterest.benchmarks.privacy_audit_models import DATASET, LABELS, MODELS, TARGET_EPSILON, USER_BUDGET_SLACK
from fedinterest.benchmarks.report import layer1_epsilon, old_relation_note, store_result
from fedinterest.common.run_files import NDCG_10

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "privacy_audit"
QUALITY = REPO / "benchmarks" / "results" / "quality"
TARGET_AUC = 0.55


def store(summary: dict[str, Any]) -> Path:
    """Keep one audit result under RESULTS (benchmarks/report.py's `store_result`)."""
    return store_result(RESULTS, f"{summary['dataset']}-{summary['model']}-{summary['rounds']}x{summary['clients_per_round']}-m{summary['num_members']}", summary)


def _auc(entry: dict[str, float]) -> str:
    return f"{entry['auc']:.3f} ± {entry['se']:.3f}"


def _chosen_ndcg(summary: dict[str, Any]) -> str:
    best = summary.get("best_valid")
    if best and best.get("test"):
        return f"{best['test'][NDCG_10]:.4f} (round {best['round']})"
    return f"{summary['test'][NDCG_10]:.4f} (last round)"


def _user_epsilon(summary: dict[str, Any]) -> str:
    level = summary.get("user_level")
    if not level or level.get("epsilon") is None:
        return "-"
    return f"{level['epsilon']:.2f} ({level['delta']:.3g})"


def stored() -> list[dict[str, Any]]:
    """Every stored audit result, in the order of MODELS, then rounds."""
    found = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(RESULTS.glob("*.json"))]
    order = {name: i for i, name in enumerate(MODELS)}
    return sorted(found, key=lambda s: (order.get(s["model"], len(order)), s["rounds"], s["clients_per_round"], s["num_members"]))


def popularity_ndcg(dataset: str = DATASET) -> float | None:
    """Test NDCG@10 of the popularity baseline (the quality benchmark's stored result), if stored."""
    path = QUALITY / f"{dataset}-sasrec-seed0.json"
    return json.loads(path.read_text(encoding="utf-8"))["popularity_test"][NDCG_10] if path.is_file() else None


def target_sentence(
    results: Sequence[dict[str, Any]], *, target_auc: float = TARGET_AUC, target_epsilon: float = TARGET_EPSILON, popularity: float | None = None
) -> str:
    """Whether the issue's target (attack AUC <= 0.55 for layers 1+2 at epsilon 8) holds, from the results.

    With `popularity` (its test NDCG@10), a model that does not beat it is named as such:
    a model that learned nothing leaks nothing, so its low AUC says little.
    """
    candidates = [s for s in results if s["model"] == "layers-1+2" and (s.get("user_level") or {}).get("epsilon") is not None]
    if not candidates:
        return f"Target (attack AUC ≤ {target_auc} for the layers 1+2 model at user-level ε {target_epsilon:g}): not measured yet (no layers 1+2 result)."
    lines = []
    for s in candidates:
        auc, se = s["attack"]["loss"]["auc"], s["attack"]["loss"]["se"]
        eps = s["user_level"]["epsilon"]
        at_target = eps <= target_epsilon + USER_BUDGET_SLACK
        verdict = "**met**" if auc <= target_auc and at_target else "**missed**"
        why = "" if at_target else f" (the run's user-level ε {eps:.2f} is above {target_epsilon:g})"
        margin = f"; the AUC's 95% interval is {auc - 1.96 * se:.3f}–{auc + 1.96 * se:.3f}"
        lines.append(
            f"Target (attack AUC ≤ {target_auc} for the layers 1+2 model at user-level ε {target_epsilon:g}): {verdict} — "
            f"AUC {auc:.3f} at ε {eps:.2f} ({s['rounds']} rounds x {s['clients_per_round']} devices){why}{margin}."
        )
        if popularity is not None and s["test"][NDCG_10] < popularity:
            lines[-1] += (
                f" But this model does not learn: its test NDCG@10 {s['test'][NDCG_10]:.4f} is below popularity's "
                f"{popularity:.4f}, so the low AUC reflects a model that fits nothing, not privacy at a useful model."
            )
    for s in (s for s in results if s["model"] == "no-dp"):
        loss, calibrated = s["attack"]["loss"], s["attack"]["calibrated"]
        detected = loss["auc"] - 1.96 * loss["se"] > 0.5
        lines.append(
            f"Without DP the attack {'detects' if detected else 'does not clearly detect'} membership: AUC {loss['auc']:.3f} "
            f"(95% interval {loss['auc'] - 1.96 * loss['se']:.3f}–{loss['auc'] + 1.96 * loss['se']:.3f}), calibrated "
            f"{calibrated['auc']:.3f}, at test NDCG@10 {s['test'][NDCG_10]:.4f} ({s['rounds']} rounds x {s['clients_per_round']} devices)."
        )
    useful = [s for s in results if s["model"] == "layer-2" and (s.get("user_level") or {}).get("epsilon") is not None]
    for s in useful:
        auc, eps = s["attack"]["loss"]["auc"], s["user_level"]["epsilon"]
        versus = f" (popularity {popularity:.4f})" if popularity is not None else ""
        lines.append(
            f"Layer 2 alone (devices train without DP) at user-level ε {eps:.2f}: attack AUC {auc:.3f} "
            f"(calibrated {s['attack']['calibrated']['auc']:.3f}), test NDCG@10 {s['test'][NDCG_10]:.4f}{versus}."
        )
    if results:
        control = results[0]["attack"]["control_popularity"]["auc"]
        lines.append(
            f"Chance levels: the loss AUC's is 0.5. The calibrated AUC's is not: for a model that learned nothing "
            f"(a flat loss), the calibrated score is minus the popularity loss plus a constant, so its AUC is "
            f"1 − control AUC = {1 - control:.3f} here."
        )
    return "\n\n".join(lines)


def table(results: Sequence[dict[str, Any]] | None = None) -> str:
    """The section of docs/benchmarks.md: how it was run, the table, and the verdict."""
    results = stored() if results is None else list(results)
    lines = [
        "## Privacy audit: membership inference (issue 5)",
        "",
        "`benchmarks/privacy_audit.py`: on ML-100K, users 0..M-1 of the split train (a simulation with",
        "M virtual devices; the rest never train) and a loss-threshold membership-inference attack",
        "(Yeom et al.) scores members against as many non-members by the final global model's mean",
        "next-item cross-entropy over each user's training history. AUC 0.5 = the attacker learns",
        "nothing; ± is the Hanley-McNeil standard error. *Calibrated* = loss minus the user's loss",
        "under a popularity model; *control* = the popularity loss alone, which has no membership",
        "signal and shows how far the two groups differ by themselves. NDCG@10 is over all users (the",
        "run's test split, at the round validation picks, and at the last round, whose model the attack",
        "uses); *members / non-members NDCG@10* is the final model on each group. Layer 1 ε is the",
        "largest per-device example-level ε; user-level ε is layer 2's accountant (RDP, Poisson sampling",
        "of devices at q = devices per round / M, δ = 1/M), its noise calibrated with Opacus's",
        "`get_noise_multiplier` for ε 8 over the run's rounds. Members are the users that come first in",
        "the data file (partition i = user i), not a random half. Device noise is unseeded, so DP rows",
        "vary between runs.",
        "",
        "```sh",
        "python -m fedinterest.benchmarks.privacy_audit --models no-dp layer-1 layer-2 layers-1+2 --rounds 20 --clients-per-round 100",
        "python -m fedinterest.benchmarks.privacy_audit --table-only   # rebuild this section from benchmarks/results/privacy_audit/",
        "```",
        "",
        "| model | attack AUC (loss) | calibrated AUC | control AUC | members / non-members | NDCG@10 (best valid) | last round NDCG@10 | members / non-members NDCG@10 | layer 1 ε max (δ) | user-level ε (δ) | rounds x devices/round | wall time | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in results:
        a = s["attack"]
        rounds = f"{s['rounds']} x {s['clients_per_round']}" + (" (stopped at the user-level budget)" if s.get("stopped_early") else "")
        lines.append(
            f"| {LABELS.get(s['model'], s['model'])} | {_auc(a['loss'])} | {_auc(a['calibrated'])} | {_auc(a['control_popularity'])} | "
            f"{a['members']} / {a['nonmembers']} | {_chosen_ndcg(s)} | {s['test'][NDCG_10]:.4f} | "
            f"{a['test_ndcg@10']['members']:.4f} / {a['test_ndcg@10']['nonmembers']:.4f} | {layer1_epsilon(s)} | {_user_epsilon(s)} | "
            f"{rounds} | {s['wall_seconds'] / 60:.1f} min | {s['commit']} |"
        )
    if not results:
        lines.append("| (no stored results) | | | | | | | | | | | | |")
    lines += old_relation_note(results)
    lines += ["", target_sentence(results, popularity=popularity_ndcg())]
    return "\n".join(lines)
