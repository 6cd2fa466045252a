"""Distilled scorer and selection on synthetic arrays whose right answer is known."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mgd.pipeline import scorer, selection


def _linear_problem(rng, n=300, d=12, noise=0.0):
    x = rng.standard_normal((n, d)) * rng.uniform(0.5, 3.0, d) + rng.standard_normal(d)
    w = rng.standard_normal(d)
    y = x @ w + 0.7 + noise * rng.standard_normal(n)
    return x, y, w


def test_ridge_recovers_noiseless_linear_map():
    x, y, w = _linear_problem(np.random.default_rng(1))
    reg = scorer.RidgeRegressor(alphas=(0.0, 1e-8)).fit(x, y)
    x_new = np.random.default_rng(2).standard_normal((50, x.shape[1]))
    np.testing.assert_allclose(reg.predict(x_new), x_new @ w + 0.7, rtol=1e-6, atol=1e-6)


def test_ridge_matches_normal_equations_and_brute_force_loo():
    rng = np.random.default_rng(3)
    x, y, _ = _linear_problem(rng, n=60, d=8, noise=0.5)
    reg = scorer.RidgeRegressor(alphas=(0.3, 3.0, 30.0)).fit(x, y)
    xs = (x - x.mean(0)) / x.std(0)
    for a in reg.alphas:
        # Independent LOO: refit from scratch without row i (own standardisation kept fixed,
        # as in the closed form), predict row i.
        errs = []
        for i in range(x.shape[0]):
            keep = np.arange(x.shape[0]) != i
            xc = xs[keep] - xs[keep].mean(0)
            yc = y[keep] - y[keep].mean()
            coef = np.linalg.solve(xc.T @ xc + a * np.eye(x.shape[1]), xc.T @ yc)
            errs.append(y[i] - (y[keep].mean() + (xs[i] - xs[keep].mean(0)) @ coef))
        brute = np.mean(np.square(errs))
        # The closed form centres once on all rows (the usual LOO shortcut), so it differs
        # from the brute force by O(1/n); the chosen alpha must still agree.
        assert reg.loo_mse[a] == pytest.approx(brute, rel=0.1)
    best = reg.alpha
    coef = np.linalg.solve(xs.T @ xs - len(y) * np.outer(xs.mean(0), xs.mean(0)) + best * np.eye(8),
                           (xs - xs.mean(0)).T @ (y - y.mean()))
    np.testing.assert_allclose(reg.coef, coef, rtol=1e-8, atol=1e-10)


def test_mlp_fits_a_nonlinear_target_that_ridge_cannot_rank():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1000, 6))
    y = np.abs(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2] + 0.05 * rng.standard_normal(1000)
    fit = scorer.fit_scorer(x, np.arange(1000), y, seed=0, regressors=("ridge", "mlp"),
                            mlp_hidden=64)
    assert fit.winner == "mlp"
    assert fit.heldout_spearman["mlp"] > 0.8
    assert fit.heldout_spearman["ridge"] < 0.4


def test_fit_scorer_scores_unlabeled_rows_from_the_labeled_ones():
    rng = np.random.default_rng(5)
    x, y, _ = _linear_problem(rng, n=2000, d=10, noise=0.3)
    labeled = rng.choice(2000, size=400, replace=False)
    fit = scorer.fit_scorer(x, labeled, y[labeled], seed=1, regressors=("ridge",))
    assert fit.scores.shape == (2000,)
    unlabeled = np.setdiff1d(np.arange(2000), labeled)
    assert scorer.spearman(fit.scores[unlabeled], y[unlabeled]) > 0.95
    assert fit.heldout_spearman["ridge"] > 0.95
    assert set(fit.heldout_indices) <= set(labeled)
    assert fit.summary()["winner"] == "ridge"


def test_fit_scorer_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="same shape"):
        scorer.fit_scorer(np.ones((10, 2)), np.arange(5), np.ones(4))


def test_extract_features_batches_and_pads_like_one_big_call():
    import jax.numpy as jnp
    rng = np.random.default_rng(6)
    seqs = rng.integers(0, 50, size=(23, 9)).astype(np.int32)
    table = jnp.asarray(rng.standard_normal((50, 4)).astype(np.float32))

    def fake_features(params, toks, cfg):   # mean of an embedding over the inputs
        return params[toks[:, :-1]].mean(axis=1)

    got = scorer.extract_features(table, seqs, None, batch_size=8, progress=False,
                                  features_fn=fake_features)
    want = np.asarray(table)[seqs[:, :-1]].mean(axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-6)


# ------------------------------------------------------------------ selection


@given(st.integers(1, 200), st.floats(0.01, 1.0), st.integers(2, 64))
def test_budget_fraction_and_token_forms_agree(n, frac, length):
    k = selection.budget_rows(n, length, fraction=frac)
    assert 1 <= k <= n
    assert abs(k - frac * n) <= 0.5 + 1e-9 or k == 1
    # The same number of sequences bought with tokens: whole sequences, rounded up.
    assert selection.budget_rows(n, length, tokens=k * length) == k
    assert selection.budget_rows(n, length, tokens=k * length - 1) == k
    if k < n:
        assert selection.budget_rows(n, length, tokens=k * length + 1) == k + 1


def test_budget_errors_name_the_argument():
    with pytest.raises(ValueError, match="fraction"):
        selection.budget_rows(10, 4, fraction=0.0)
    with pytest.raises(ValueError, match="fraction"):
        selection.budget_rows(10, 4, fraction=2.0)
    with pytest.raises(ValueError, match="only 10"):
        selection.budget_rows(10, 4, tokens=1000)
    with pytest.raises(ValueError, match="exactly one"):
        selection.budget_rows(10, 4, fraction=0.5, tokens=8)
    with pytest.raises(ValueError, match="exactly one"):
        selection.budget_rows(10, 4)



@given(st.integers(0, 10_000), st.integers(1, 50))
def test_top_k_matches_a_full_sort(seed, k):
    rng = np.random.default_rng(seed)
    n = 60
    scores = rng.integers(0, 8, n).astype(float)   # many ties on purpose
    scores[rng.integers(0, n, 3)] = np.nan
    k = min(k, int(np.isfinite(scores).sum()))
    got = selection.top_k(scores, k)
    finite = [i for i in range(n) if np.isfinite(scores[i])]
    want = sorted(finite, key=lambda i: (-scores[i], i))[:k]
    assert list(got) == want


def test_top_k_respects_candidates_and_composition_counts_clusters():
    scores = np.arange(10.0)
    got = selection.top_k(scores, 2, candidates=[1, 3, 5])
    assert list(got) == [5, 3]
    cluster = np.array([0, 0, 1, 2, 0, 1, 1, 2, 0, 0])
    np.testing.assert_allclose(selection.composition([0, 2, 3, 4], cluster), [0.5, 0.25, 0.25])
    with pytest.raises(ValueError, match="finite"):
        selection.top_k(np.array([1.0, np.nan]), 2)


@given(st.integers(0, 10_000), st.integers(1, 40), st.integers(1, 5))
def test_stratified_top_k_fills_each_modes_quota_with_its_best_rows(seed, k, n_modes):
    rng = np.random.default_rng(seed)
    n = 60
    scores = rng.normal(size=n).round(1)            # ties on purpose
    mode = rng.integers(0, n_modes, n)
    share = rng.dirichlet(np.ones(n_modes))
    got = selection.stratified_top_k(scores, mode, share, k)
    assert len(got) == k and len(set(got.tolist())) == k
    exact = share * k
    quota = np.floor(exact).astype(int)
    quota[np.argsort(-(exact - quota), kind="stable")[:k - quota.sum()]] += 1
    assert quota.sum() == k and np.all(np.abs(quota - exact) < 1)
    for m in range(n_modes):
        rows = [i for i in range(n) if mode[i] == m]
        ranked = sorted(rows, key=lambda i: (-scores[i], i))
        mine = [i for i in got.tolist() if mode[i] == m]
        # at least its quota (or all it has); whatever it holds is a prefix of its ranking
        assert len(mine) >= min(quota[m], len(rows))
        assert sorted(mine, key=lambda i: (-scores[i], i)) == ranked[:len(mine)]
    if all(np.sum(mode == m) >= quota[m] for m in range(n_modes)):
        assert [int(np.sum(mode[got] == m)) for m in range(n_modes)] == quota.tolist()


def test_stratified_top_k_with_one_mode_is_the_top_k_and_checks_its_inputs():
    scores = np.random.default_rng(0).normal(size=30)
    np.testing.assert_array_equal(
        np.sort(selection.stratified_top_k(scores, np.zeros(30, int), np.array([1.0]), 7)),
        np.sort(selection.top_k(scores, 7)))
    with pytest.raises(ValueError, match="mode_of_row"):
        selection.stratified_top_k(scores, np.zeros(29, int), np.array([1.0]), 3)
    with pytest.raises(ValueError, match="share"):
        selection.stratified_top_k(scores, np.zeros(30, int), np.array([0.5, 0.2]), 3)


def test_target_modes_find_planted_kinds_of_text_and_their_shares():
    rng = np.random.default_rng(1)
    centers = np.array([[4.0, 0, 0, 0], [-4.0, 0, 0, 0]])
    kind_t = np.r_[np.zeros(60, int), np.ones(20, int)]          # the target: 75% / 25%
    target = centers[kind_t] + rng.normal(size=(80, 4))
    kind_c = rng.integers(0, 2, 200)
    corpus = centers[kind_c] + rng.normal(size=(200, 4))
    mode, share = selection.target_modes(target, corpus, 2)
    big = int(np.argmax(share))
    np.testing.assert_allclose(sorted(share), [0.25, 0.75])
    assert np.mean((mode == big) == (kind_c == 0)) > 0.98
    with pytest.raises(ValueError, match="n_modes"):
        selection.target_modes(target, corpus, 81)
    with pytest.raises(ValueError, match="same width"):
        selection.target_modes(target, corpus[:, :3], 2)


@given(st.integers(0, 10_000), st.integers(1, 40), st.integers(1, 4), st.floats(0.0, 1.0))
def test_stratified_top_k_takes_ineligible_rows_only_when_the_eligible_run_out(seed, k, n_modes,
                                                                               frac):
    rng = np.random.default_rng(seed)
    n = 60
    scores = rng.normal(size=n)
    mode = rng.integers(0, n_modes, n)
    share = rng.dirichlet(np.ones(n_modes))
    eligible = rng.random(n) < frac
    got = selection.stratified_top_k(scores, mode, share, k, eligible)
    assert len(got) == k and len(set(got.tolist())) == k
    n_ok = int(eligible.sum())
    assert int(eligible[got].sum()) == min(k, n_ok)
    if n_ok >= k:   # the same as the rule on the eligible rows alone
        alone = selection.stratified_top_k(np.where(eligible, scores, np.nan), mode, share, k)
        assert sorted(got.tolist()) == sorted(alone.tolist())
    else:           # every eligible row, then the best of the rest
        rest = sorted(np.flatnonzero(~eligible), key=lambda i: -scores[i])[:k - n_ok]
        assert sorted(got.tolist()) == sorted(np.flatnonzero(eligible).tolist() + rest)


def test_stratified_top_k_checks_its_eligible_mask():
    scores = np.arange(10.0)
    for bad in (np.ones(9, bool), np.ones(10, int)):
        with pytest.raises(ValueError, match="eligible"):
            selection.stratified_top_k(scores, np.zeros(10, int), np.array([1.0]), 3, bad)


def test_typical_rows_are_those_as_close_to_a_target_mode_as_the_target_rows():
    rng = np.random.default_rng(2)
    centers = np.array([[5.0, 0, 0], [-5.0, 0, 0]])
    target = centers[rng.integers(0, 2, 200)] + rng.normal(size=(200, 3))
    near = centers[rng.integers(0, 2, 300)] + rng.normal(size=(300, 3))
    far = rng.normal(size=(40, 3)) * 0.5 + np.array([0.0, 12.0, 0.0])   # unlike the target
    fit = selection.fit_target_modes(target, np.r_[near, far], 2)
    assert fit.distance.shape == (340,) and fit.target_distance.shape == (200,)
    typical = fit.typical(0.99)
    assert not typical[300:].any()                 # the outliers are out
    assert 0.95 < typical[:300].mean() <= 1.0      # about 99% of target-like rows are in
    assert typical[:300].mean() > fit.typical(0.5)[:300].mean()   # a tighter gate keeps fewer
    # the target's own rows: exactly the quantile asked for (no ties in continuous data)
    own = selection.fit_target_modes(target, target, 2)
    assert own.typical(0.5).sum() == 100 and own.typical(1.0).all()
    with pytest.raises(ValueError, match="quantile"):
        fit.typical(0.0)


def test_random_subset_is_seeded_and_distinct():
    a = selection.random_subset(100, 10, seed=3)
    assert len(set(a)) == 10 and list(a) == list(selection.random_subset(100, 10, seed=3))
    assert list(a) != list(selection.random_subset(100, 10, seed=4))


def test_features_with_loss_is_model_features_plus_the_sequence_loss():
    import jax

    from mgd.pipeline import model
    cfg = model.GPTConfig(vocab_size=300, seq_len=16, n_layer=1, n_head=2, d_model=16,
                          attention_impl="xla", compute_dtype="float32")
    params = model.init_params(cfg, jax.random.PRNGKey(3))
    seqs = np.random.default_rng(7).integers(0, 300, (5, 17)).astype(np.int32)
    got = np.asarray(scorer.features_with_loss(params, seqs, cfg))
    np.testing.assert_allclose(got[:, :-1], np.asarray(model.features(params, seqs, cfg)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[:, -1], np.asarray(model.per_example_loss(params, seqs, cfg)),
                               rtol=1e-5)


# ------------------------------------------------------------ the alignment feature

def _tiny_model(seed=0, loss_chunk=512):
    import jax

    from mgd.pipeline import model
    cfg = model.GPTConfig(vocab_size=29, seq_len=12, n_layer=2, n_head=2, d_model=16,
                          attention_impl="xla", compute_dtype="float32", loss_chunk=loss_chunk)
    return cfg, model.init_params(cfg, jax.random.key(seed))


def _random_direction(rng, d=16, ff=64, vocab=29):
    return {"embed": rng.standard_normal((vocab, d)).astype(np.float32),
            "norm_f": rng.standard_normal(d).astype(np.float32),
            "w_down": rng.standard_normal((ff, d)).astype(np.float32)}


@pytest.mark.slow
@pytest.mark.parametrize("loss_chunk", [512, 7])   # one chunk, and chunks that need padding
def test_last_layer_alignment_is_the_last_layer_gradient_inner_product(loss_chunk):
    """Against autodiff of each row's mean loss, dotted with fresh random directions: the
    tied embedding through the output layer alone (hidden states held fixed), the final
    norm's scale, and the last block's down projection."""
    import jax
    import jax.numpy as jnp

    from mgd.pipeline import model
    cfg, params = _tiny_model(1, loss_chunk)
    rng = np.random.default_rng(5)
    seqs = jnp.asarray(rng.integers(0, 29, (5, 13)), jnp.int32)
    direction = _random_direction(rng)
    hidden, resid, up = model.forward_with_last_layer(params, seqs[:, :-1], cfg)
    np.testing.assert_allclose(hidden, model.forward(params, seqs[:, :-1], cfg), rtol=1e-5, atol=1e-6)
    got = np.asarray(scorer.last_layer_alignment(params, hidden, resid, up, seqs[:, 1:],
                                                 direction, cfg))

    def out_role(embed, i):
        p = {**params, "embed": embed}
        return jnp.mean(model.token_losses(p, jax.lax.stop_gradient(hidden[i]), seqs[i, 1:], cfg))

    def row_loss(p, i):
        return model.per_example_loss(p, seqs[i:i + 1], cfg)[0]

    want = np.zeros((5, 3))
    for i in range(5):
        g = jax.grad(row_loss)(params, i)
        want[i] = [jnp.vdot(jax.grad(out_role)(params["embed"], i), direction["embed"]),
                   jnp.vdot(g["norm_f"], direction["norm_f"]),
                   jnp.vdot(g["blocks"]["w_down"][-1], direction["w_down"])]
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6 * np.abs(want).max())
    assert np.all(np.ptp(want, axis=0) > 0)


def test_target_direction_is_the_preconditioned_target_gradient():
    """Both parts against autodiff of the target loss, preconditioned by hand: every
    parameter (`parts="all"`) and the last layer's three (the default)."""
    import jax
    import jax.numpy as jnp

    from mgd.pipeline import model
    cfg, params = _tiny_model(2)
    rng = np.random.default_rng(6)
    target = rng.integers(0, 29, (9, 13)).astype(np.int32)
    nu = jax.tree_util.tree_map(
        lambda a: rng.uniform(1e-6, 1e-3, a.shape).astype(np.float32), params)
    g = jax.grad(lambda p: jnp.mean(model.per_example_loss(p, jnp.asarray(target), cfg)))(params)
    want = jax.tree_util.tree_map(
        lambda a, v: np.asarray(a) / (np.sqrt(v / (1 - 0.99 ** 40)) + 1e-8), g, nu)

    def close(x, w):
        np.testing.assert_allclose(x, w, rtol=1e-4, atol=1e-6 * np.abs(w).max())

    every = scorer.target_direction(params, target, cfg, nu, 40, b2=0.99, batch_size=3, parts="all")
    for w, x in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(every)):
        close(x, w)
    last = scorer.target_direction(params, target, cfg, nu, 40, b2=0.99, eps=1e-8, batch_size=4)
    close(last["embed"], want["embed"])
    close(last["norm_f"], want["norm_f"])
    close(last["w_down"], want["blocks"]["w_down"][-1])
    with pytest.raises(ValueError, match="target_seqs"):
        scorer.target_direction(params, target[:0], cfg, nu, 40)
    with pytest.raises(ValueError, match="parts"):
        scorer.target_direction(params, target, cfg, nu, 40, parts="first_layer")


