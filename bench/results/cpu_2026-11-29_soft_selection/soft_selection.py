"""Top-k of the distilled score against sampling without replacement in proportion to
exp(z / temperature) (Gumbel top-k, as DSIR resamples by its importance weights), z the
distilled score standardized over the corpus, on finished runs.

    python soft_selection.py RUN_DIR [RUN_DIR ...] > soft_selection.log

Each run's own base model, corpus and distilled scores; the same continued pretraining
(3 seeds) as the run's methods, written into a scratch copy, never the run. One JSON line
per run and rule: evaluation loss mean and spread, on-target share, and the run's
on-target oracle for reference.
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
from mgd.pipeline.selection import top_k


def gumbel_top_k(z, k, temperature, seed):
    g = np.random.default_rng(seed).gumbel(size=z.shape)
    return top_k(z / temperature + g, k)


for run_dir in map(Path, sys.argv[1:]):
    plan = json.loads((run_dir / "plan.json").read_text())
    corpus = Corpus.load(run_dir)
    cfg = GPTConfig(vocab_size=corpus.vocab_size, seq_len=corpus.seq_len, **plan["model"])
    base = load_params(run_dir / "base" / "params.npz", cfg)
    scores = artifacts.load_arrays(run_dir / "scorer" / "scores.npz")["scores"].astype(np.float64)
    z = (scores - scores.mean()) / scores.std()
    k = json.loads((run_dir / "select-metagrad_distilled" / "info.json").read_text())["k"]
    base_eval = json.loads((run_dir / "base" / "summary.json").read_text())["eval_loss"]
    oracle = [json.loads((run_dir / f"continued-oracle_ontarget-s{s}" / "result.json").read_text())
              ["eval_loss"] for s in range(plan["seeds"])]
    scratch = Path(tempfile.mkdtemp())
    for rule, temperature in (("top_k", None), ("gumbel_t0.5", 0.5), ("gumbel_t1", 1.0)):
        losses, shares = [], []
        for s in range(plan["seeds"]):
            idx = top_k(z, k) if temperature is None else gumbel_top_k(z, k, temperature, s)
            res, _ = cont.run_stage(scratch, rule, s, base_params=base, tokens=corpus.tokens,
                                    indices=idx, budget_rows=k, eval_tokens=corpus.eval_tokens,
                                    model_cfg=cfg, cfg=cont.ContinuedConfig(**plan["continued"]),
                                    progress=False, base_eval_loss=base_eval)
            losses.append(res["eval_loss"])
            shares.append(float(np.mean(corpus.cluster[idx] == 0)))
        print(json.dumps({"run": str(run_dir), "rule": rule, "eval_loss_mean": round(np.mean(losses), 4),
                          "eval_loss_std": round(np.std(losses, ddof=1), 4),
                          "ontarget_share": round(np.mean(shares), 3),
                          "oracle_ontarget": round(np.mean(oracle), 4)}), flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
