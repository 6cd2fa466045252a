"""The metagradient oracle: exact against finite differences, bookkeeping, devices, clusters."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.stats import spearmanr

from mgd.errors import UsageError
from mgd.pipeline import model, oracle
from tests.pipeline.shared_data import DATA, needs_data

TINY64 = model.GPTConfig(vocab_size=41, seq_len=8, n_layer=1, n_head=2, d_model=16,
                         attention_impl="xla", compute_dtype="float64", param_dtype="float64")


def _phi_by_hand(params, cfg, train_seqs, target_seqs, w, steps, lr, eps_root, adam_state=None):
    """Independent reference: the inner loop unrolled in Python, no remat, no micro-batches."""
    opt = optax.adam(lr, eps_root=eps_root)
    state = opt.init(params)
    if adam_state is not None:
        mu, nu, count = adam_state
        state = (optax.ScaleByAdamState(count=jnp.int32(count), mu=mu, nu=nu), state[1])
    theta = params
    k = len(train_seqs)
    for _ in range(steps):
        g = jax.grad(lambda p: jnp.sum(w * model.per_example_loss(p, train_seqs, cfg)) / k)(theta)
        upd, state = opt.update(g, state, theta)
        theta = optax.apply_updates(theta, upd)
    return jnp.mean(model.per_example_loss(theta, target_seqs, cfg))


def _fake_adam_state(params, rng, count=100):
    """A base run's Adam moments, drawn at the scale of real ones (nu ~ g^2 > 0)."""
    mu = jax.tree_util.tree_map(lambda x: 1e-2 * rng.standard_normal(x.shape).astype(x.dtype),
                                params)
    nu = jax.tree_util.tree_map(lambda x: (1e-3 * (0.5 + rng.random(x.shape))).astype(x.dtype),
                                params)
    return mu, nu, count


# Every level of rematerialization on (frugal), none (keep_all), and block remat that
# keeps attention's outputs (lean; with micro-batch and segment remat too).
PLANS = {"lean": oracle.PLANS["lean"], "frugal": oracle.PLANS["frugal"],
         "keep_all": oracle.PLANS["keep_all"],
         "kept-attention": oracle.RematPlan(block="attention", micro_batch=True, segments=True)}


@pytest.mark.parametrize("plan", ["lean", "frugal"])
@pytest.mark.parametrize("warm", [False, True], ids=["fresh-adam", "warm-adam"])
def test_tau_matches_central_finite_differences(warm, plan):
    rng = np.random.default_rng(0)
    params = model.init_params(TINY64, jax.random.key(0))
    params = jax.tree_util.tree_map(lambda x: x + 0.2 * rng.standard_normal(x.shape), params)
    adam_state = _fake_adam_state(params, rng) if warm else None
    k = 8
    train_seqs = rng.integers(0, TINY64.vocab_size, (k, 9))
    target_seqs = rng.integers(0, TINY64.vocab_size, (5, 9))
    kw = dict(inner_steps=4, inner_lr=3e-2, eps_root=1e-12)
    # Micro-batches and nested segments on, so the remat paths are what is checked.
    tau, phi = jax.jit(lambda p, a, b, s: oracle.metagradient_round(
        p, TINY64, a, b, micro_batch=2, segments=2, return_phi=True, adam_state=s,
        remat=PLANS[plan], **kw))(
            params, train_seqs, target_seqs, adam_state)
    phi_w = jax.jit(lambda w: _phi_by_hand(params, TINY64, train_seqs, target_seqs, w,
                                           4, 3e-2, 1e-12, adam_state))
    assert float(phi) == pytest.approx(float(phi_w(np.ones(k))), rel=1e-12)
    h = 1e-6
    fd = np.array([(phi_w(1 + h * e) - phi_w(1 - h * e)) / (2 * h) for e in np.eye(k)])
    tau = np.asarray(tau)
    assert spearmanr(tau, fd).statistic >= 0.95
    assert np.all(np.sign(tau) == np.sign(fd))
    assert np.abs(tau - fd).max() <= 1e-3 * np.abs(fd).max()


@pytest.mark.parametrize("plan", ["lean", "frugal", "keep_all"])
@pytest.mark.parametrize("steps,segments,micro", [(5, 2, 2), (3, 3, None), (2, 1, None),
                                                  (1, None, 2)])
