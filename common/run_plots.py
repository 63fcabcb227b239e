"""PNG plots of a federated run's rounds (simulated or deployed) (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from fedinterest.common.run_files import EPSILON_MAX, EPSILON_MEAN, NDCG_10, RoundRow


def _figure():  # noqa: ANN202 - matplotlib types
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(6.4, 4.0), dpi=100)


def _series(rows: Sequence[RoundRow], key: str) -> tuple[list[int], list[float]]:
    """(rounds, values) where the row measured `key` with a finite number."""
    points = [(r.round, r.number(key)) for r in rows]
    kept = [(x, y) for x, y in points if y is not None and math.isfinite(y)]
    return [x for x, _ in kept], [y for _, y in kept]


def _save(plt, fig, ax, path: Path, empty: bool, empty_text: str) -> Path:  # noqa: ANN001
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    if empty:
        ax.text(0.5, 0.5, empty_text, ha="center", va="center", transform=ax.transAxes)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_ndcg(rows: Sequence[RoundRow], path: Path, final_test: float | None = None, baseline: float | None = None) -> Path:
    """Validation NDCG@10 of the global model against the server round."""
    plt, fig, ax = _figure()
    x, y = _series(rows, NDCG_10)
    if x:
        ax.plot(x, y, marker="o", label="validation NDCG@10 (rounds it was measured)")
    if final_test is not None and math.isfinite(final_test) and rows:
        ax.axhline(final_test, color="tab:green", linestyle="--", label=f"final test NDCG@10 = {final_test:.4f}")
    if baseline is not None and math.isfinite(baseline) and rows:
        ax.axhline(baseline, color="tab:gray", linestyle=":", label=f"popularity baseline (catalogue source) = {baseline:.4f}")
    ax.set_xlabel("server round")
    ax.set_ylabel("NDCG@10 (full catalogue)")
    ax.set_title("Global model quality")
    if x or final_test is not None:
        ax.legend(loc="best")
    return _save(plt, fig, ax, path, not x, "NDCG@10 not measured in any round\n(see eval-every)")


def plot_epsilon(rows: Sequence[RoundRow], path: Path, budget: float | None = None) -> Path:
    """Max and mean cumulative device epsilon against the server round, with the budget."""
    plt, fig, ax = _figure()
    x_max, y_max = _series(rows, EPSILON_MAX)
    x_mean, y_mean = _series(rows, EPSILON_MEAN)
    if x_max:
        ax.plot(x_max, y_max, marker="o", label="max over devices")
    if x_mean:
        ax.plot(x_mean, y_mean, marker="s", label="mean over devices")
    if budget is not None and (x_max or x_mean):
        ax.axhline(budget, color="tab:red", linestyle="--", label=f"budget epsilon = {budget:g}")
    # Layer 2 (DP-FedAvg): the server's user-level epsilon, a different unit on the same axis.
    x_user, y_user = _series(rows, "user_epsilon")
    if x_user:
        ax.plot(x_user, y_user, marker="^", color="tab:purple", label="user level (server, layer 2)")
    ax.set_xlabel("server round")
    ax.set_ylabel("epsilon (devices: example level; server: user level)" if x_user else "epsilon (example level)")
    ax.set_title("Privacy spent")
    shown = x_max or x_mean or x_user
    if shown:
        ax.legend(loc="best")
    return _save(plt, fig, ax, path, not shown, "no finite epsilon reported\n(DP off, or no device trained)")
