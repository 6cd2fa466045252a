"""Uniform random selection: the floor every selector must beat."""
from __future__ import annotations

import numpy as np

from mgd.pipeline.selection import random_subset


def select(n_rows: int, k: int, seed: int) -> np.ndarray:
    """k distinct rows of the corpus, uniformly at random (a fresh draw per seed)."""
    return random_subset(n_rows, k, seed=seed)
