"""The fewest devices whose vectors a completed SecAgg+ round sums: what the distributed noise is calibrated to.

Shared by the server's round plan (server/secure_plan.py) and the device, which computes
it from the protocol settings Flower's mod received (client/secure_contribution.py).
"""

from __future__ import annotations

import math


def fewest_survivors(nodes: int, shares: int, threshold: int) -> int:
    """The fewest survivors for which every one of `nodes` nodes has `threshold` surviving neighbours.

    Flower gives each node the `shares` nodes around it in a ring (itself included; every
    node when shares >= nodes), so each survivor counts for `shares` neighbourhoods: a
    round that completes sums at least ceil(nodes * threshold / shares) vectors. Flower
    makes an even share count odd by adding one neighbour, hence the bound with that one.
    """
    if shares >= nodes:
        return threshold
    neighbours = shares if shares % 2 == 1 else shares + 1
    return max(threshold, math.ceil(nodes * threshold / neighbours))
