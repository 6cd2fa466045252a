"""The metagradient oracle's labels used directly: the top of the rows it labeled.

Only the labeled rows are candidates (the oracle is too expensive to run on the whole
corpus; that is why the distilled scorer exists). If fewer rows are labeled than the
budget holds, every labeled row is taken and training repeats them to the budget.
"""
from __future__ import annotations

import numpy as np

from mgd.pipeline.selection import top_k


def select(n_rows: int, labeled_indices, labels, k: int) -> np.ndarray:
    labeled_indices = np.asarray(labeled_indices, np.int64)
    labels = np.asarray(labels, np.float64)
    if labeled_indices.shape != labels.shape:
        raise ValueError(f"labeled_indices {labeled_indices.shape} and labels {labels.shape} "
                         f"must match")
    if labeled_indices.size and (labeled_indices.min() < 0 or labeled_indices.max() >= n_rows):
        raise ValueError(f"labeled_indices must lie in [0, {n_rows})")
    full = np.full(n_rows, np.nan)
    full[labeled_indices] = labels
    return top_k(full, min(k, int(np.isfinite(full).sum())))
