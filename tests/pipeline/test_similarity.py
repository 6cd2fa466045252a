"""The similarity baselines (nearest-to-target, k nearest target rows, target-vs-corpus
classifier) against references written here independently, on fresh random features."""
import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.spatial.distance import cdist

from mgd.pipeline.baselines import similarity


def _features(seed, n_target=40, n_corpus=300, d=6):
    """Target rows around one centre; a corpus with a quarter of its rows near it."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=d) * 2
    target = centre + rng.normal(size=(n_target, d))
    near = rng.random(n_corpus) < 0.25
    corpus = np.where(near[:, None], centre, -centre) + rng.normal(size=(n_corpus, d))
    # A large offset and scale on one column: standardizing must undo them.
    target[:, 0], corpus[:, 0] = 50 + 9 * target[:, 0], 50 + 9 * corpus[:, 0]
    return target, corpus, near


def _standardized(target, corpus):
    mu, sd = corpus.mean(0), corpus.std(0)
    return (target - mu) / sd, (corpus - mu) / sd


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nearest_is_the_cosine_to_the_target_mean(seed):
    target, corpus, near = _features(seed)
    t, x = _standardized(target, corpus)
    want = 1 - cdist(x, t.mean(0, keepdims=True), metric="cosine")[:, 0]
    got = similarity.nearest_scores(target, corpus)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    assert got[near].mean() > got[~near].mean() + 0.5


@pytest.mark.parametrize("seed,k", [(0, 1), (1, 5), (2, 40)])
def test_knn_is_the_mean_cosine_to_the_k_nearest_target_rows(seed, k):
    target, corpus, near = _features(seed)
    t, x = _standardized(target, corpus)
    cos = 1 - cdist(x, t, metric="cosine")
    want = np.sort(cos, axis=1)[:, ::-1][:, :k].mean(1)
    got = similarity.knn_scores(target, corpus, k)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="k must be between 1 and"):
        similarity.knn_scores(target, corpus, len(target) + 1)


def _weighted_logistic_reference(t, x, c):
    """P(target) of each corpus row from minimizing the class-balanced, L2-penalized
    logistic loss directly: C * sum_i w_i * logloss_i + |w|^2 / 2 (intercept free)."""
    feats = np.concatenate([t, x])
    y = np.concatenate([np.ones(len(t)), np.zeros(len(x))])
    weight = np.where(y == 1, len(y) / (2 * len(t)), len(y) / (2 * len(x)))

    def loss(theta):
        w, b = theta[:-1], theta[-1]
        z = feats @ w + b
        nll = np.logaddexp(0, z) - y * z
        p = 1 / (1 + np.exp(-z))
        grad_z = c * weight * (p - y)
        return c * (weight * nll).sum() + 0.5 * w @ w, \
            np.concatenate([feats.T @ grad_z + w, [grad_z.sum()]])
    res = minimize(loss, np.zeros(feats.shape[1] + 1), jac=True, method="L-BFGS-B",
                   options={"maxiter": 10_000, "gtol": 1e-10, "ftol": 1e-14})
    w, b = res.x[:-1], res.x[-1]
    return 1 / (1 + np.exp(-(x @ w + b)))


@pytest.mark.parametrize("seed", [0, 1])
def test_classifier_is_the_balanced_logistic_regression(seed):
    target, corpus, near = _features(seed)
    got = similarity.classifier_scores(target, corpus)
    want = _weighted_logistic_reference(*_standardized(target, corpus), c=1.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)
    assert ((got >= 0) & (got <= 1)).all()
    assert got[near].min() > np.median(got[~near])


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="same width"):
        similarity.nearest_scores(np.zeros((3, 4)), np.zeros((5, 3)))


def test_nearest_target_and_rule_nearest_share_one_score(monkeypatch):
    """The nearest-target cosine is computed once per run, then read by both methods."""
    from types import SimpleNamespace

    from mgd.pipeline import methods
    from mgd.pipeline.stages import RunState
    target, corpus, _ = _features(0)
    calls = []
    real = similarity.nearest_scores
    monkeypatch.setattr(similarity, "nearest_scores", lambda t, x: calls.append(1) or real(t, x))
    cfg = SimpleNamespace(selection=SimpleNamespace(target_modes=0, target_gate=0))
    state = RunState(run_dir=None, cfg=cfg, corpus=None, model_cfg=None, base=None,
                     base_eval_loss=0.0, k=30, hidden=corpus, labels=None, scored=None, progress=False)
    state.__dict__["target_hidden"] = target          # the cached property, as if computed
    a = methods.SELECTORS["nearest_target"](state)
    b = methods.SELECTORS["rule_nearest"](state)
    assert len(calls) == 1
    np.testing.assert_array_equal(a.arrays["scores"], b.arrays["scores"])
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.arrays["scores"], real(target, corpus))
