"""The metagradient's horizon at the `mid` configuration: the oracle's inner run made
longer (more inner Adam steps at the same lr), everything else of a finished run kept.

    MGD_DATA_DIR=<shared/data> python horizon.py RUN_DIR OUT_DIR INNER_STEPS [ROUNDS]

Copies RUN_DIR (a finished `mid` run) without its oracle, the stages that depend on the
labels (scorer, distilled and oracle-label selections and their training, the report),
reruns those with the oracle's inner steps (and rounds) changed, and prints one JSON
line: the labels' top-10% cluster shares, the scorer's held-out Spearman and the
summary table (evaluation loss mean, spread and on-target share per method).
"""
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from mgd.pipeline import presets, run
from mgd.pipeline.corpus import Corpus
from mgd.pipeline.oracle import Labels

src, out, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
plan = json.loads((src / "plan.json").read_text())
base = presets.mid()
assert {k: plan["model"][k] for k in base.model} == base.model, "RUN_DIR is not a mid run"
oracle = {**plan["oracle"], "inner_steps": steps}
if len(sys.argv) > 4:
    oracle["rounds"] = int(sys.argv[4])
p = base.replace(corpus={k: v for k, v in plan["corpus"].items()
                         if k not in ("ontarget", "offtarget")}, oracle=oracle)
assert {f.name for f in dataclasses.fields(p)} >= {"oracle"}
shutil.copytree(src, out, ignore=shutil.ignore_patterns(
    *run.SCORER_STAGES, "oracle", "select-oracle_labels", "continued-oracle_labels-*"))
summary = run.run(p, out=out, progress=False, quiet=True)
labels, cluster = Labels.load(out), Corpus.load(out).cluster
top = labels.indices[np.argsort(-labels.scores)[:len(labels.scores) // 10]]
print(json.dumps({
    "source": str(src), "inner_steps": steps, "rounds": oracle["rounds"],
    "labels_top10_cluster_shares": (np.bincount(cluster[top], minlength=3) / len(top)).round(3).tolist(),
    "scorer": json.loads((out / "scorer" / "summary.json").read_text())["heldout_spearman"],
    "summary": {m: {k: round(float(v), 4) for k, v in row.items()}
                for m, row in summary[["eval_loss_mean", "eval_loss_std", "ontarget_share"]].iterrows()},
}))
