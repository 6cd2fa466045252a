"""Top-k of the distilled score against sampling without replacement in proportion to
exp(z / temperature) (Gumbel top-k, as DSIR resamples by its importance weights), z the
distilled score standardized over the corpus, on finished runs.

    python soft_selection.py RUN_DIR [RUN_DIR ...] > soft_selection.log

Each run's own base model, corpus and distilled scores; the same continued pretraining
(3 seeds) as the run's methods (`experiments/offline.py`; nothing is written). One JSON line
per run and rule: evaluation loss mean and spread, on-target share, and the run's
on-target oracle for reference.
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/offline.py
import offline  # noqa: E402
from mgd.pipeline.selection import top_k


def gumbel_top_k(z, k, temperature, seed):
    g = np.random.default_rng(seed).gumbel(size=z.shape)
    return top_k(z / temperature + g, k)


for run_dir in sys.argv[1:]:
    run = offline.load(run_dir)
    scores = run.distilled_scores()
    z = (scores - scores.mean()) / scores.std()
    oracle = round(run.mean_eval_loss("oracle_ontarget"), 4)
    for rule, temperature in (("top_k", None), ("gumbel_t0.5", 0.5), ("gumbel_t1", 1.0)):
        losses, shares = [], []
        for s in range(run.plan["seeds"]):
            idx = top_k(z, run.k) if temperature is None else gumbel_top_k(z, run.k, temperature, s)
            losses.append(run.train(idx, s))
            shares.append(float(np.mean(run.corpus.cluster[idx] == 0)))
        print(offline.summary_line(run_dir, rule, losses, ontarget_share=round(np.mean(shares), 3),
                                   oracle_ontarget=oracle), flush=True)
