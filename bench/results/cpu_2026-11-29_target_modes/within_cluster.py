"""Inside the on-target cluster, does the distilled score pick rows that train well?
An analysis with the ground-truth clusters (no method may use them): the budget drawn
from on-target rows alone, at the top, the middle and the bottom of the score's ranking
among them; the run's own on-target oracle is a random draw from the same rows.

    python within_cluster.py RUN_DIR [RUN_DIR ...] > within_cluster.log

Same base model, budget and continued pretraining (3 seeds) as the run's methods, in a
scratch folder.
"""
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from mgd.pipeline import artifacts, continued as cont
from mgd.pipeline.corpus import Corpus
from mgd.pipeline.model import GPTConfig
from mgd.pipeline.run import load_params

for run_dir in map(Path, sys.argv[1:]):
    plan = json.loads((run_dir / "plan.json").read_text())
    corpus = Corpus.load(run_dir)
    cfg = GPTConfig(vocab_size=corpus.vocab_size, seq_len=corpus.seq_len, **plan["model"])
    base = load_params(run_dir / "base" / "params.npz", cfg)
    scores = artifacts.load_arrays(run_dir / "scorer" / "scores.npz")["scores"].astype(np.float64)
    k = json.loads((run_dir / "select-metagrad_distilled" / "info.json").read_text())["k"]
    base_eval = json.loads((run_dir / "base" / "summary.json").read_text())["eval_loss"]
    on = np.flatnonzero(corpus.cluster == 0)
    scratch = Path(tempfile.mkdtemp())
    ranked = on[np.argsort(-scores[on], kind="stable")]
    mid = len(on) // 2 - k // 2
    rules = {"on_top_by_score": ranked[:k], "on_middle_by_score": ranked[mid:mid + k],
             "on_bottom_by_score": ranked[-k:]}
    for rule, idx in rules.items():
        losses = []
        for s in range(plan["seeds"]):
            res, _ = cont.run_stage(scratch, rule, s, base_params=base, tokens=corpus.tokens,
                                    indices=idx, budget_rows=k, eval_tokens=corpus.eval_tokens,
                                    model_cfg=cfg, cfg=cont.ContinuedConfig(**plan["continued"]),
                                    progress=False, base_eval_loss=base_eval)
            losses.append(res["eval_loss"])
        print(json.dumps({"run": run_dir.name, "rule": rule,
                          "eval_loss_mean": round(float(np.mean(losses)), 4),
                          "eval_loss_std": round(float(np.std(losses, ddof=1)), 4)}), flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
