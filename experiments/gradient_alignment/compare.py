"""The distilled scorer with the last-layer alignment columns alone, and with the
whole-model gradient alignment column added, on CPU.

    MGD_DATA_DIR=../shared/data python compare.py OUT_DIR

Runs the pipeline up to the `random` baseline (corpus, base model, oracle, features,
scorer) for two configurations: `smoke` (the preset: a 1-layer, 32-wide model) and `mid`
(the smoke corpus with a 3-layer, 64-wide model trained for 600 steps and 96 oracle
rounds of 32 rows; the configuration of ../alignment_feature). Each
configuration runs first with `gradient_alignment` off, then on, the second reusing the
first's corpus, base model and labels. Prints one JSON line per run: the run's own
held-out Spearman (seed 0), its mean and spread over ten random 20% held-out splits of
the same labeled rows (and, with the column on, of that column alone), and the cluster
shares of the scorer's top 10% of the corpus.
"""
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from mgd.pipeline import artifacts, presets, run, scorer
from mgd.pipeline.corpus import Corpus
from mgd.pipeline.oracle import Labels


def top_tenth_shares(d):
    """Cluster shares (on-target, off-target, corrupt) of the distilled scorer's top 10%."""
    cluster = Corpus.load(d).cluster
    scores = artifacts.load_arrays(d / "scorer" / "scores.npz")["scores"]
    top = np.argsort(-scores)[:len(scores) // 10]
    return (np.bincount(cluster[top], minlength=3) / len(top)).round(4).tolist()


def split_spread(d, plan, columns=None):
    feats = artifacts.load_arrays(d / "features" / "features.npz")["features"]
    if columns is not None:
        feats = feats[:, columns]
    labels = Labels.load(d)
    out = {}
    for seed in range(10):
        fit = scorer.fit_scorer(feats, labels.indices, labels.scores, seed=seed,
                                holdout_fraction=0.2, regressors=("ridge", "mlp"),
                                mlp_hidden=plan["scorer"]["mlp_hidden"])
        for k, v in fit.summary()["heldout_spearman"].items():
            out.setdefault(k, []).append(v)
    return {k: {"mean": round(float(np.mean(v)), 4), "std": round(float(np.std(v)), 4)}
            for k, v in out.items()}


out = Path(sys.argv[1])
configs = {
    "smoke": presets.smoke(),
    "mid": presets.smoke().replace(
        name="mid", model=dict(n_layer=3, n_head=2, d_model=64, compute_dtype="float32"),
        base_train=dict(steps=600, batch_size=16, lr=3e-3, warmup=20, eval_every=0,
                        ckpt_every=200),
        oracle=dict(k=32, inner_steps=4, inner_lr=1e-4, rounds=96, target_batch=32,
                    pool_size=512)),
}
for name, preset in configs.items():
    for whole in (False, True):
        p = preset.replace(scorer={**preset.scorer, "gradient_alignment": whole})
        d = out / f"{name}-whole{int(whole)}"
        if whole:   # same corpus, base model and labels as the run without the columns
            shutil.copytree(out / f"{name}-whole0", d, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("features", "scorer", "select-*",
                                                          "continued-*", "report", "plan.json"))
        start = time.time()
        run.run(p, out=d, progress=False, quiet=True, methods=("random",))
        s = json.loads((d / "scorer" / "summary.json").read_text())
        o = json.loads((d / "oracle" / "summary.json").read_text())
        plan = json.loads((d / "plan.json").read_text())
        row = {"config": name, "gradient_alignment": whole, "features": s["features"],
               "heldout_spearman": s["heldout_spearman"], "winner": s["winner"],
               "n_heldout": s["n_heldout"], "ten_splits": split_spread(d, plan),
               "top_10pct_cluster_shares": top_tenth_shares(d),
               "label_reliability": o["label_reliability"], "wall_s": round(time.time() - start, 1)}
        if whole:   # the whole-model column alone, without the hidden state, loss, last layer
            row["ten_splits_whole_model_column_only"] = split_spread(d, plan, columns=[-1])
        print(json.dumps(row), flush=True)
