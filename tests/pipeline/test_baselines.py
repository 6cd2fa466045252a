"""Each baseline on a small slice of the real shared corpus, with a known right answer:
biomedical abstracts (on-target) should win over newsgroup/news text (off-target)."""

import numpy as np
import pytest

from mgd.pipeline.baselines import (
    common,
    dsir,
    low_perplexity,
    oracle_cluster,
    oracle_labels,
    ppl_correlations,
    random_subset,
)
from mgd.pipeline.selection import composition
from tests.pipeline.shared_data import DATA

WIDTH = 129   # [L+1] rows of bytes: a byte-level "tokenizer" keeps the test self-contained


def _read(name, skip, n):
    import gzip
    import json
    out = []
    with gzip.open(DATA / name, "rt") as f:
        for i, line in enumerate(f):
            if i >= skip + n:
                break
            if i >= skip:
                out.append(json.loads(line)["text"])
    return out


@pytest.fixture(scope="module")
def slice_():
    if not (DATA / "ontarget.jsonl.gz").exists():
        pytest.skip(f"shared corpus not found in {DATA} (set MGD_DATA_DIR)")
    # OHSUMED comes first in the on-target file and 20 Newsgroups in the off-target one.
    on = _read("ontarget.jsonl.gz", 0, 120)
    off = [t for t in _read("offtarget.jsonl.gz", 0, 400) if len(t) > 300][:120]
    target = _read("ontarget.jsonl.gz", 2000, 60)
    texts = on + off
    cluster = np.array([0] * len(on) + [1] * len(off))
    return texts, cluster, target


def _bytes_rows(texts):
    rows = np.zeros((len(texts), WIDTH), np.int32)
    for i, t in enumerate(texts):
        b = np.frombuffer(t.encode("utf-8")[:WIDTH].ljust(WIDTH, b" "), np.uint8)
        rows[i] = b
    return rows


# A real (if tiny) language model family for the tests: add-one smoothed byte unigrams.
# params = log-probabilities [256]; training mixes the counts of the training rows in.

def _unigram_fit(rows, prior_counts=None):
    counts = np.bincount(np.asarray(rows)[:, 1:].ravel(), minlength=256).astype(float)
    if prior_counts is not None:
        counts += prior_counts
    return np.log((counts + 1) / (counts + 1).sum())


def _unigram_loss(logp, seqs, cfg=None):
    import jax.numpy as jnp  # traced when the baseline jits its loss function
    return -jnp.asarray(logp)[jnp.asarray(seqs)[:, 1:]].mean(axis=1)


def test_random_subset_is_uniform_across_clusters(slice_):
    _, cluster, _ = slice_
    picks = np.concatenate([random_subset.select(len(cluster), 40, seed=s) for s in range(50)])
    share = composition(picks, cluster, 2)
    assert abs(share[0] - 0.5) < 0.05


def test_low_perplexity_prefers_text_like_the_reference_model(slice_):
    texts, cluster, target = slice_
    rows = _bytes_rows(texts)
    model = _unigram_fit(_bytes_rows(target))         # a reference model of biomedical text
    score = low_perplexity.scores(model, rows, None, batch_size=64, loss_fn=_unigram_loss)
    np.testing.assert_allclose(-score, _unigram_loss(model, rows), rtol=1e-6)
    assert composition(low_perplexity.select(score, 60), cluster, 2)[0] > 0.8


def test_batched_losses_pad_the_last_batch_and_trim_it():
    rows = np.random.default_rng(0).integers(0, 256, (37, 9)).astype(np.int32)
    logp = np.log(np.random.default_rng(1).dirichlet(np.ones(256)))
    got = common.batched_losses(logp, rows, None, batch_size=16, loss_fn=_unigram_loss)
    np.testing.assert_allclose(got, _unigram_loss(logp, rows), rtol=1e-6)


def test_dsir_selects_target_like_text_with_the_package(slice_, tmp_path):
    texts, cluster, target = slice_
    # The pipeline scores fixed-length token windows; equal-length text keeps DSIR's
    # length bias (a sum of per-n-gram log ratios) out of the comparison here too.
    texts = [t[:500] for t in texts]
    idx, weights = dsir.select(texts, target, 60, seed=0, work_dir=tmp_path)
    assert weights.shape == (len(texts),) and len(set(idx)) == 60
    assert composition(idx, cluster, 2)[0] > 0.9
    # Resampling is seeded: same seed, same rows; the weights themselves are deterministic.
    idx2, weights2 = dsir.select(texts, target, 60, seed=0)
    np.testing.assert_array_equal(idx, idx2)
    np.testing.assert_allclose(weights, weights2)
    # The mean log weight separates the clusters the right way round.
    assert weights[cluster == 0].mean() > weights[cluster == 1].mean()


def test_dsir_tokenizer_needs_no_downloaded_nltk_data(monkeypatch, tmp_path):
    import nltk
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    dsir.check_nltk_offline()


def test_perplexity_correlations_on_a_population_of_real_models(slice_):
    texts, cluster, target = slice_
    rows = _bytes_rows(texts)
    target_rows = _bytes_rows(target)
    # Byte histograms as unsupervised features for the mixture domains.
    feats = np.stack([np.bincount(r, minlength=256) for r in rows]).astype(float)
    domains = ppl_correlations.unsupervised_domains(feats, 4, seed=0)
    base_counts = np.bincount(rows[:, 1:].ravel(), minlength=256) * 0.1
    cfg = ppl_correlations.PopulationConfig(n_models=12, n_domains=4, rows_per_model=60, seed=0)
    x, y, mix = ppl_correlations.build_population(
        None, rows, target_rows, domains, np.full(len(rows), WIDTH - 1), cfg,
        train_fn=lambda p, toks, seed: _unigram_fit(toks, base_counts),
        loss_fn=lambda p, s: np.asarray(_unigram_loss(p, s)))
    assert x.shape == (12, len(rows)) and y.shape == (12,)
    assert np.all((y > 0) & (y < 1)) and np.ptp(y) > 0
    np.testing.assert_allclose(mix.sum(1), 1.0)
    for estimator in ("spearmanr", "sign_cdf"):
        est = ppl_correlations.estimate(x, y, estimator)
        chosen = ppl_correlations.select(est, 60)
        assert len(set(chosen)) == 60
        assert composition(chosen, cluster, 2)[0] > 0.8, estimator


def test_perplexity_correlations_projection_takes_the_top_k_estimates():
    est = np.random.default_rng(2).standard_normal(1000)
    for k in (1, 7, 333, 1000):
        np.testing.assert_array_equal(ppl_correlations.select(est, k), np.sort(np.argsort(-est)[:k]))


def test_perplexity_correlations_refuses_a_population_without_variation():
    with pytest.raises(ValueError, match="same target error"):
        ppl_correlations.estimate(np.random.rand(4, 10), np.full(4, 0.5))


def test_oracle_cluster_takes_only_on_target_rows(slice_):
    _, cluster, _ = slice_
    idx = oracle_cluster.select(cluster, 50, seed=1)
    assert len(set(idx)) == 50 and np.all(cluster[idx] == 0)
    assert len(oracle_cluster.select(cluster, 10_000, seed=1)) == (cluster == 0).sum()


def test_oracle_labels_rank_only_the_labeled_rows():
    labeled = np.array([5, 2, 9, 7])
    labels = np.array([0.1, 3.0, -1.0, 2.0])
    np.testing.assert_array_equal(oracle_labels.select(12, labeled, labels, 2), [2, 7])
    np.testing.assert_array_equal(oracle_labels.select(12, labeled, labels, 10), [2, 7, 5, 9])