def test_tau_matches_autodiff_for_every_checkpoint_schedule(steps, segments, micro, plan):
    """The written-out two-level reverse sweep equals plain reverse-mode autodiff of
    the unrolled loop, under every remat plan: an uneven last segment (5 = 3 + 2), one
    step per segment, a single segment, and one step (all of it the fused last step)."""
    rng = np.random.default_rng(steps)
    params = model.init_params(TINY64, jax.random.key(1))
    params = jax.tree_util.tree_map(lambda x: x + 0.2 * rng.standard_normal(x.shape), params)
    k = 4
    train_seqs = rng.integers(0, TINY64.vocab_size, (k, 9))
    target_seqs = rng.integers(0, TINY64.vocab_size, (3, 9))
    tau, phi = jax.jit(lambda p, a, b: oracle.metagradient_round(
        p, TINY64, a, b, steps, 3e-2, micro_batch=micro, segments=segments, return_phi=True,
        remat=PLANS[plan]))(
            params, train_seqs, target_seqs)
    ref_phi, ref_tau = jax.jit(jax.value_and_grad(lambda w: _phi_by_hand(
        params, TINY64, train_seqs, target_seqs, w, steps, 3e-2, 1e-12)))(np.ones(k))
    assert float(phi) == pytest.approx(float(ref_phi), rel=1e-12)
    np.testing.assert_allclose(np.asarray(tau), np.asarray(ref_tau), rtol=1e-9,
                               atol=1e-12 * float(np.abs(ref_tau).max()))


def test_adam_must_be_differentiable():
    with pytest.raises(ValueError, match="eps_root"):
        oracle.OracleConfig(eps_root=0.0)
    with pytest.raises(ValueError, match="micro_batch"):
        oracle.OracleConfig(k=10, micro_batch=4)


def test_zscore_and_aggregate():
    round_indices = np.array([[5, 2, 9], [9, 5, 7]])
    round_tau = np.array([[1.0, 2.0, 3.0], [-4.0, 0.0, 4.0]])
    idx, scores, counts = oracle.aggregate(round_indices, round_tau)
    z1 = -(np.array([1.0, 2.0, 3.0]) - 2.0) / np.sqrt(2 / 3)      # s = -tau, z-scored
    z2 = -(np.array([-4.0, 0.0, 4.0])) / np.sqrt(32 / 3)
    assert idx.tolist() == [2, 5, 7, 9] and counts.tolist() == [1, 2, 1, 2]
    np.testing.assert_allclose(scores, [z1[1], (z1[0] + z2[1]) / 2, z2[2], (z1[2] + z2[0]) / 2])
    assert np.all(oracle.zscore(np.ones((2, 4))) == 0)


def test_plan_rounds_covers_rows_evenly():
    oc = oracle.OracleConfig(k=4, rounds=15, target_batch=3, seed=1)
    rounds, targets = oracle.plan_rounds(10, oc, n_target=7)
    assert rounds.shape == (15, 4) and targets.shape == (15, 3)
    assert all(len(set(r)) == 4 for r in rounds) and all(len(set(t)) == 3 for t in targets)
    counts = np.bincount(rounds.reshape(-1), minlength=10)
    assert counts.min() >= 4 and counts.max() <= 8
    pooled, _ = oracle.plan_rounds(100, oracle.OracleConfig(k=5, rounds=9, pool_size=20), 4)
    assert len(np.unique(pooled)) <= 20
    with pytest.raises(ValueError, match="exceeds"):
        oracle.plan_rounds(3, oc, 7)


@pytest.mark.parametrize("noise_sd", [0.5, 2.0])
def test_split_half_reliability_recovers_the_labels_signal_to_noise(noise_sd):
    """Labels = a per-row truth plus independent noise in each round: the reliability of
    the mean over a row's 8 rounds is 1 / (1 + noise_sd^2 / 8)."""
    rng = np.random.default_rng(3)
    round_indices, _ = oracle.plan_rounds(2048, oracle.OracleConfig(k=256, rounds=64), 4)
    truth = rng.standard_normal(2048)
    tau = -(truth[round_indices] + noise_sd * rng.standard_normal(round_indices.shape))
    expected = 1.0 / (1.0 + noise_sd ** 2 / 8)
    assert oracle.split_half_reliability(round_indices, tau) == pytest.approx(expected, abs=0.05)


