"""Turning per-sequence scores into a selection that fits a token budget.

Every sequence of the corpus has the same length (L + 1 tokens, L of them trained on),
so a token budget is a number of sequences; the budget may be given either as a
fraction of the corpus (0 < b <= 1) or as a number of training tokens (b > 1).
"""
from __future__ import annotations

import math

import numpy as np


def budget_to_count(budget: float, n_sequences: int, tokens_per_sequence: int) -> int:
    """Number of sequences a budget buys.

    budget <= 1 is a fraction of the corpus; budget > 1 is a count of training tokens
    (rounded up to whole sequences). Always at least one sequence and at most all of them.
    """
    if n_sequences <= 0:
        raise ValueError(f"n_sequences must be positive, got {n_sequences}")
    if tokens_per_sequence <= 0:
        raise ValueError(f"tokens_per_sequence must be positive, got {tokens_per_sequence}")
    if not (budget > 0) or not math.isfinite(budget):
        raise ValueError(f"budget must be a positive number (a fraction <= 1 or a token "
                         f"count > 1), got {budget!r}")
    if budget <= 1:
        count = int(round(budget * n_sequences))
    else:
        count = int(math.ceil(budget / tokens_per_sequence))
    if count > n_sequences:
        raise ValueError(f"budget {budget!r} asks for {count} sequences but the corpus has "
                         f"only {n_sequences}")
    return max(1, count)


def top_k(scores, k: int, candidates=None) -> np.ndarray:
    """Indices of the k highest scores, best first.

    NaN scores (sequences a method could not score) are never chosen. `candidates`
    restricts the choice to a subset of rows. Ties are broken by the lower index, so
    the result does not depend on the sort's internals.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {scores.shape}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    rows = np.arange(scores.shape[0]) if candidates is None else np.asarray(candidates)
    rows = rows[np.isfinite(scores[rows])]
    if rows.shape[0] < k:
        raise ValueError(f"asked for the top {k} sequences but only {rows.shape[0]} have "
                         f"a finite score")
    # lexsort's last key is the primary one: descending score, then ascending index.
    order = np.lexsort((rows, -scores[rows]))
    return rows[order[:k]].astype(np.int64)


def random_subset(n: int, k: int, seed: int, candidates=None) -> np.ndarray:
    """k distinct rows drawn uniformly (from `candidates` if given)."""
    rows = np.arange(n) if candidates is None else np.asarray(candidates)
    if rows.shape[0] < k:
        raise ValueError(f"cannot draw {k} distinct rows from {rows.shape[0]}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(rows, size=k, replace=False)).astype(np.int64)


def composition(indices, cluster, n_clusters: int = 3) -> np.ndarray:
    """Fraction of the selected rows in each ground-truth cluster (for reporting only)."""
    cluster = np.asarray(cluster)
    picked = cluster[np.asarray(indices)]
    counts = np.bincount(picked.astype(np.int64), minlength=n_clusters)[:n_clusters]
    return counts / max(1, picked.shape[0])
