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

import jax.numpy as jnp
import numpy as np

from mgd.pipeline import model as model_lib, scorer
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
    loss = np.asarray(model_lib.per_example_loss(params, jnp.asarray(seqs), cfg), np.float64)
    norm = scorer.preconditioned_gradient_norms(params, seqs, cfg, nu, count)
    dot = np.asarray(scorer.gradient_alignment(params, direction, seqs, cfg), np.float64)
    lab = labels.scores
    on = cluster == 0
    sp = lambda a, b: round(scorer.spearman(a, b), 3)  # noqa: E731

    def mean_ontarget_loss(order):
        top = order[:len(order) // 10]
        return round(float(loss[top][on[top]].mean()), 4)

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
            "label": mean_ontarget_loss(np.argsort(-lab)),
            "first_order_over_norm": mean_ontarget_loss(np.argsort(-dot / norm)),
            "all_ontarget": round(float(loss[on].mean()), 4)},
    }


for d in sys.argv[1:]:
    print(json.dumps(analyze(d)), flush=True)
