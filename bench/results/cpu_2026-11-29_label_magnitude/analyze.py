"""Do the metagradient labels follow each row's gradient magnitude, and does dividing it
out (a cosine in the inner Adam's geometry, as LESS does for gradient inner products)
make the top of the ranking more on-target?

    python analyze.py RUN_DIR [RUN_DIR ...]   (finished runs with base/, oracle/, corpus/)

For each labeled row: its loss at the base model, the norm of its loss gradient in the
geometry the inner Adam steps in (g / sqrt(sqrt(nu_hat) + eps), so that the squared norm
is the row's preconditioned inner product with itself), and its preconditioned inner
product with the target loss's gradient (the label's first-order estimate). Prints one
JSON object per run.
"""
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mgd.pipeline import artifacts, model as model_lib, scorer
from mgd.pipeline.corpus import Corpus
from mgd.pipeline.model import GPTConfig
from mgd.pipeline.oracle import Labels
from mgd.pipeline.run import _base_adam_state, load_params


def shares(cluster, order, fraction=0.1):
    top = order[:max(1, int(len(order) * fraction))]
    return (np.bincount(cluster[top], minlength=3) / len(top)).round(3).tolist()


def analyze(d):
    d = Path(d)
    plan = json.loads((d / "plan.json").read_text())
    corpus = Corpus.load(d)
    cfg = GPTConfig(vocab_size=corpus.vocab_size, seq_len=corpus.seq_len, **plan["model"])
    params = load_params(d / "base" / "params.npz", cfg)
    _, nu, count = _base_adam_state(d / "base", cfg)
    labels = Labels.load(d)
    rows = labels.indices
    seqs = corpus.tokens[rows]
    cluster = corpus.cluster[rows]
    direction = scorer.target_direction(params, corpus.target_tokens, cfg, nu, count, parts="all")
    correction = 1.0 - 0.999 ** int(count)
    # sqrt(1 / (sqrt(nu_hat) + eps)): the inner Adam's metric, split between both sides
    half = jax.tree_util.tree_map(
        lambda v: jnp.sqrt(1.0 / (jnp.sqrt(jnp.asarray(v, jnp.float32) / correction) + 1e-8)), nu)
    leaves = jax.tree_util.tree_leaves

    @jax.jit
    def per_row(x):
        loss, g = jax.value_and_grad(
            lambda p: model_lib.per_example_loss(p, x[None], cfg)[0])(params)
        sq = sum(jnp.sum((a.astype(jnp.float32) * h) ** 2) for a, h in zip(leaves(g), leaves(half)))
        dot = sum(jnp.sum(a.astype(jnp.float32) * t) for a, t in zip(leaves(g), leaves(direction)))
        return loss, jnp.sqrt(sq), dot

    out = np.array([per_row(jnp.asarray(x)) for x in seqs], np.float64)
    loss, norm, dot = out.T
    lab = labels.scores
    on = cluster == 0
    sp = lambda a, b: round(scorer.spearman(a, b), 3)  # noqa: E731
    return {
        "run": str(d), "labeled_rows": int(len(rows)),
        "labeled_cluster_shares": (np.bincount(cluster, minlength=3) / len(rows)).round(3).tolist(),
        "spearman_label_vs_first_order": sp(lab, dot),
        "spearman_label_vs_grad_norm": {"all": sp(lab, norm), "ontarget": sp(lab[on], norm[on]),
                                        "offtarget": sp(lab[cluster == 1], norm[cluster == 1])},
        "spearman_label_vs_loss": {"all": sp(lab, loss), "ontarget": sp(lab[on], loss[on])},
        "mean_grad_norm_by_cluster": [round(float(norm[cluster == c].mean()), 4) for c in range(3)],
        "top10_shares_by": {
            "label": shares(cluster, np.argsort(-lab)),
            "first_order": shares(cluster, np.argsort(-dot)),
            "first_order_over_norm": shares(cluster, np.argsort(-dot / norm)),
            "label_over_norm": shares(cluster, np.argsort(-lab / norm)),
        },
        "top10_mean_loss_vs_all_ontarget": {
            "label": round(float(loss[np.argsort(-lab)[:len(lab) // 10]][on[np.argsort(-lab)[:len(lab) // 10]]].mean()), 4),
            "first_order_over_norm": round(float(loss[np.argsort(-dot / norm)[:len(lab) // 10]][on[np.argsort(-dot / norm)[:len(lab) // 10]]].mean()), 4),
            "all_ontarget": round(float(loss[on].mean()), 4)},
    }


for d in sys.argv[1:]:
    print(json.dumps(analyze(d)), flush=True)
