"""The distilled scorer with and without the output-layer alignment feature, on CPU.

    MGD_DATA_DIR=../shared/data python compare.py OUT_DIR

Runs the pipeline up to the `random` baseline (corpus, base model, oracle, features,
scorer) for two configurations, each twice (alignment feature off, on): `smoke` (the
preset: a 1-layer, 32-wide model) and `mid` (the smoke corpus with a 3-layer, 64-wide
model trained for 600 steps and 96 oracle rounds of 32 rows). The oracle labels are
computed once per configuration and reused (the feature does not touch the oracle's
inputs), so the two scorer fits see the same labels. Prints one JSON line per run:
the run's own held-out Spearman (seed 0), and its mean and spread over ten random
held-out splits (20% each) of the same labeled rows; the cluster shares of the scorer's
top 10% of the corpus; and, once per configuration, the
Spearman between the labels and the full first-order estimate of them, the
Adam-preconditioned inner product of each row's whole loss gradient with the target's
(autodiff, one row at a time), which bounds what a first-order feature could reach.
"""
import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import spearmanr

from mgd.pipeline import artifacts, presets, run, scorer
from mgd.pipeline.corpus import Corpus
from mgd.pipeline.model import GPTConfig, per_example_loss
from mgd.pipeline.oracle import Labels


def first_order(d, plan):
    corpus = Corpus.load(d)
    cfg = GPTConfig(vocab_size=corpus.vocab_size, seq_len=corpus.tokens.shape[1] - 1,
                    **plan["model"])
    base = run.load_params(d / "base" / "params.npz", cfg)
    _, nu, count = run._base_adam_state(d / "base", cfg)
    labels = Labels.load(d)
    pre = jax.tree_util.tree_map(lambda v: 1 / (jnp.sqrt(v / (1 - 0.999 ** int(count))) + 1e-8), nu)
    g_phi = jax.grad(lambda p: jnp.mean(per_example_loss(p, jnp.asarray(corpus.target_tokens), cfg)))(base)
    direction = jax.tree_util.tree_map(jnp.multiply, pre, g_phi)

    def align(row):
        g = jax.grad(lambda p: per_example_loss(p, row[None], cfg)[0])(base)
        return sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(g),
                                                  jax.tree_util.tree_leaves(direction)))
    a = np.asarray(jax.lax.map(align, jnp.asarray(corpus.tokens[labels.indices]), batch_size=64))
    return float(spearmanr(a, labels.scores).statistic)


def top_tenth_shares(d):
    """Cluster shares (on-target, off-target, corrupt) of the distilled scorer's top 10%."""
    cluster = Corpus.load(d).cluster
    scores = artifacts.load_arrays(d / "scorer" / "scores.npz")["scores"]
    top = np.argsort(-scores)[:len(scores) // 10]
    return (np.bincount(cluster[top], minlength=3) / len(top)).round(4).tolist()


def split_spread(d, plan):
    feats = artifacts.load_arrays(d / "features" / "features.npz")["features"]
    labels = Labels.load(d)
    out = {}
    for seed in range(10):
        fit = scorer.fit_scorer(feats, labels.indices, labels.scores, seed=seed,
                                holdout_fraction=0.2, regressors=("ridge", "mlp"),
                                mlp_hidden=plan["scorer"]["mlp_hidden"])
        for k, v in fit.summary()["heldout_spearman"].items():
            out.setdefault(k, []).append(v)
    return {k: {"mean": float(np.mean(v)), "std": float(np.std(v))} for k, v in out.items()}

out = Path(sys.argv[1])
configs = {
    "smoke": presets.smoke(),
    "mid": presets.smoke().replace(
        name="mid", model=dict(n_layer=3, n_head=2, d_model=64, compute_dtype="float32"),
        base_train=dict(steps=600, batch_size=16, lr=3e-3, warmup=20, eval_every=0,
                        ckpt_every=200),
        oracle=dict(k=32, inner_steps=4, inner_lr=1e-4, rounds=96, target_batch=32,
                    pool_size=512)),
}
for name, preset in configs.items():
    for align in (False, True):
        p = preset.replace(scorer={**preset.scorer, "alignment_feature": align})
        d = out / f"{name}-align{int(align)}"
        if align:   # same corpus, base model and labels as the run without the feature
            shutil.copytree(out / f"{name}-align0", d, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("features", "scorer", "select-*",
                                                          "continued-*", "report", "plan.json"))
        run.run(p, out=d, progress=False, quiet=True, methods=("random",))
        s = json.loads((d / "scorer" / "summary.json").read_text())
        o = json.loads((d / "oracle" / "summary.json").read_text())
        plan = json.loads((d / "plan.json").read_text())
        print(json.dumps({"config": name, "alignment_feature": align, "features": s["features"],
                          "heldout_spearman": s["heldout_spearman"], "winner": s["winner"],
                          "n_heldout": s["n_heldout"],
                          "ten_splits": split_spread(d, plan),
                          "top_10pct_cluster_shares": top_tenth_shares(d),
                          "label_reliability": o["label_reliability"]}), flush=True)
    print(json.dumps({"config": name, "labels_vs_full_first_order_spearman":
                      first_order(out / f"{name}-align0", plan)}), flush=True)
