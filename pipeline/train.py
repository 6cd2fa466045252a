"""Base training on the mixed corpus: AdamW, warmup then cosine decay, resumable.

Batches are drawn without replacement from a fresh permutation each epoch; the
permutation depends only on (seed, epoch), so a resumed run sees exactly the
batches an uninterrupted one would have.

A checkpoint (`ckpt_dir/ckpt.npz` + `ckpt_dir/log.json`) holds params, optimizer
state, step and the log, written atomically every `ckpt_every` steps and at the end.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mgd.pipeline import artifacts
from mgd.pipeline.model import GPTConfig, per_example_loss
from mgd.profiling import nvtx_range

__all__ = ["TrainConfig", "train", "eval_loss", "make_optimizer", "batch_indices"]


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.1
    seed: int = 0
    eval_every: int = 100          # 0: evaluate only at the end
    ckpt_every: int = 200
    grad_clip: float = 1.0
    eval_batch_size: int = 64
    min_lr_ratio: float = 0.1      # cosine decays to lr * min_lr_ratio

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be positive, got {self.lr}")


def make_optimizer(tc: TrainConfig):
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, tc.lr, warmup_steps=max(tc.warmup, 1), decay_steps=max(tc.steps, tc.warmup + 1),
        end_value=tc.lr * tc.min_lr_ratio)
    # Norm scales are not decayed: decay pulls them toward 0, not toward "no effect" (1).
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, x: x.ndim >= 2, params)
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                       optax.adamw(schedule, weight_decay=tc.weight_decay, mask=decay_mask)), schedule


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Rows of batch `step`: epoch e uses permutation(seed, e), cut into full batches."""
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} training rows")
    per_epoch = n // batch_size
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[pos * batch_size:(pos + 1) * batch_size]


@partial(jax.jit, static_argnums=(2,))
def _mean_losses(params, seqs, cfg):
    return per_example_loss(params, seqs, cfg)


def eval_loss(params, seqs, model_cfg: GPTConfig, batch_size: int = 64) -> float:
    """Mean next-token loss (nats/token) over all rows of `seqs`."""
    seqs = np.asarray(seqs)
    if len(seqs) == 0:
        raise ValueError("eval_loss needs at least one row")
    total = 0.0
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        n = len(chunk)
        if n < batch_size and len(seqs) > batch_size:
            # Pad the last chunk to a full batch so only one shape is compiled.
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, 0)])
        losses = np.asarray(_mean_losses(params, jnp.asarray(chunk), model_cfg))
        total += float(losses[:n].astype(np.float64).sum())
    return total / len(seqs)


@lru_cache(maxsize=8)
def _update_fn(model_cfg: GPTConfig, tc: TrainConfig):
    """The jitted training step, shared by every `train` call with these configs
    (a resumed run in the same process does not compile it again)."""
    optimizer, _ = make_optimizer(tc)

    @jax.jit
    def update(params, opt_state, batch):
        loss, grads = jax.value_and_grad(
            lambda p: jnp.mean(per_example_loss(p, batch, model_cfg)))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return update


def _save(ckpt_dir: Path, step, params, opt_state, log):
    leaves = jax.tree_util.tree_leaves((params, opt_state))
    artifacts.atomic_save_arrays(ckpt_dir / "ckpt.npz", step=np.int64(step),
                                 **{f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(leaves)})
    artifacts.atomic_write_json(ckpt_dir / "log.json", {"step": step, "log": log})


