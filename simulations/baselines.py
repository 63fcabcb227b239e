"""The popularity baseline (moved to common/popularity.py: the operator's `server catalogue` uses it too)."""

from fedinterest.common.popularity import popularity_ranks

__all__ = ["popularity_ranks"]
