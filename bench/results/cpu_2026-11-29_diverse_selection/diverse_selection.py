"""Top-k of the distilled score against a diversity-aware greedy selection (maximal
marginal relevance: each next row maximizes its standardized score minus `weight` times
its largest cosine similarity, in the scorer's standardized feature space, to a row
already chosen), on finished runs.

    python diverse_selection.py RUN_DIR [RUN_DIR ...] > diverse_selection.log

Each run's own base model, corpus, features and distilled scores; the same continued
pretraining (3 seeds) as the run's methods, written into a scratch copy, never the run.
One JSON line per run and rule: evaluation loss mean and spread, on-target share, and the
run's on-target oracle and perplexity-correlations results for reference.
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
    features = np.asarray(feats[next(iter(feats))], np.float64)
    z = (scores - scores.mean()) / scores.std()
    k = json.loads((run_dir / "select-metagrad_distilled" / "info.json").read_text())["k"]
    base_eval = json.loads((run_dir / "base" / "summary.json").read_text())["eval_loss"]
    ref = {m: round(mean_result(run_dir, m, plan["seeds"]), 4)
           for m in ("oracle_ontarget", "ppl_correlations")}
    scratch = Path(tempfile.mkdtemp())
    for rule, weight in (("top_k", None), ("mmr_w0.25", 0.25), ("mmr_w0.5", 0.5),
                         ("mmr_w1", 1.0), ("mmr_w2", 2.0)):
        idx = top_k(z, k) if weight is None else mmr(z, features, k, weight)
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
