"""The whole pipeline at the `mid` configuration (`presets.mid()`, that of
../gradient_alignment/full_pipeline.py) with a larger metagradient target
set: does a target gradient averaged over more target documents give labels (and a
distilled selection) closer to the on-target distribution?

    MGD_DATA_DIR=<shared/data> python target_size.py OUT_DIR N_TARGET [SEED]

N_TARGET: target sequences (the `mid` configuration has 64); SEED: the corpus seed (0).
Prints the run's summary table and the labels' top-10% cluster shares as JSON.
"""
import json
import sys
from pathlib import Path

import numpy as np

from mgd.pipeline import presets, run
from mgd.pipeline.corpus import Corpus
from mgd.pipeline.oracle import Labels

out, n_target = Path(sys.argv[1]), int(sys.argv[2])
seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
base = presets.mid()
corpus = {**base.corpus, "n_target": n_target}
if seed:
    corpus["seed"] = seed
p = base.replace(corpus=corpus)
summary = run.run(p, out=out, progress=False, quiet=True)
labels, cluster = Labels.load(out), Corpus.load(out).cluster
top = labels.indices[np.argsort(-labels.scores)[:len(labels.scores) // 10]]
print(json.dumps({
    "n_target": n_target, "corpus_seed": seed,
    "labels_top10_cluster_shares": (np.bincount(cluster[top], minlength=3) / len(top)).round(3).tolist(),
    "scorer": json.loads((out / "scorer" / "summary.json").read_text())["heldout_spearman"],
    "summary": {m: {k: round(float(v), 4) for k, v in row.items()}
                for m, row in summary[["eval_loss_mean", "eval_loss_std", "ontarget_share"]].iterrows()},
}))
