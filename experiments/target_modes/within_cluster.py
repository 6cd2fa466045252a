"""Inside the on-target cluster, does the distilled score pick rows that train well?
An analysis with the ground-truth clusters (no method may use them): the budget drawn
from on-target rows alone, at the top, the middle and the bottom of the score's ranking
among them; the run's own on-target oracle is a random draw from the same rows.

    python within_cluster.py RUN_DIR [RUN_DIR ...] > within_cluster.log

Same base model, budget and continued pretraining (3 seeds) as the run's methods
(`experiments/offline.py`; nothing is written).
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/offline.py
import offline  # noqa: E402

for run_dir in sys.argv[1:]:
    run = offline.load(run_dir)
    scores = run.distilled_scores()
    on = np.flatnonzero(run.corpus.cluster == 0)
    ranked = on[np.argsort(-scores[on], kind="stable")]
    k, mid = run.k, len(on) // 2 - run.k // 2
    rules = {"on_top_by_score": ranked[:k], "on_middle_by_score": ranked[mid:mid + k],
             "on_bottom_by_score": ranked[-k:]}
    for rule, idx in rules.items():
        print(offline.summary_line(Path(run_dir).name, rule, run.train_seeds(idx)), flush=True)
