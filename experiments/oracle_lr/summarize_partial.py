"""Cluster means of the labels in an oracle_partial.npz (rounds finished so far).

    python summarize_partial.py RUN_TMP/lrX/oracle_partial.npz RUN_TMP/corpus/arrays.npz
"""
import sys

import numpy as np

from mgd.pipeline import oracle

part, arrays = np.load(sys.argv[1]), np.load(sys.argv[2])
n = int(part["done"])
idx, scores, counts = oracle.aggregate(part["round_indices"][:n], part["round_tau"][:n])
cl = arrays["cluster"][idx]
names = ("ontarget", "offtarget", "corrupt")
top = np.argsort(-scores)[: len(scores) // 10]
print(f"rounds finished: {n}; rows labeled: {len(idx)}; mean Phi after the inner steps: "
      f"{part['round_phi'][:n].mean():.4f}")
print("mean label:", {m: round(float(scores[cl == i].mean()), 3) for i, m in enumerate(names)},
      "rows:", {m: int((cl == i).sum()) for i, m in enumerate(names)})
print("top 10% share:", {m: round(float((cl[top] == i).mean()), 2) for i, m in enumerate(names)})
