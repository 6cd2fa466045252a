"""Top-k of the distilled score against a diversity-aware greedy selection (maximal
marginal relevance: each next row maximizes its standardized score minus `weight` times
its largest cosine similarity, in the scorer's standardized feature space, to a row
already chosen), on finished runs.

    python diverse_selection.py RUN_DIR [RUN_DIR ...] > diverse_selection.log

Each run's own base model, corpus, features and distilled scores; the same continued
pretraining (3 seeds) as the run's methods (`experiments/offline.py`; nothing is written).
One JSON line per run and rule: evaluation loss mean and spread, on-target share, and the
run's on-target oracle and perplexity-correlations results for reference.
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/offline.py
import offline  # noqa: E402
from mgd.pipeline.selection import top_k


def mmr(z, features, k, weight):
    """Greedy: argmax of z_i - weight * max_{j chosen} cos(x_i, x_j)."""
    x = (features - features.mean(0)) / (features.std(0) + 1e-8)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    penalty = np.full(z.shape[0], -1.0)      # no row chosen yet: nothing to be close to
    chosen = np.zeros(z.shape[0], bool)
    picks = []
    for _ in range(k):
        gain = np.where(chosen, -np.inf, z - weight * np.maximum(penalty, 0.0))
        i = int(np.argmax(gain))
        picks.append(i)
        chosen[i] = True
        penalty = np.maximum(penalty, x @ x[i])
    return np.array(picks, np.int64)


for run_dir in sys.argv[1:]:
    run = offline.load(run_dir)
    scores = run.distilled_scores()
    z = (scores - scores.mean()) / scores.std()
    features = run.features()
    ref = {m: round(run.mean_eval_loss(m), 4) for m in ("oracle_ontarget", "ppl_correlations")}
    for rule, weight in (("top_k", None), ("mmr_w0.25", 0.25), ("mmr_w0.5", 0.5),
                         ("mmr_w1", 1.0), ("mmr_w2", 2.0)):
        idx = top_k(z, run.k) if weight is None else mmr(z, features, run.k, weight)
        print(offline.summary_line(
            run_dir, rule, run.train_seeds(idx),
            ontarget_share=round(float(np.mean(run.corpus.cluster[idx] == 0)), 3), **ref),
            flush=True)
