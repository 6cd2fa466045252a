"""The target-mode selection with a target-likeness gate, on finished runs.

    [MGD_GATE_Q=0.9,0.99] python target_gate.py RUN_DIR [RUN_DIR ...] > first_pass.log

Rule (`selection.fit_target_modes`, `TargetModes.typical`, `stratified_top_k(eligible=)`:
what `mgd run --target-modes 4 --target-gate Q` does): k-means on the target set's
mean-pooled hidden states, standardized by the target's spread; quotas by the target's
shares, filled by the distilled score inside each mode; only rows whose distance to
their mode's centre is at most the q-quantile of the target rows' own distances to
theirs are eligible; the budget left when the eligible rows run out goes to the highest
scores among the rest. The aim: keep the score from reaching for rows unlike anything
in the target (off-target text, and the atypical on-target rows its extremes favour,
../target_modes/within_cluster.log). Nothing is written.
"""
import os
import sys
from pathlib import Path

import numpy as np

from mgd.pipeline import scorer
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/offline.py
import offline  # noqa: E402
from mgd.pipeline.selection import fit_target_modes, stratified_top_k

QS = [float(q) for q in os.environ.get("MGD_GATE_Q", "0.9,0.99").split(",")]


for run_dir in sys.argv[1:]:
    run = offline.load(run_dir)
    scores = run.distilled_scores()
    corpus_pooled = run.features()[:, :run.model_cfg.d_model]
    target_pooled = scorer.extract_features(run.base, run.corpus.target_tokens, run.model_cfg,
                                            progress=False)
    ref = {m: round(run.mean_eval_loss(m), 4) for m in ("oracle_ontarget", "ppl_correlations")}
    modes = fit_target_modes(target_pooled, corpus_pooled, 4)
    onc = run.corpus.cluster == 0
    rules = [("modes_4", None)] + [(f"gate{q}_modes_4", q) for q in QS]
    for rule, q in rules:
        eligible = None if q is None else modes.typical(q)
        idx = stratified_top_k(scores, modes.mode_of_row, modes.share, run.k, eligible)
        extra = {}
        if q is not None:
            extra = {"eligible": int(eligible.sum()),
                     "eligible_ontarget": round(float(onc[eligible].mean()), 3),
                     "ontarget_kept": round(float(eligible[onc].mean()), 3)}
        assert len(np.unique(idx)) == run.k
        print(offline.summary_line(
            run_dir, rule, run.train_seeds(idx),
            ontarget_share=round(float(np.mean(onc[idx])), 3), **ref, **extra), flush=True)
