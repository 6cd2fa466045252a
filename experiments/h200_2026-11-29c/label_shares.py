"""Cluster shares of the labeled rows' top fractions by oracle label, from demo_labels.tgz
(the one beside this script, or the one given: another run's demo labels).

    python label_shares.py [demo_labels.tgz] > label_shares.txt
"""
import io
import sys
import tarfile
from pathlib import Path

import numpy as np

source = sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("demo_labels.tgz")
with tarfile.open(source) as tar:
    def load(name):
        return np.load(io.BytesIO(tar.extractfile(name).read()))
    labels, cluster = load("oracle/labels.npz"), load("cluster.npy")
rows, score = labels["indices"], labels["scores"]
clusters = cluster[rows]
print("clusters: 0 on-target, 1 off-target, 2 corrupt")
print("labeled rows:", np.round(np.bincount(clusters, minlength=3) / len(rows), 4).tolist())
for fraction in (0.1, 0.2, 1 / 3):
    top = np.argsort(-score)[:int(len(score) * fraction)]
    print(f"top {fraction:.0%} by label:", np.round(np.bincount(clusters[top], minlength=3) / len(top), 4).tolist())
