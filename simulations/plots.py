"""The run plots moved to server/plots.py (shared with `fedinterest server report`)."""

from fedinterest.server.plots import plot_epsilon, plot_ndcg

__all__ = ["plot_epsilon", "plot_ndcg"]
