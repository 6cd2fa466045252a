"""Which off-target rows the distilled selection and the labels pick, on this demo run.

    MGD_DATA_DIR=<shared/data> python offtarget_picks.py WORK_DIR > offtarget_picks.txt

Rebuilds the demo's corpus on CPU from `demo/plan.json` (the corpus stage needs no GPU;
its stats must equal the run's `demo/summaries/corpus_stats.json`, which is checked),
then reads `demo_labels.tgz`. Prints the labels' percentile of the distilled selection's
off-target rows that were labeled, and the opening of a few of each kind.
"""
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/offline.py
import offline  # noqa: E402

device = offline.rebuild_device_run(Path(__file__).parent, os.environ["MGD_DATA_DIR"],
                                    sys.argv[1])
plan, corpus, labels, scores = device.plan, device.corpus, device.labels, device.scores
rows, lab = labels["indices"], labels["scores"]
k = int(round(plan["budget"] * len(scores)))
top = np.argsort(-scores)[:k]
off = top[corpus.cluster[top] == 1]
pct = np.argsort(np.argsort(lab)) / (len(lab) - 1)
labeled = np.isin(rows, off)
print(f"distilled top {k}: {len(off)} off-target rows; {labeled.sum()} of them labeled, "
      f"their labels' mean percentile {pct[labeled].mean():.2f} (median {np.median(pct[labeled]):.2f})")
on_top = top[corpus.cluster[top] == 0]
on_lab = np.isin(rows, on_top)
print(f"for comparison, its on-target rows that were labeled: {on_lab.sum()}, "
      f"mean percentile {pct[on_lab].mean():.2f}")
ten = rows[np.argsort(-lab)[:len(lab) // 10]]
off_lab = ten[corpus.cluster[ten] == 1]
print(f"labels' own top 10%: {len(off_lab)} off-target rows of {len(ten)}")
for title, picks in (("distilled selection's off-target rows", off[:8]),
                     ("labels' top-10% off-target rows", off_lab[:8])):
    print(f"\n{title} (first 8, opening 160 characters):")
    for text in corpus.decode(corpus.tokens[picks]):
        print("  -", " ".join(text.split())[:160])
