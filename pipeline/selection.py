"""Turning per-sequence scores into a selection that fits a token budget.

Every sequence of the corpus has the same length (L + 1 tokens, L of them trained on),
so a token budget is a number of sequences; the budget is given either as a fraction
of the corpus's sequences or as a number of training tokens (`budget_rows`).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np


def budget_rows(n_sequences: int, tokens_per_sequence: int, *, fraction: float | None = None,
                tokens: int | None = None) -> int:
    """Number of sequences a budget buys: exactly one of `fraction` (of the corpus's
    sequences, 0 < f <= 1, rounded to the nearest) or `tokens` (training tokens, rounded
    up to whole sequences). Always at least one sequence and at most all of them."""
    if n_sequences <= 0:
        raise ValueError(f"n_sequences must be positive, got {n_sequences}")
    if tokens_per_sequence <= 0:
        raise ValueError(f"tokens_per_sequence must be positive, got {tokens_per_sequence}")
    if (fraction is None) == (tokens is None):
        raise ValueError("give exactly one of a budget fraction and a budget in tokens")
    if fraction is not None:
        if not (0 < fraction <= 1) or not math.isfinite(fraction):
            raise ValueError(f"budget fraction must be in (0, 1], got {fraction!r}")
        count = int(round(fraction * n_sequences))
        what = f"budget fraction {fraction!r}"
    else:
        if tokens < 1:
            raise ValueError(f"budget tokens must be >= 1, got {tokens!r}")
        count = int(math.ceil(tokens / tokens_per_sequence))
        what = f"budget of {tokens} tokens"
    if count > n_sequences:
        raise ValueError(f"{what} asks for {count} sequences but the corpus has only "
                         f"{n_sequences}")
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


@dataclasses.dataclass(frozen=True)
class TargetModes:
    """The target set's modes and where the corpus sits among them (`fit_target_modes`)."""
    mode_of_row: np.ndarray        # [N] each corpus row's nearest mode
    share: np.ndarray              # [M] each mode's share of the target set
    distance: np.ndarray           # [N] each corpus row's distance to its mode's centre
    target_distance: np.ndarray    # [n_target] the same for the target's own rows

    def typical(self, quantile: float) -> np.ndarray:
        """[N] bool: rows no farther from their mode than the `quantile` of the target's
        own rows are from theirs (0 < quantile <= 1): text the target holds something
        like."""
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        return self.distance <= np.quantile(self.target_distance, quantile)


def fit_target_modes(target_features, corpus_features, n_modes: int, seed: int = 0) -> TargetModes:
    """k-means on the target set's features, standardized by the target's own spread;
    each corpus row goes to its nearest mode in that space. The modes are the kinds of
    text the target holds (on PubMed, e.g. clinical trials and cell biology), found
    without labels."""
    from sklearn.cluster import KMeans
    t = np.asarray(target_features, np.float64)
    x = np.asarray(corpus_features, np.float64)
    if t.ndim != 2 or x.ndim != 2 or t.shape[1] != x.shape[1]:
        raise ValueError(f"target_features {t.shape} and corpus_features {x.shape} must be "
                         f"2-D with the same width")
    if not 1 <= n_modes <= t.shape[0]:
        raise ValueError(f"n_modes must be between 1 and the target's {t.shape[0]} rows, "
                         f"got {n_modes}")
    mu, sd = t.mean(0), t.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    t, x = (t - mu) / sd, (x - mu) / sd
    km = KMeans(n_clusters=n_modes, n_init=8, random_state=seed).fit(t)
    mode = km.predict(x).astype(np.int64)
    return TargetModes(
        mode_of_row=mode,
        share=np.bincount(km.labels_, minlength=n_modes) / t.shape[0],
        distance=np.linalg.norm(x - km.cluster_centers_[mode], axis=1),
        target_distance=np.linalg.norm(t - km.cluster_centers_[km.labels_], axis=1))


def target_modes(target_features, corpus_features, n_modes: int, seed: int = 0):
    """(mode of each corpus row [N], each mode's share of the target set [n_modes]):
    `fit_target_modes` without the distances."""
    fit = fit_target_modes(target_features, corpus_features, n_modes, seed)
    return fit.mode_of_row, fit.share


def stratified_top_k(scores, mode_of_row, share, k: int, eligible=None) -> np.ndarray:
    """k rows whose mix over modes follows `share`: each mode's quota (k x share, whole
    rows by largest remainder) is filled by its highest scores; what a mode cannot fill
    goes to the highest scores left anywhere. Plain `top_k` ranks across modes and piles
    onto whichever mode the score favours; this keeps the score's ranking inside each.

    `eligible` ([N] bool, e.g. `TargetModes.typical`): only those rows fill the quotas
    and the remainder; rows outside it are taken, by score, only when the eligible rows
    run out."""
    scores = np.asarray(scores, dtype=np.float64)
    mode_of_row = np.asarray(mode_of_row)
    share = np.asarray(share, dtype=np.float64)
    if mode_of_row.shape != scores.shape:
        raise ValueError(f"mode_of_row {mode_of_row.shape} must match scores {scores.shape}")
    if eligible is not None:
        eligible = np.asarray(eligible)
        if eligible.shape != scores.shape or eligible.dtype != bool:
            raise ValueError(f"eligible must be a bool mask shaped like scores {scores.shape}, "
                             f"got {eligible.dtype} {eligible.shape}")
    if share.ndim != 1 or (share < 0).any() or not np.isclose(share.sum(), 1.0):
        raise ValueError(f"share must be a 1-D distribution over modes, got {share}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    quota = np.floor(share * k).astype(np.int64)
    short = k - int(quota.sum())
    quota[np.argsort(-(share * k - quota), kind="stable")[:short]] += 1
    usable = np.isfinite(scores) & (True if eligible is None else eligible)
    picks: list[int] = []
    for m, q in enumerate(quota):
        rows = np.flatnonzero((mode_of_row == m) & usable)
        if q and rows.size:
            picks.extend(top_k(scores, min(int(q), rows.size), candidates=rows).tolist())
    for pool in (usable, np.isfinite(scores)):   # what the quotas left: eligible rows first
        if len(picks) < k:
            rest = np.where(pool, scores, np.nan)
            rest[picks] = np.nan
            n_left = int(np.isfinite(rest).sum())
            if n_left:
                picks.extend(top_k(rest, min(k - len(picks), n_left)).tolist())
    if len(picks) < k:
        raise ValueError(f"asked for {k} sequences but only {len(picks)} have a finite score")
    return np.asarray(picks, np.int64)
