"""The ceiling: on-target sequences only, chosen with the ground-truth cluster.

No real selector can see the cluster; this shows how good a perfect domain filter is.
"""
from __future__ import annotations

import numpy as np

from mgd.pipeline.selection import random_subset

ON_TARGET = 0


def select(cluster, k: int, seed: int) -> np.ndarray:
    """k random on-target rows (a fresh draw per seed). If the corpus holds fewer than k
    on-target rows, all of them are returned and training repeats them to the budget."""
    rows = np.flatnonzero(np.asarray(cluster) == ON_TARGET)
    if rows.shape[0] == 0:
        raise ValueError("the corpus has no on-target (cluster 0) rows")
    return random_subset(len(cluster), min(k, rows.shape[0]), seed=seed, candidates=rows)
