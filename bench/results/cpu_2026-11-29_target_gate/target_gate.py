"""First pass (rule written inline): the target-mode selection with a target-likeness gate.

    [MGD_GATE_Q=0.9,0.99] python target_gate.py RUN_DIR [RUN_DIR ...] > first_pass.log

Rule: as `mgd run --target-modes 4` (k-means on the target set's mean-pooled hidden
states, standardized by the target's spread; quotas by the target's shares, filled by
the distilled score inside each mode), but only rows whose distance to their mode's
centre is at most the q-quantile of the target rows' own distances to theirs are
eligible; the budget left when the eligible rows run out goes to the highest scores
among the rest. The aim: keep the score from reaching for rows unlike anything in the
target (off-target text, and the atypical on-target rows its extremes favour,
../cpu_2026-11-29_target_modes/within_cluster.log). Nothing is written.
"""
import os
import sys

import numpy as np
from sklearn.cluster import KMeans

from mgd.pipeline import offline, scorer
from mgd.pipeline.selection import stratified_top_k, top_k

QS = [float(q) for q in os.environ.get("MGD_GATE_Q", "0.9,0.99").split(",")]
M = 4


def modes_and_distance(target, corpus, n_modes, seed=0):
    mu, sd = target.mean(0), target.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    t, x = (target - mu) / sd, (corpus - mu) / sd
    km = KMeans(n_clusters=n_modes, n_init=8, random_state=seed).fit(t)
    share = np.bincount(km.labels_, minlength=n_modes) / t.shape[0]
    mode = km.predict(x)
    dist = np.linalg.norm(x - km.cluster_centers_[mode], axis=1)
    tdist = np.linalg.norm(t - km.cluster_centers_[km.labels_], axis=1)
    return mode, share, dist, tdist


for run_dir in sys.argv[1:]:
    run = offline.load(run_dir)
    scores = run.distilled_scores()
    corpus_pooled = run.features()[:, :run.model_cfg.d_model].astype(np.float64)
    target_pooled = scorer.extract_features(run.base, run.corpus.target_tokens, run.model_cfg,
                                            progress=False).astype(np.float64)
    ref = {m: round(run.mean_eval_loss(m), 4) for m in ("oracle_ontarget", "ppl_correlations")}
    mode, share, dist, tdist = modes_and_distance(target_pooled, corpus_pooled, M)
    onc = run.corpus.cluster == 0
    rules = [("modes_4", None)] + [(f"gate{q}_modes_4", q) for q in QS]
    for rule, q in rules:
        if q is None:
            idx = stratified_top_k(scores, mode, share, run.k)
            extra = {}
        else:
            tau = np.quantile(tdist, q)
            eligible = dist <= tau
            gated = np.where(eligible, scores, np.nan)
            idx = stratified_top_k(gated, mode, share, run.k)
            extra = {"eligible": int(eligible.sum()),
                     "eligible_ontarget": round(float(onc[eligible].mean()), 3),
                     "ontarget_kept": round(float(eligible[onc].mean()), 3)}
        assert len(np.unique(idx)) == run.k
        print(offline.summary_line(
            run_dir, rule, run.train_seeds(idx),
            ontarget_share=round(float(np.mean(onc[idx])), 3), **ref, **extra), flush=True)