def _restore(ckpt_dir: Path, params, opt_state):
    data = artifacts.load_arrays(ckpt_dir / "ckpt.npz")
    treedef = jax.tree_util.tree_structure((params, opt_state))
    like = jax.tree_util.tree_leaves((params, opt_state))
    n = sum(1 for k in data if k.startswith("leaf_"))
    if n != len(like):
        raise ValueError(f"checkpoint {ckpt_dir / 'ckpt.npz'} has {n} arrays, the model and "
                         f"optimizer need {len(like)}: was it written for another config?")
    leaves = []
    for i, ref in enumerate(like):
        x = data[f"leaf_{i:05d}"]
        if x.shape != ref.shape:
            raise ValueError(f"checkpoint array {i} has shape {x.shape}, expected {ref.shape}")
        leaves.append(jnp.asarray(x, dtype=ref.dtype))
    params, opt_state = jax.tree_util.tree_unflatten(treedef, leaves)
    log = artifacts.read_json(ckpt_dir / "log.json")["log"]
    return int(data["step"]), params, opt_state, log


def adam_moments(opt_state):
    """(mu, nu, count) of the Adam inside an optax optimizer state (`make_optimizer`'s
    chain of clipping and AdamW): what the metagradient oracle warm-starts from."""
    found = [s for s in jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)]
    if len(found) != 1:
        raise ValueError(f"expected one Adam state in the optimizer state, found {len(found)}")
    return found[0].mu, found[0].nu, found[0].count


def train(params, tokens, model_cfg: GPTConfig, train_cfg: TrainConfig, ckpt_dir=None,
          eval_sets=None, progress=True, return_opt_state=False):
    """Train on rows of `tokens` [N, L+1]; returns (params, log), or
    (params, log, opt_state) with `return_opt_state`.

    `eval_sets`: {name: rows} evaluated every `eval_every` steps and at the end.
    log: list of {"step", "train_loss", "lr"} dicts; evaluation entries also carry
    "eval": {name: mean loss}. With `ckpt_dir`, an existing checkpoint there is
    resumed (same configs expected) and progress is checkpointed.
    """
    tc = train_cfg
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] != model_cfg.seq_len + 1:
        raise ValueError(f"tokens must be [N, seq_len + 1 = {model_cfg.seq_len + 1}], "
                         f"got {tokens.shape}")
    eval_sets = {k: np.asarray(v) for k, v in (eval_sets or {}).items()}
    optimizer, schedule = make_optimizer(tc)
    opt_state = optimizer.init(params)
    step, log = 0, []
    ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else None
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        meta = {"model": dataclasses.asdict(model_cfg), "train": dataclasses.asdict(tc)}
        if (ckpt_dir / "ckpt.npz").exists():
            saved = artifacts.read_json(ckpt_dir / "config.json")
            if saved != meta:
                raise ValueError(f"{ckpt_dir} holds a checkpoint for other configs: {saved}")
            step, params, opt_state, log = _restore(ckpt_dir, params, opt_state)
        else:
            artifacts.atomic_write_json(ckpt_dir / "config.json", meta)

    update = _update_fn(model_cfg, tc)

    def evaluate():
        return {name: eval_loss(params, rows, model_cfg, tc.eval_batch_size)
                for name, rows in eval_sets.items()}

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=tc.steps, initial=step, desc="train", dynamic_ncols=True)
    while step < tc.steps:
        batch = jnp.asarray(tokens[batch_indices(len(tokens), tc.batch_size, tc.seed, step)])
        with nvtx_range("optimizer_step"):  # float(loss) waits for the step's kernels
            params, opt_state, loss = update(params, opt_state, batch)
            train_loss = float(loss)
        step += 1
        entry = {"step": step, "train_loss": train_loss, "lr": float(schedule(step - 1))}
        if not math.isfinite(entry["train_loss"]):
            raise FloatingPointError(f"training loss is {loss} at step {step}; lower the lr")
        if eval_sets and ((tc.eval_every and step % tc.eval_every == 0) or step == tc.steps):
            entry["eval"] = evaluate()
        log.append(entry)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{entry['train_loss']:.3f}",
                            **{k: f"{v:.3f}" for k, v in entry.get("eval", {}).items()})
        if ckpt_dir is not None and (step % max(tc.ckpt_every, 1) == 0 or step == tc.steps):
            _save(ckpt_dir, step, params, opt_state, log)
    if bar is not None:
        bar.close()
    return (params, log, opt_state) if return_opt_state else (params, log)