def test_split_half_reliability_of_pure_noise_and_of_rows_seen_once():
    rng = np.random.default_rng(4)
    round_indices, _ = oracle.plan_rounds(2048, oracle.OracleConfig(k=256, rounds=64), 4)
    assert abs(oracle.split_half_reliability(
        round_indices, rng.standard_normal(round_indices.shape))) < 0.1
    once = np.arange(12).reshape(3, 4)   # every row in one round only: nothing to split
    assert np.isnan(oracle.split_half_reliability(once, rng.standard_normal((3, 4))))


LABEL_CFG = model.GPTConfig(vocab_size=37, seq_len=8, n_layer=1, n_head=2, d_model=16,
                            attention_impl="xla", compute_dtype="float32")


def _fake_corpus(seed=0, n=24):
    rng = np.random.default_rng(seed)
    return types.SimpleNamespace(
        tokens=rng.integers(0, 37, (n, 9)).astype(np.int32),
        target_tokens=rng.integers(0, 37, (6, 9)).astype(np.int32))


def test_label_persists_resumes_and_matches_direct_rounds(tmp_path):
    corpus = _fake_corpus()
    params = model.init_params(LABEL_CFG, jax.random.key(0))
    adam_state = _fake_adam_state(params, np.random.default_rng(5))
    oc = oracle.OracleConfig(k=6, inner_steps=2, inner_lr=1e-2, rounds=5, target_batch=4,
                             micro_batch=3)
    with pytest.raises(ValueError, match="adam_state"):
        oracle.label(params, corpus, LABEL_CFG, oc, tmp_path / "no_state", progress=False)
    labels = oracle.label(params, corpus, LABEL_CFG, oc, tmp_path, progress=False,
                          adam_state=adam_state)
    assert (tmp_path / "oracle" / "DONE").exists() and not (tmp_path / "oracle_partial.npz").exists()
    assert labels.round_ids.tolist() == list(range(5)) and labels.round_tau.shape == (5, 6)
    assert np.all(np.isfinite(labels.round_tau)) and np.all(np.isfinite(labels.round_phi))
    # Phi before the inner steps, per round: the base model's mean loss on those targets.
    for r in (0, 3):
        rows = corpus.target_tokens[labels.round_targets[r]]
        assert labels.round_phi0[r] == pytest.approx(
            float(jnp.mean(model.per_example_loss(params, rows, LABEL_CFG))), rel=1e-5)
    # Each round is the plain round function on the planned rows.
    fn = oracle.make_round_fn(LABEL_CFG, oc)
    for r in (0, 4):
        tau, phi = fn(params, corpus.tokens[labels.round_indices[r]],
                      corpus.target_tokens[labels.round_targets[r]], adam_state)
        np.testing.assert_allclose(labels.round_tau[r], tau, rtol=1e-5, atol=1e-9)
    idx, scores, counts = oracle.aggregate(labels.round_indices, labels.round_tau)
    np.testing.assert_array_equal(labels.indices, idx)
    np.testing.assert_allclose(labels.scores, scores)
    loaded = oracle.Labels.load(tmp_path)
    np.testing.assert_array_equal(loaded.round_indices, labels.round_indices)
    # Done: reused; different config: refused.
    assert oracle.label(params, corpus, LABEL_CFG, oc, tmp_path, progress=False,
                        adam_state=adam_state).scores.tolist() == labels.scores.tolist()
    with pytest.raises(ValueError, match="another OracleConfig"):
        oracle.label(params, corpus, LABEL_CFG, oracle.OracleConfig(k=6, rounds=6), tmp_path)

    # A killed run resumes from its partial file: plant 3 finished rounds with
    # marker values and check they are kept, not recomputed.
    other = tmp_path / "other"
    from mgd.pipeline import artifacts
    tau = labels.round_tau.copy()
    tau[:3] = 7.0
    artifacts.atomic_save_arrays(other / "oracle_partial.npz", round_indices=labels.round_indices,
                                 round_tau=tau, round_phi=labels.round_phi, done=np.int64(3))
    resumed = oracle.label(params, corpus, LABEL_CFG, oc, other, progress=False,
                           adam_state=adam_state)
    assert np.all(resumed.round_tau[:3] == 7.0)
    np.testing.assert_allclose(resumed.round_tau[3:], labels.round_tau[3:], rtol=1e-6)


