"""How much perplexity correlations' result moves with its population's random seed,
against how much it moves with the seed of continued pretraining, on CPU.

    MGD_DATA_DIR=<path to shared/data> python ppl_corr_seeds.py SOURCE_RUN OUT_DIR

SOURCE_RUN: a finished run of ../gradient_alignment/full_pipeline.py
(the `mid` configuration, gradient alignment off). For each population seed 0-3, a copy
of it without the perplexity-correlations stages reruns them with a 16-model population
on 8 domains (the demo's sizes) and that seed: the population's mixtures, its training
order and its unsupervised domains change; the corpus, base model and everything else
stay. Prints one JSON line per population seed: the evaluation loss over the 3 seeds of
continued pretraining (mean, std), the on-target share of the selection, and its overlap
with seed 0's selection.
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from mgd.pipeline import artifacts, presets, run
from mgd.pipeline.corpus import Corpus

source, out = Path(sys.argv[1]), Path(sys.argv[2])
base = presets.smoke()
first = None
for seed in range(4):
    p = base.replace(name="mid", model=dict(n_layer=3, n_head=2, d_model=64, compute_dtype="float32"),
                     base_train=dict(steps=600, batch_size=16, lr=3e-3, warmup=20, eval_every=0,
                                     ckpt_every=200),
                     oracle=dict(k=32, inner_steps=4, inner_lr=1e-4, rounds=96, target_batch=32,
                                 pool_size=512),
                     population={**base.population, "n_models": 16, "n_domains": 8, "seed": seed},
                     scorer={**base.scorer, "alignment_feature": True, "gradient_alignment": False})
    d = out / f"population-seed{seed}"
    shutil.copytree(source, d, ignore=shutil.ignore_patterns(
        "population", "select-ppl_correlations", "continued-ppl_correlations-*", "report*",
        "results.csv", "*.png", "plan.json", "_ckpt"))
    run.run(p, out=d, progress=False, quiet=True, methods=("ppl_correlations",))
    res = pd.read_csv(d / "results.csv")
    losses = res[res["method"] == "ppl_correlations"]["eval_loss"]
    chosen = set(artifacts.load_arrays(d / "select-ppl_correlations" / "selection.npz")["indices"][0].tolist())
    first = chosen if first is None else first
    cluster = Corpus.load(d).cluster
    print(json.dumps({"population_seed": seed, "eval_loss_mean": round(float(losses.mean()), 4),
                      "eval_loss_std_over_training_seeds": round(float(losses.std()), 4),
                      "ontarget_share": round(float(np.mean(cluster[list(chosen)] == 0)), 4),
                      "overlap_with_seed0": round(len(chosen & first) / len(chosen), 4)}), flush=True)
