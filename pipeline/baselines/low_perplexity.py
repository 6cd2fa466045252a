"""Low perplexity under the base model: keep the sequences the base model predicts best.

A common heuristic filter (e.g. perplexity filtering against a reference model); here
the reference model is the base model itself, so it favours text like its pretraining
mixture and rejects noise such as scrambled token order.
"""
from __future__ import annotations

import numpy as np

from mgd.pipeline.baselines.common import batched_losses
from mgd.pipeline.selection import top_k


def scores(params, seqs, model_cfg, *, batch_size: int = 256, progress: bool = False,
           loss_fn=None) -> np.ndarray:
    """Higher is better: minus the per-sequence loss (nats/token) under `params`."""
    return -batched_losses(params, seqs, model_cfg, batch_size=batch_size, progress=progress,
                           desc="low-ppl losses", loss_fn=loss_fn)


def select(score, k: int) -> np.ndarray:
    return top_k(score, k)