_TWO_DEVICES = textwrap.dedent("""
    import json, types
    import jax, numpy as np
    assert jax.local_device_count() == 2, jax.devices()
    from mgd.pipeline import model, oracle
    LABEL_CFG = model.GPTConfig(**{cfg})
    rng = np.random.default_rng(1)
    corpus = types.SimpleNamespace(tokens=rng.integers(0, 37, (24, 9)).astype(np.int32),
                                   target_tokens=rng.integers(0, 37, (6, 9)).astype(np.int32))
    params = model.init_params(LABEL_CFG, jax.random.key(3))
    nu = jax.tree_util.tree_map(lambda x: 1e-3 + 1e-3 * jax.numpy.abs(x), params)
    state = (jax.tree_util.tree_map(lambda x: 1e-2 * x, params), nu, 50)
    oc = oracle.OracleConfig(k=6, inner_steps=2, inner_lr=1e-2, rounds=3, target_batch=4)
    labels = oracle.label(params, corpus, LABEL_CFG, oc, {run!r}, progress=False,
                          adam_state=state)
    fn = oracle.make_round_fn(LABEL_CFG, oc)
    direct = [np.asarray(fn(params, corpus.tokens[i], corpus.target_tokens[t], state)[0]).tolist()
              for i, t in zip(labels.round_indices, labels.round_targets)]
    print("RESULT " + json.dumps({{"sharded": labels.round_tau.tolist(), "direct": direct}}))
""")


