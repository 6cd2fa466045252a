"""Continued pretraining of the base model on one selection, for a fixed token budget.

Every method gets the same number of optimizer steps (budget tokens / tokens per
batch, times `epochs`), whatever it selected: a selection smaller than the budget
(e.g. fewer on-target rows than the budget holds) is repeated, never padded with
other data. The evaluation set is the held-out on-target pool, disjoint from the
metagradient target set the oracle's Phi was measured on.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np

from mgd.pipeline import artifacts


@dataclasses.dataclass(frozen=True)
class ContinuedConfig:
    batch_size: int = 32
    lr: float = 3e-4
    warmup: int = 10
    weight_decay: float = 0.1
    epochs: float = 1.0          # passes over the budget
    n_evals: int = 8             # evaluations along the run (for the training curves)
    eval_batch_size: int = 128

    def __post_init__(self):
        if self.batch_size < 1 or self.epochs <= 0 or self.n_evals < 1:
            raise ValueError(f"ContinuedConfig needs batch_size >= 1, epochs > 0 and "
                             f"n_evals >= 1, got {self}")


def steps_for_budget(budget_rows: int, batch_size: int, epochs: float) -> int:
    return max(1, math.ceil(epochs * budget_rows / batch_size))


def train_config(cfg: ContinuedConfig, steps: int, seed: int):
    from mgd.pipeline.train import TrainConfig
    return TrainConfig(steps=steps, batch_size=cfg.batch_size, lr=cfg.lr,
                       warmup=min(cfg.warmup, max(steps // 5, 1)),
                       weight_decay=cfg.weight_decay, seed=seed,
                       eval_every=max(1, steps // cfg.n_evals), ckpt_every=max(1, steps // 4),
                       eval_batch_size=cfg.eval_batch_size)


def continue_pretraining(base_params, tokens, indices, budget_rows: int, eval_tokens, model_cfg,
                         cfg: ContinuedConfig, seed: int, *, ckpt_dir=None, progress=True,
                         base_eval_loss: float | None = None):
    """Train from `base_params` on rows `indices` of `tokens`; returns (result dict, log)."""
    from mgd.pipeline.train import train
    indices = np.asarray(indices, np.int64)
    if indices.size == 0:
        raise ValueError("the selection is empty")
    rows = np.asarray(tokens)[indices]
    # train() draws full batches without replacement per epoch, so a selection smaller
    # than one batch is tiled up to it (repeats, as any over-budget repetition is).
    if rows.shape[0] < cfg.batch_size:
        rows = np.resize(rows, (cfg.batch_size, rows.shape[1]))
    steps = steps_for_budget(budget_rows, cfg.batch_size, cfg.epochs)
    tc = train_config(cfg, steps, seed)
    params, log = train(base_params, rows, model_cfg, tc, ckpt_dir=ckpt_dir,
                        eval_sets={"eval": eval_tokens}, progress=progress)
    final = [e for e in log if "eval" in e][-1]["eval"]["eval"]
    result = {"seed": seed, "steps": steps, "tokens_trained": steps * cfg.batch_size * model_cfg.seq_len,
              "n_selected": int(indices.size), "n_unique": int(np.unique(indices).size),
              "eval_loss": float(final), "eval_ppl": float(math.exp(final)),
              "final_train_loss": float(log[-1]["train_loss"])}
    if base_eval_loss is not None:
        result["base_eval_loss"] = float(base_eval_loss)
    return result, log


def run_stage(run_dir, method: str, seed: int, **kwargs):
    """`continue_pretraining` as a resumable stage `continued-<method>-s<seed>`.

    The training checkpoint lives outside the stage folder (in `run_dir/_ckpt/`) so a
    run killed mid-training resumes from its last checkpoint; it is deleted once the
    stage is complete.
    """
    st = artifacts.stage(run_dir, f"continued-{method}-s{seed}")
    if not st.done:
        ckpt = Path(run_dir) / "_ckpt" / st.path.name
        result, log = continue_pretraining(seed=seed, ckpt_dir=ckpt, **kwargs)
        result["method"] = method
        with st as tmp:
            artifacts.atomic_write_json(tmp / "result.json", result)
            artifacts.atomic_write_json(tmp / "log.json", log)
        shutil.rmtree(ckpt, ignore_errors=True)
    return artifacts.read_json(st.path / "result.json"), artifacts.read_json(st.path / "log.json")
