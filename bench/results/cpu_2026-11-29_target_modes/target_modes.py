"""Top-k of the distilled score against a selection stratified by the target's modes, on
finished runs.

    [MGD_MODES=2,4,8] python target_modes.py RUN_DIR [RUN_DIR ...] > target_modes.log

Rule (`selection.target_modes` and `selection.stratified_top_k`, what `mgd run
--target-modes M` does): k-means (M modes) on the target set's mean-pooled final hidden
states under the base model; every corpus row goes to its nearest mode (same
standardized space); each mode gets a quota of the budget in proportion to its share of
the target set, filled by the mode's highest distilled scores (a mode short of rows
passes its remainder to the global top k). The aim: the selection's mix of kinds of text follows the target's,
while the metagradient score still ranks inside each kind. Same base model, scores,
budget and continued pretraining (3 seeds) as the run's methods, written into a scratch
copy, never the run.
"""
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from mgd.pipeline import artifacts, continued as cont, scorer
from mgd.pipeline.corpus import Corpus
from mgd.pipeline.model import GPTConfig
from mgd.pipeline.run import load_params
from mgd.pipeline.selection import stratified_top_k, target_modes, top_k


# The mode counts compared with the top k: $MGD_MODES (comma-separated), 2,4,8 by default.
MODES = [int(m) for m in os.environ.get("MGD_MODES", "2,4,8").split(",")]


def mean_result(run_dir, method, seeds):
    return float(np.mean([json.loads((run_dir / f"continued-{method}-s{s}" / "result.json")
                                     .read_text())["eval_loss"] for s in range(seeds)]))


for run_dir in map(Path, sys.argv[1:]):
    plan = json.loads((run_dir / "plan.json").read_text())
    corpus = Corpus.load(run_dir)
    cfg = GPTConfig(vocab_size=corpus.vocab_size, seq_len=corpus.seq_len, **plan["model"])
    base = load_params(run_dir / "base" / "params.npz", cfg)
    scores = artifacts.load_arrays(run_dir / "scorer" / "scores.npz")["scores"].astype(np.float64)
    feats = artifacts.load_arrays(run_dir / "features" / "features.npz")
    d = plan["model"]["d_model"]
    corpus_pooled = np.asarray(feats[next(iter(feats))], np.float64)[:, :d]
    target_pooled = scorer.extract_features(base, corpus.target_tokens, cfg, progress=False)
    k = json.loads((run_dir / "select-metagrad_distilled" / "info.json").read_text())["k"]
    base_eval = json.loads((run_dir / "base" / "summary.json").read_text())["eval_loss"]
    ref = {m: round(mean_result(run_dir, m, plan["seeds"]), 4)
           for m in ("oracle_ontarget", "ppl_correlations")}
    scratch = Path(tempfile.mkdtemp())
    for rule, modes in (("top_k", None),) + tuple((f"modes_{m}", m) for m in MODES):
        if modes is None:
            idx = top_k(scores, k)
        else:
            idx = stratified_top_k(scores, *target_modes(target_pooled, corpus_pooled, modes), k)
        assert len(np.unique(idx)) == k
        losses = []
        for s in range(plan["seeds"]):
            res, _ = cont.run_stage(scratch, rule, s, base_params=base, tokens=corpus.tokens,
                                    indices=idx, budget_rows=k, eval_tokens=corpus.eval_tokens,
                                    model_cfg=cfg, cfg=cont.ContinuedConfig(**plan["continued"]),
                                    progress=False, base_eval_loss=base_eval)
            losses.append(res["eval_loss"])
        print(json.dumps({"run": str(run_dir), "rule": rule,
                          "eval_loss_mean": round(float(np.mean(losses)), 4),
                          "eval_loss_std": round(float(np.std(losses, ddof=1)), 4),
                          "ontarget_share": round(float(np.mean(corpus.cluster[idx] == 0)), 3),
                          **ref}), flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
