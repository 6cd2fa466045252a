"""Selection by similarity to the target on the base model's features, no metagradient:
the baselines a data-selection reviewer asks for first.

The features are the scorer's: each row's mean-pooled final hidden state under the base
model. Each column is standardized by the corpus's mean and spread before any of the
three scores, so the direction that all text shares and the few large-magnitude hidden
dimensions do not decide the similarity.

- `nearest_scores`: cosine of each corpus row to the target set's mean feature.
- `knn_scores`: mean cosine similarity to the row's k nearest target rows
  (scikit-learn's NearestNeighbors).
- `classifier_scores`: P(target) from a logistic regression of target rows against
  corpus rows (scikit-learn's LogisticRegression, classes weighted to balance), as
  quality classifiers are built.

Higher is more target-like in each; `selection.top_k` turns a score into a selection.
"""
from __future__ import annotations

import numpy as np

__all__ = ["standardize", "nearest_scores", "knn_scores", "classifier_scores"]


def _check(target, corpus) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(target, np.float64)
    x = np.asarray(corpus, np.float64)
    if t.ndim != 2 or x.ndim != 2 or t.shape[1] != x.shape[1] or not len(t) or not len(x):
        raise ValueError(f"target {t.shape} and corpus {x.shape} features must be non-empty "
                         f"2-D arrays of the same width")
    return t, x


def standardize(target, corpus) -> tuple[np.ndarray, np.ndarray]:
    """Both feature sets in the corpus's standardized coordinates (constant columns kept
    at unit scale)."""
    t, x = _check(target, corpus)
    mu, sd = x.mean(0), x.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    return (t - mu) / sd, (x - mu) / sd


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(norm > 0, norm, 1.0)


def nearest_scores(target, corpus) -> np.ndarray:
    """[N] cosine of each corpus row to the target set's mean feature."""
    t, x = standardize(target, corpus)
    return _unit(x) @ _unit(t.mean(0))


def knn_scores(target, corpus, k: int) -> np.ndarray:
    """[N] mean cosine similarity of each corpus row to its `k` nearest target rows."""
    from sklearn.neighbors import NearestNeighbors
    t, x = standardize(target, corpus)
    if not 1 <= k <= t.shape[0]:
        raise ValueError(f"k must be between 1 and the target's {t.shape[0]} rows, got {k}")
    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(t)
    distance, _ = nn.kneighbors(x)
    return 1.0 - distance.mean(axis=1)


def classifier_scores(target, corpus, *, c: float = 1.0, seed: int = 0) -> np.ndarray:
    """[N] P(target) of each corpus row under a logistic regression fit to tell the target
    rows (class 1) from the corpus rows (class 0), the two classes weighted equally."""
    from sklearn.linear_model import LogisticRegression
    t, x = standardize(target, corpus)
    features = np.concatenate([t, x])
    is_target = np.concatenate([np.ones(len(t), np.int64), np.zeros(len(x), np.int64)])
    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=5000, tol=1e-6,
                             random_state=seed)
    clf.fit(features, is_target)
    return clf.predict_proba(x)[:, list(clf.classes_).index(1)]