def test_rounds_spread_over_two_forced_host_devices(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    import dataclasses
    code = _TWO_DEVICES.format(cfg=repr(dataclasses.asdict(LABEL_CFG)), run=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    # 3 rounds on 2 devices: one full group and one padded group.
    np.testing.assert_allclose(res["sharded"], res["direct"], rtol=1e-5, atol=1e-9)
    assert json.loads((tmp_path / "oracle" / "summary.json").read_text())["devices"] == 2


# ---------------------------------------------------------------- the clusters

def _cluster_experiment(tmp_path, *, n_on, seq_len, train_steps, k, inner_steps, rounds,
                        pool_size=None):
    """Build a corpus from the shared data, train a base model, label, and return
    the mean score and effect sizes per cluster."""
    from mgd.pipeline import corpus as C
    from mgd.pipeline import train as T
    cc = C.CorpusConfig(ontarget=str(DATA / "ontarget.jsonl.gz"),
                        offtarget=str(DATA / "offtarget.jsonl.gz"), n_ontarget=n_on,
                        n_offtarget=n_on, n_corrupt=n_on // 2, n_target=48,
                        n_eval=16, seq_len=seq_len, vocab_size=512, tokenizer_train_docs=400,
                        max_docs=1500, seed=0)
    c = C.build_corpus(cc, tmp_path)
    mc = model.GPTConfig(vocab_size=c.vocab_size, seq_len=seq_len, n_layer=2, n_head=2,
                         d_model=64, compute_dtype="float32", attention_impl="xla")
    params = model.init_params(mc, jax.random.key(0))
    params, _, opt_state = T.train(params, c.tokens, mc, T.TrainConfig(
        steps=train_steps, batch_size=32, lr=3e-3, warmup=20, eval_every=0), progress=False,
        return_opt_state=True)
    oc = oracle.OracleConfig(k=k, inner_steps=inner_steps, inner_lr=1e-3, rounds=rounds,
                             target_batch=48, pool_size=pool_size)
    labels = oracle.label(params, c, mc, oc, tmp_path, progress=False,
                          adam_state=T.adam_moments(opt_state))
    cl = c.cluster[labels.indices]
    by = {name: labels.scores[cl == i] for i, name in C.CLUSTERS.items()}

    def cohen_d(a, b):
        return (a.mean() - b.mean()) / np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)

    result = {"mean": {n: float(v.mean()) for n, v in by.items()},
              "rounds_per_row": float(labels.counts.mean()),
              "n": {n: int(len(v)) for n, v in by.items()},
              "d_on_off": float(cohen_d(by["ontarget"], by["offtarget"])),
              "d_off_corrupt": float(cohen_d(by["offtarget"], by["corrupt"])),
              "d_on_corrupt": float(cohen_d(by["ontarget"], by["corrupt"]))}
    print("cluster scores:", json.dumps(result))
    return result


needs_shared = needs_data


@needs_shared
def test_scores_order_clusters_fast(tmp_path):
    r = _cluster_experiment(tmp_path, n_on=240, seq_len=32, train_steps=200, k=24,
                            inner_steps=3, rounds=12)
    assert r["mean"]["ontarget"] > r["mean"]["offtarget"] > r["mean"]["corrupt"]


@needs_shared
@pytest.mark.slow
def test_scores_order_clusters(tmp_path):
    # A pool of 360 rows labeled in 54 rounds of 40: each row is scored ~6 times.
    r = _cluster_experiment(tmp_path, n_on=480, seq_len=64, train_steps=500, k=40,
                            inner_steps=4, rounds=54, pool_size=360)
    assert r["mean"]["ontarget"] > r["mean"]["offtarget"] > r["mean"]["corrupt"]
    assert r["d_on_off"] > 0.2 and r["d_off_corrupt"] > 0.2


def test_a_diverging_inner_loop_is_one_line_naming_the_settings(tmp_path, monkeypatch):
    """Non-finite tau is a settings problem: a UsageError (one line from the CLI) naming
    oracle.inner_lr, raised before anything non-finite is saved."""
    corpus = _fake_corpus(seed=3)
    params = model.init_params(LABEL_CFG, jax.random.key(1))
    oc = oracle.OracleConfig(k=6, inner_steps=2, inner_lr=1e-2, rounds=2, target_batch=4,
                             warm_start=False)

    def diverging(model_cfg, run_oc, devices):
        def fn(params, train, target, adam_state):
            return jnp.full(train.shape[:2], jnp.nan), jnp.zeros(train.shape[:1])
        return fn

    monkeypatch.setattr(oracle, "_sharded_round_fn", diverging)
    with pytest.raises(UsageError, match=r"oracle\.inner_lr \(now 0\.01\)"):
        oracle.label(params, corpus, LABEL_CFG, oc, tmp_path, progress=False)
    assert not (tmp_path / "oracle" / "DONE").exists()


def test_label_summary_says_whether_the_inner_steps_raised_the_target_loss(tmp_path):
    """A large inner_lr makes Phi rise in every round; the summary records it."""
    corpus = _fake_corpus(seed=2)
    params = model.init_params(LABEL_CFG, jax.random.key(4))
    oc = oracle.OracleConfig(k=6, inner_steps=3, inner_lr=0.3, rounds=3, target_batch=4,
                             warm_start=False)
    labels = oracle.label(params, corpus, LABEL_CFG, oc, tmp_path, progress=False)
    summary = json.loads((tmp_path / "oracle" / "summary.json").read_text())
    assert summary["phi_rose_fraction"] == pytest.approx(
        float(np.mean(labels.round_phi > labels.round_phi0)))
    assert summary["phi_rose_fraction"] > 0.5 and summary["phi_mean"] > summary["phi0_mean"]
    # 3 rounds of 6 rows out of 24 cover no row twice: no reliability to report.
    assert np.isnan(oracle.split_half_reliability(labels.round_indices, labels.round_tau))
    assert summary["label_reliability"] is None


def test_lean_frugal_and_kept_attention_agree_with_the_pallas_kernels():
    """The plans change what is recomputed, not tau: equal to float32 rounding with the
    Pallas kernels (interpreted), where keeping attention's outputs is a real path."""
    cfg = model.GPTConfig(vocab_size=41, seq_len=16, n_layer=1, n_head=2, d_model=32,
                          attention_impl="pallas", compute_dtype="float32")
    params = model.init_params(cfg, jax.random.key(2))
    rng = np.random.default_rng(2)
    train, target = rng.integers(0, 41, (2, 17)), rng.integers(0, 41, (2, 17))
    taus = {name: np.asarray(jax.jit(lambda p, a, b, plan=plan: oracle.metagradient_round(
        p, cfg, a, b, 2, 1e-2, micro_batch=1, remat=plan))(params, train, target))
        for name, plan in PLANS.items()}
    assert np.abs(taus["frugal"]).max() > 1e-4
    for name in ("lean", "keep_all", "kept-attention"):
        np.testing.assert_allclose(taus[name], taus["frugal"], rtol=1e-4,
                                   atol=1e-5 * np.abs(taus["frugal"]).max())


def test_remat_plan_by_name_dict_or_instance():
    assert oracle.OracleConfig().remat == oracle.PLANS["lean"]
    frugal = oracle.OracleConfig(remat="frugal")
    assert frugal.remat == oracle.PLANS["frugal"]
    import dataclasses
    assert oracle.OracleConfig(**dataclasses.asdict(frugal)) == frugal   # read back from JSON
    with pytest.raises(ValueError, match="remat plan"):
        oracle.OracleConfig(remat="fast")
    with pytest.raises(ValueError, match="RematPlan.block"):
        oracle.RematPlan(block="some")
