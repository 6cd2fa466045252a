"""The whole-model gradient-alignment column under the demo's selection rule, on finished
CPU runs: does the scorer that fits the labels best (held-out Spearman) also select best
once the selection is stratified by 4 target modes and gated at 0.99?

    python gradient_with_modes.py RUN_DIR [RUN_DIR ...] > gradient_with_modes.log

For each run: the run's own features and scorer (hidden state, loss, last-layer
alignment), and the same plus the whole-model gradient alignment
(`scorer.features_with_gradient_alignment`, as `mgd run --gradient-alignment` makes
them), each fit as the pipeline fits them (`scorer.fit_scorer`, the plan's settings);
each selects with 4 target modes and the 0.99 gate (`selection.fit_target_modes`,
`stratified_top_k`), and the selection is trained with the run's seeds and settings
(`experiments/offline.py`). Nothing is written.
"""
import sys
from pathlib import Path

import numpy as np

from mgd.pipeline import scorer
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/offline.py
import offline  # noqa: E402
from mgd.pipeline.oracle import Labels, OracleConfig
from mgd.pipeline.run import _base_adam_state
from mgd.pipeline.selection import fit_target_modes, stratified_top_k

for run_dir in sys.argv[1:]:
    run = offline.load(run_dir)
    plan, cfg, sc = run.plan, run.model_cfg, run.plan["scorer"]
    labels = Labels.load(run.run_dir)
    own = run.features()
    _, nu, count = _base_adam_state(run.run_dir / "base", cfg)
    oc = OracleConfig(**plan["oracle"])
    whole = scorer.target_direction(run.base, run.corpus.target_tokens, cfg, nu, count,
                                    b2=oc.b2, eps=oc.eps, parts="all")
    with_ga = scorer.extract_features((run.base, whole), run.corpus.tokens, cfg,
                                      features_fn=scorer.features_with_gradient_alignment,
                                      batch_size=plan["feature_batch"], progress=False)
    target = scorer.extract_features(run.base, run.corpus.target_tokens, cfg,
                                     batch_size=plan["feature_batch"], progress=False)
    modes = fit_target_modes(target, own[:, :cfg.d_model], 4)
    typical = modes.typical(0.99)
    ref = {m: round(run.mean_eval_loss(m), 4) for m in ("oracle_ontarget", "ppl_correlations")}
    for name, feats in (("modes4_gate0.99", own), ("gradient_modes4_gate0.99", with_ga)):
        fit = scorer.fit_scorer(feats, labels.indices, labels.scores, seed=0,
                                holdout_fraction=sc["holdout_fraction"],
                                regressors=tuple(sc["regressors"]), mlp_hidden=sc["mlp_hidden"])
        idx = stratified_top_k(fit.scores, modes.mode_of_row, modes.share, run.k, typical)
        print(offline.summary_line(
            run_dir, name, run.train_seeds(idx),
            ontarget_share=round(float(np.mean(run.corpus.cluster[idx] == 0)), 3),
            heldout_spearman=round(float(fit.heldout_spearman[fit.winner]), 3),
            winner=fit.winner, **ref), flush=True)
