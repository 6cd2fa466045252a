"""Perplexity correlations (Thrush et al. 2024) through the `perplexity-correlations`
package.

The method: for a population of language models, the bits per byte (BPB) a model
spends on a piece of text correlates with its error on the target task; pretraining
on the texts whose BPB correlates most with target error helps the target most. The
paper takes an existing population of public LLMs; here there is none, so the
population is made: `n_models` copies of the base model, each trained briefly on its
own mixture of the corpus. The mixtures are drawn from a Dirichlet over unsupervised
k-means clusters of the base model's features (the ground-truth cluster is never
used), so the population varies in what it knows.

X[k, i] is model k's BPB on corpus sequence i; y[k] is model k's error on the
metagradient target set, in [0, 1]: one minus the per-token geometric-mean probability
of the target text, 1 - exp(-loss), a monotone function of the target loss (the
estimators below are rank-based in y, so any monotone error gives the same answer).
The package's `spearmanr` (or `sign_cdf`) estimator turns (X, y) into a per-sequence
estimate, and its `linear` projection with tau_i = 1/k (no sequence used twice, as the
paper's tau) turns the estimate into a sampling distribution over exactly k sequences.
"""
from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np

ESTIMATORS = ("spearmanr", "sign_cdf")


@dataclasses.dataclass(frozen=True)
class PopulationConfig:
    n_models: int = 16
    n_domains: int = 8            # k-means clusters the mixtures are drawn over
    dirichlet_alpha: float = 0.3  # < 1: most mixtures concentrate on a few clusters
    rows_per_model: int = 2048    # training rows sampled from each model's mixture
    estimator: str = "spearmanr"
    seed: int = 0

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.n_models < 3:
            raise ValueError(f"a population needs at least 3 models, got {self.n_models}")
        if self.n_domains < 2:
            raise ValueError(f"n_domains must be >= 2, got {self.n_domains}")


def unsupervised_domains(features, n_domains: int, seed: int) -> np.ndarray:
    """[N] k-means cluster of each row on its (standardised) base-model features."""
    from sklearn.cluster import KMeans
    x = np.asarray(features, np.float64)
    x = (x - x.mean(0)) / np.where(x.std(0) > 1e-12, x.std(0), 1.0)
    n_domains = min(n_domains, x.shape[0])
    km = KMeans(n_clusters=n_domains, n_init=3, random_state=seed)
    return km.fit_predict(x).astype(np.int64)


def draw_mixtures(n_models: int, n_domains: int, alpha: float, seed: int) -> np.ndarray:
    """[n_models, n_domains] mixture weights; the first model trains on the uniform
    mixture, so the population always has a generalist."""
    rng = np.random.default_rng(seed)
    w = rng.dirichlet(np.full(n_domains, alpha), size=n_models)
    w[0] = 1.0 / n_domains
    return w


def sample_mixture_rows(domains, weights, n_rows: int, rng) -> np.ndarray:
    """Rows drawn from each domain in proportion to `weights` (with replacement within a
    domain only if it is smaller than its share)."""
    domains = np.asarray(domains)
    present = [d for d in range(weights.shape[0]) if np.any(domains == d)]
    w = np.array([weights[d] for d in present])
    w = w / w.sum()
    counts = rng.multinomial(n_rows, w)
    rows = []
    for d, c in zip(present, counts):
        pool = np.flatnonzero(domains == d)
        rows.append(rng.choice(pool, size=c, replace=c > pool.shape[0]))
    return rng.permutation(np.concatenate(rows)).astype(np.int64)


def bits_per_byte(loss_nats, n_tokens: int, n_bytes) -> np.ndarray:
    """Per-sequence BPB from mean loss per token (nats) over n_tokens predicted tokens."""
    return np.asarray(loss_nats) * n_tokens / (math.log(2) * np.maximum(np.asarray(n_bytes), 1))


def target_error(target_loss_nats: float) -> float:
    return float(1.0 - math.exp(-float(target_loss_nats)))


def build_population(base_params, corpus_tokens, target_tokens, domains, bytes_per_seq, cfg,
                     *, train_fn, loss_fn, progress: bool = False):
    """Train the population and measure it.

    train_fn(params, tokens [n, L+1], seed) -> params (continued training on `tokens`);
    loss_fn(params, seqs [n, L+1]) -> [n] mean loss per token in nats.
    Returns (X [n_models, N] BPB, y [n_models] target error, mixtures [n_models, n_domains]).
    """
    corpus_tokens = np.asarray(corpus_tokens)
    n_tokens = corpus_tokens.shape[1] - 1
    mixtures = draw_mixtures(cfg.n_models, int(np.max(domains)) + 1, cfg.dirichlet_alpha,
                             cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    xs, ys = [], []
    models = range(cfg.n_models)
    if progress:
        from tqdm.auto import tqdm
        models = tqdm(models, desc="ppl-corr population", unit="model")
    for m in models:
        rows = sample_mixture_rows(domains, mixtures[m], cfg.rows_per_model, rng)
        params = train_fn(base_params, corpus_tokens[rows], cfg.seed * 1000 + m)
        xs.append(bits_per_byte(loss_fn(params, corpus_tokens), n_tokens, bytes_per_seq))
        ys.append(target_error(np.mean(loss_fn(params, target_tokens))))
    return np.stack(xs).astype(np.float64), np.asarray(ys), mixtures


def estimate(x, y, estimator: str = "spearmanr") -> np.ndarray:
    """[N] the package's per-sequence estimate; higher = BPB on that sequence tracks
    target error more closely, i.e. learning it lowers target error."""
    from perplexity_correlations import estimation
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if np.ptp(y) == 0:
        raise ValueError("every population model has the same target error; the population "
                         "does not vary enough to estimate correlations (train it longer or "
                         "on more different mixtures)")
    return np.asarray(getattr(estimation, estimator)(np.asarray(x), np.asarray(y)), np.float64)


def select(est, k: int) -> np.ndarray:
    """The k sequences the package's linear projection puts weight on (tau_i = 1/k)."""
    from perplexity_correlations.projection import linear
    est = np.asarray(est, np.float64)
    if not 0 < k <= est.shape[0]:
        raise ValueError(f"k must be in [1, {est.shape[0]}], got {k}")
    with warnings.catch_warnings():
        # The package accumulates in float32, so the last weight can exceed 1/k by ~1e-7
        # and it warns; harmless for choosing which k sequences carry weight.
        warnings.filterwarnings("ignore", message="numerical issues likely")
        proj = np.asarray(linear(est, np.full(est.shape[0], 1.0 / k)), np.float64)
    # Rounding in the projection's cumulative sum can leave a (k+1)-th entry of ~1e-9;
    # keep the k heaviest, ties broken by the estimate.
    order = np.lexsort((-est, -proj))[:k]
    if np.any(proj[order] <= 0):
        raise RuntimeError("the linear projection put weight on fewer than k sequences")
    return np.sort(order).astype(np.int64)
