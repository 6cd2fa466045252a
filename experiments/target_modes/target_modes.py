"""Top-k of the distilled score against a selection stratified by the target's modes, on
finished runs.

    [MGD_MODES=2,4,8] python target_modes.py RUN_DIR [RUN_DIR ...] > target_modes.log

Rule (`selection.target_modes` and `selection.stratified_top_k`, what `mgd run
--target-modes M` does): k-means (M modes) on the target set's mean-pooled final hidden
states under the base model; every corpus row goes to its nearest mode (same
standardized space); each mode gets a quota of the budget in proportion to its share of
the target set, filled by the mode's highest distilled scores (a mode short of rows
passes its remainder to the global top k). The aim: the selection's mix of kinds of
text follows the target's, while the metagradient score still ranks inside each kind. Same base model, scores,
budget and continued pretraining (3 seeds) as the run's methods (`experiments/offline.py`;
nothing is written).
"""
import os
import sys
from pathlib import Path

import numpy as np

from mgd.pipeline import scorer
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/offline.py
import offline  # noqa: E402
from mgd.pipeline.selection import stratified_top_k, target_modes, top_k

# The mode counts compared with the top k: $MGD_MODES (comma-separated), 2,4,8 by default.
MODES = [int(m) for m in os.environ.get("MGD_MODES", "2,4,8").split(",")]


for run_dir in sys.argv[1:]:
    run = offline.load(run_dir)
    scores = run.distilled_scores()
    corpus_pooled = run.features()[:, :run.model_cfg.d_model]
    target_pooled = scorer.extract_features(run.base, run.corpus.target_tokens, run.model_cfg,
                                            progress=False)
    ref = {m: round(run.mean_eval_loss(m), 4) for m in ("oracle_ontarget", "ppl_correlations")}
    for rule, modes in (("top_k", None),) + tuple((f"modes_{m}", m) for m in MODES):
        if modes is None:
            idx = top_k(scores, run.k)
        else:
            idx = stratified_top_k(scores, *target_modes(target_pooled, corpus_pooled, modes),
                                   run.k)
        assert len(np.unique(idx)) == run.k
        print(offline.summary_line(
            run_dir, rule, run.train_seeds(idx),
            ontarget_share=round(float(np.mean(run.corpus.cluster[idx] == 0)), 3), **ref),
            flush=True)