def test_features_with_alignment_append_loss_and_alignment_columns():
    import jax.numpy as jnp

    from mgd.pipeline import model
    cfg, params = _tiny_model(3)
    rng = np.random.default_rng(7)
    seqs = rng.integers(0, 29, (6, 13)).astype(np.int32)
    direction = _random_direction(rng)
    feats = scorer.extract_features((params, direction), seqs, cfg, batch_size=4, progress=False,
                                    features_fn=scorer.features_with_loss_and_alignment)
    assert feats.shape == (6, 16 + 1 + len(scorer.ALIGNMENT_COLUMNS))
    base = np.asarray(scorer.features_with_loss(params, jnp.asarray(seqs), cfg))
    np.testing.assert_allclose(feats[:, :17], base, rtol=1e-5, atol=1e-6)
    fwd = model.forward_with_last_layer(params, jnp.asarray(seqs[:, :-1]), cfg)
    align = scorer.last_layer_alignment(params, *fwd, jnp.asarray(seqs[:, 1:]), direction, cfg)
    np.testing.assert_allclose(feats[:, 17:], np.asarray(align), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_gradient_alignment_is_each_rows_whole_gradient_inner_product():
    """Against autodiff one row at a time: each row's whole loss gradient dotted with a
    fresh random direction over every parameter."""
    import jax
    import jax.numpy as jnp

    from mgd.pipeline import model
    cfg, params = _tiny_model(4, loss_chunk=7)
    rng = np.random.default_rng(8)
    seqs = jnp.asarray(rng.integers(0, 29, (5, 13)), jnp.int32)
    direction = jax.tree_util.tree_map(
        lambda a: rng.standard_normal(a.shape).astype(np.float32), params)
    got = np.asarray(scorer.gradient_alignment(params, direction, seqs, cfg))
    want = np.zeros(5)
    for i in range(5):
        g = jax.grad(lambda p, i=i: model.per_example_loss(p, seqs[i:i + 1], cfg)[0])(params)
        want[i] = sum(jnp.vdot(a, d) for a, d in zip(jax.tree_util.tree_leaves(g),
                                                     jax.tree_util.tree_leaves(direction)))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5 * np.abs(want).max())
    assert np.ptp(want) > 0
    with pytest.raises(ValueError, match="direction"):
        scorer.gradient_alignment(params, {"embed": direction["embed"]}, seqs, cfg)


def test_features_with_gradient_alignment_append_the_whole_model_column():
    import jax
    import jax.numpy as jnp
    cfg, params = _tiny_model(6)
    rng = np.random.default_rng(10)
    seqs = rng.integers(0, 29, (6, 13)).astype(np.int32)
    whole = jax.tree_util.tree_map(lambda a: rng.standard_normal(a.shape).astype(np.float32),
                                   params)
    # The last layer's columns take their part of the one whole-model direction.
    last = {"embed": whole["embed"], "norm_f": whole["norm_f"],
            "w_down": whole["blocks"]["w_down"][-1]}
    feats = scorer.extract_features((params, whole), seqs, cfg, batch_size=4, progress=False,
                                    features_fn=scorer.features_with_gradient_alignment)
    first = np.asarray(scorer.features_with_loss_and_alignment((params, last), jnp.asarray(seqs), cfg))
    assert feats.shape == (6, first.shape[1] + 1)
    np.testing.assert_allclose(feats[:, :-1], first, rtol=1e-5, atol=1e-6)
    column = np.asarray(scorer.gradient_alignment(params, whole, jnp.asarray(seqs), cfg))
    np.testing.assert_allclose(feats[:, -1], column, rtol=1e-4, atol=1e-5 * np.abs(column).max())
