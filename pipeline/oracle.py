"""The metagradient oracle: how much would training on each sequence help the target?

A labeling round takes k training rows x_1..x_k, starts from the base model
theta_0, and runs T steps of Adam on

    L_train(theta; w) = sum_i w_i * loss_i(theta) / k,        w = (1, ..., 1),

then evaluates Phi(w) = mean loss of theta_T(w) on a batch of the metagradient
target set. tau = dPhi/dw (reverse mode through all T steps, hence second
derivatives of the model, hence the attention double backward); the score is
s = -tau: up-weighting a row with high s lowers the target loss.

Making this fit in memory:
  * Adam must be differentiable at nu = 0: the epsilon sits inside the square
    root (`eps_root` > 0), otherwise d sqrt(nu)/d nu is infinite.
  * The reverse pass over the T steps is written out (`_two_level_grad`) and
    checkpointed in two levels (`segments` segments of ceil(T/segments) steps),
    so it keeps about 2 sqrt(T) - 2 optimizer states instead of T. Written out
    rather than as nested `jax.checkpoint`ed scans, it stores no state twice
    (measurements: docs/memory.md).
  * Each step's gradient over the k rows is accumulated over micro-batches of
    `micro_batch` rows, each one rematerialized, so activations for only one
    micro-batch are live at a time (and the accumulator, being linear, needs no
    stored residual per micro-batch).

`label` runs many rounds, data-parallel over the local devices (`rounds_per_device`
rounds per device at a time, parameters replicated) and split across processes
(`distributed.py`), z-scores the scores within each round and averages them per row
over the rounds the row appeared in; the memory planner (`planner.py`) chooses the round
program for the device.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mgd.errors import UsageError
from mgd.pipeline import artifacts
from mgd.pipeline.model import GPTConfig, per_example_loss
from mgd.pipeline.units import parse_bytes
from mgd.profiling import nvtx_range

log = logging.getLogger(__name__)

__all__ = ["RematPlan", "PLANS", "OracleConfig", "metagradient_round", "make_round_fn",
           "make_rounds_fn",
           "plan_rounds", "zscore", "aggregate", "label", "Labels"]


BLOCK_REMAT = ("none", "attention", "full")


@dataclass(frozen=True)
class RematPlan:
    """What one round recomputes to save memory, one switch per level (docs/round.md).

    block: "none" keeps every block activation for the backward; "attention" recomputes
        each block's activations but keeps attention's output and log-sum-exp, so no
        attention forward is rerun; "full" recomputes the whole block.
    micro_batch: rematerialize each gradient micro-batch and target chunk (only where
        `micro_batch` / `target_micro_batch` cut the rows): one micro-batch's activations
        live at a time, at the price of a forward (and in the reverse sweep a backward)
        per micro-batch.
    segments: checkpoint the inner loop in two levels (~sqrt(T) segments, see
        `_two_level_grad`) and recompute each segment in the reverse sweep; off, every
        optimizer state is kept and nothing is recomputed.
    fuse_last_step: the trajectory's last step is taken inside the reverse sweep's VJP of
        that step, so its forward and backward are computed once, not twice (its
        residuals then live while the target loss is differentiated).
    """
    block: str = "attention"
    micro_batch: bool = False
    segments: bool = False
    fuse_last_step: bool = True

    def __post_init__(self):
        if self.block not in BLOCK_REMAT:
            raise ValueError(f"RematPlan.block must be one of {BLOCK_REMAT}, got {self.block!r}")

    @classmethod
    def named(cls, name: str) -> RematPlan:
        if name not in PLANS:
            raise ValueError(f"remat plan must be one of {sorted(PLANS)}, got {name!r}")
        return PLANS[name]

    def model_config(self, cfg: GPTConfig) -> GPTConfig:
        """`cfg` with this plan's block rematerialization."""
        return dataclasses.replace(cfg, remat_blocks=self.block != "none",
                                   remat_keeps_attention=self.block == "attention")


PLANS = {
    # The default: attention's outputs kept across block remat, every optimizer state kept,
    # the last step's forward and backward shared with the reverse sweep. No attention
    # forward is rerun; only the blocks' matmuls and elementwise work are.
    "lean": RematPlan(block="attention"),
    # Recompute nothing at all: fastest where every block activation of the reverse
    # step fits (about twice the lean plan's temporaries, growing with k x L).
    "keep_all": RematPlan(block="none"),
    # Least memory (the schedule docs/memory.md measured): every level rematerialized.
    "frugal": RematPlan(block="full", micro_batch=True, segments=True, fuse_last_step=False),
}


def _as_plan(value) -> RematPlan:
    if isinstance(value, RematPlan):
        return value
    if isinstance(value, str):
        return RematPlan.named(value)
    if isinstance(value, dict):   # a config read back from JSON
        return RematPlan(**value)
    raise TypeError(f"remat must be a RematPlan, a plan name or a dict, got {value!r}")


@dataclass(frozen=True)
class OracleConfig:
    k: int = 64                       # rows per round
    inner_steps: int = 8              # T
    # Well below the base run's final lr: the labels measure gradient alignment only in its stable regime.
    inner_lr: float = 1e-4
    rounds: int = 64
    target_batch: int = 64            # target rows Phi is measured on, per round
    seed: int = 0
    micro_batch: int | None = None    # rows per gradient micro-batch (None: all k at once)
    target_micro_batch: int | None = None  # target rows per Phi chunk (None: all at once)
    segments: int | None = None       # outer remat segments of the inner loop (None: ~sqrt(T))
    eps_root: float = 1e-12
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    pool_size: int | None = None      # label a random subset of this many rows (None: all)
    # Inner Adam from the base run's moments: a fresh Adam's sign-descent steps ignore a row's weight.
    warm_start: bool = True
    # What the round recomputes to save memory (a RematPlan, or "lean" / "frugal"): the
    # cost of a round, not its result; a memory planner picks it.
    remat: RematPlan = PLANS["lean"]
    # Rounds each device runs at once (vmapped): more work per matmul, more memory.
    rounds_per_device: int = 1
    # Let the memory planner (planner.py) choose remat, micro-batch, segments and rounds per
    # device for the memory budget; off: the fields above as given.
    auto_plan: bool = False
    memory_budget: str | None = None  # e.g. "16GB"; None: the device's bytes_limit
    max_rounds_per_device: int = 8    # the planner's ceiling on rounds_per_device

    def __post_init__(self):
        object.__setattr__(self, "remat", _as_plan(self.remat))
        for name in ("k", "inner_steps", "rounds", "target_batch", "rounds_per_device",
                     "max_rounds_per_device"):
            if getattr(self, name) < 1:
                raise ValueError(f"OracleConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.eps_root <= 0:
            raise ValueError("OracleConfig.eps_root must be > 0: Adam is not differentiable "
                             f"at nu = 0 otherwise (got {self.eps_root})")
        if self.micro_batch is not None and (self.micro_batch < 1 or self.k % self.micro_batch):
            raise ValueError(f"OracleConfig.micro_batch ({self.micro_batch}) must divide "
                             f"k ({self.k})")
        if self.memory_budget is not None:
            try:
                parse_bytes(self.memory_budget)
            except ValueError as err:
                raise ValueError(f"OracleConfig.memory_budget: {err}") from None


def _mean_loss(params, seqs, cfg, micro, remat=True):
    """Mean per-row loss, `micro` rows at a time (each chunk rematerialized if `remat`)."""
    n = seqs.shape[0]
    if micro is None or micro >= n:
        return jnp.mean(per_example_loss(params, seqs, cfg))
    if n % micro:
        raise ValueError(f"micro-batch {micro} must divide the {n} rows")
    chunks = seqs.reshape(n // micro, micro, seqs.shape[1])
    def chunk_sum(x):
        return jnp.sum(per_example_loss(params, x, cfg))

    sums = jax.lax.map(jax.checkpoint(chunk_sum) if remat else chunk_sum, chunks)
    return jnp.sum(sums) / n


def _weighted_grad(params, w, seqs, cfg, micro, remat=True):
    """Gradient of sum_i w_i loss_i / k, accumulated over micro-batches (each one
    rematerialized if `remat`)."""
    k = seqs.shape[0]

    def loss(p, w_mb, x_mb):
        return jnp.sum(w_mb * per_example_loss(p, x_mb, cfg)) / k

    if micro is None or micro >= k:
        return jax.grad(loss)(params, w, seqs)
    grad_mb = jax.checkpoint(jax.grad(loss)) if remat else jax.grad(loss)

    def body(acc, xs):
        return jax.tree_util.tree_map(jnp.add, acc, grad_mb(params, *xs)), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    xs = (w.reshape(k // micro, micro), seqs.reshape(k // micro, micro, seqs.shape[1]))
    return jax.lax.scan(body, zeros, xs)[0]


def _tree_get(stack, i):
    return jax.tree_util.tree_map(lambda s: jax.lax.dynamic_index_in_dim(s, i, keepdims=False),
                                  stack)


def _tree_put(stack, i, tree):
    return jax.tree_util.tree_map(lambda s, x: jax.lax.dynamic_update_index_in_dim(s, x, i, 0),
                                  stack, tree)


def _tree_where(pred, a, b):
    return jax.tree_util.tree_map(lambda x, y: jnp.where(pred, x, y), a, b)


def _empty_stack(tree, n):
    return jax.tree_util.tree_map(lambda x: jnp.zeros((n,) + x.shape, x.dtype), tree)


def _two_level_grad(step, init_fn, w, steps, per, final_grad, fuse_last=False):
    """(aux, d<ct, final carry>/dw) for `steps` applications of carry ->
    step(carry, w) from init_fn(), where (aux, ct) = final_grad(final carry) and
    ct holds cotangents of the carry's inexact leaves in `tree_leaves` order.
    The reverse sweep is written out and checkpointed in two levels.

    The steps are cut into segments of `per`. The forward keeps the carry at the
    start of each segment but the first, the backward recomputes one segment at
    a time keeping the carry at each of its steps but the first; the missing
    first ones are read from the level above, and the initial carry is rebuilt
    by `init_fn()` (the base parameters, which the caller holds anyway, and zero
    moments) where it is needed. So (segments - 1) + (per - 1) carries are
    stored, two fewer than nested `jax.checkpoint`ed scans, which store each
    segment's input twice and the initial state once more. Peeling those first
    steps off the scans instead costs more than it saves: XLA does not share
    buffers between a step's backward outside a loop and the same backward
    inside one, so here every step's backward is the same loop body.

    `fuse_last`: the last step runs forward once, inside its own VJP, whose residuals
    then serve the reverse sweep's first step; the two-level sweep covers the others.
    """
    init = init_fn()
    leaves, treedef = jax.tree_util.tree_flatten(init)
    inexact = [jnp.issubdtype(x.dtype, jnp.inexact) for x in leaves]

    def split(carry):
        ls = jax.tree_util.tree_leaves(carry)
        return ([x for x, f in zip(ls, inexact) if f], [x for x, f in zip(ls, inexact) if not f])

    def join(floats, others):
        floats, others = iter(floats), iter(others)
        return jax.tree_util.tree_unflatten(
            treedef, [next(floats) if f else next(others) for f in inexact])

    def final_step_grad(carry):
        """(aux, cotangent of `carry`'s floats, its part of tau) at the carry that
        enters the last step (with `fuse_last`), or at the final carry."""
        if not fuse_last:
            aux, ct = final_grad(carry)
            return aux, ct, jnp.zeros_like(w)
        floats, others = split(carry)

        def last(f, w_):
            out = step(join(f, others), w_)
            return split(out)[0], out

        _, vjp, final = jax.vjp(last, floats, w, has_aux=True)
        aux, ct = final_grad(final)
        ct, ct_w = vjp(ct)
        return aux, ct, ct_w

    if fuse_last:
        steps -= 1
    if steps == 0:
        aux, _, tau = final_step_grad(init)
        return aux, tau
    per = min(per, steps)
    n_seg = -(-steps // per)

    def seg_len(i):
        return jnp.minimum(per, steps - i * per)

    def forward(i, val):
        carry, bounds = val
        if n_seg > 1:  # slot i - 1 holds the start of segment i (i = 0 writes a placeholder)
            bounds = _tree_put(bounds, jnp.maximum(i - 1, 0), carry)
        return jax.lax.fori_loop(0, seg_len(i), lambda _, c: step(c, w), carry), bounds

    bounds = _empty_stack(init, max(n_seg - 1, 1)) if n_seg > 1 else None
    final, bounds = jax.lax.fori_loop(0, n_seg, forward, (init, bounds))

    def segment_start(i):
        if n_seg == 1:
            return init_fn()
        return _tree_where(i == 0, init_fn(), _tree_get(bounds, jnp.maximum(i - 1, 0)))

    def backward_segment(r, val):
        i = n_seg - 1 - r
        n = seg_len(i)
        states = None
        if per > 1:  # slot j - 1 holds the carry before step j of this segment
            def recompute(j, v):
                carry, stack = v
                carry = step(carry, w)
                return carry, _tree_put(stack, j, carry)
            states = jax.lax.fori_loop(0, n - 1, recompute,
                                       (segment_start(i), _empty_stack(init, per - 1)))[1]

        def backward_step(r2, v):
            ct, tau = v
            j = n - 1 - r2
            carry = segment_start(i) if per == 1 else _tree_where(
                j == 0, segment_start(i), _tree_get(states, jnp.maximum(j - 1, 0)))
            floats, others = split(carry)
            _, vjp = jax.vjp(lambda f, w_: split(step(join(f, others), w_))[0], floats, w)
            ct, ct_w = vjp(ct)
            return ct, tau + ct_w

        return jax.lax.fori_loop(0, n, backward_step, val)

    aux, ct, tau = final_step_grad(final)
    _, tau = jax.lax.fori_loop(0, n_seg, backward_segment, (ct, tau))
    return aux, tau


def metagradient_round(params, model_cfg: GPTConfig, train_seqs, target_seqs, inner_steps: int,
                       inner_lr: float, *, micro_batch=None, target_micro_batch=None,
                       segments=None, eps_root=1e-12, b1=0.9, b2=0.999, eps=1e-8,
                       adam_state=None, return_phi=False, remat: RematPlan | str = "lean"):
    """tau = dPhi/dw [k] at w = 1 for one round (see the module docstring). Jittable:
    all keyword arguments and `model_cfg`, `inner_steps` are static.

    `remat` says what is recomputed to save memory (`RematPlan` or a name in `PLANS`:
    "lean", the default, reruns no attention forward; "keep_all" recomputes nothing;
    "frugal" rematerializes every level). With `remat.segments` the
    inner loop is rematerialized in two levels (`_two_level_grad`): `segments` segments
    (~sqrt(T) when None) of ceil(T / segments) steps, so about 2 sqrt(T) - 2 optimizer
    states are kept; without, all T - 1 are. The plan's block rematerialization
    replaces `model_cfg.remat_blocks`.

    `adam_state`: (mu, nu, count) to start the inner Adam from (the base run's, see
    `OracleConfig.warm_start`); None starts it from zeros.
    """
    if inner_steps < 1:
        raise ValueError(f"inner_steps must be >= 1, got {inner_steps}")
    if eps_root <= 0:
        raise ValueError(f"eps_root must be > 0 for a differentiable Adam, got {eps_root}")
    if segments is not None and segments < 1:
        raise ValueError(f"segments must be >= 1, got {segments}")
    plan = _as_plan(remat)
    model_cfg = plan.model_config(model_cfg)
    train_seqs = jnp.asarray(train_seqs)
    target_seqs = jnp.asarray(target_seqs)
    k = train_seqs.shape[0]
    opt = optax.adam(inner_lr, b1=b1, b2=b2, eps=eps, eps_root=eps_root)
    if plan.segments:
        segments = min(segments or max(1, round(math.sqrt(inner_steps))), inner_steps)
    else:
        segments = inner_steps
    per = -(-inner_steps // segments)

    def step(carry, w):
        theta, state = carry
        g = _weighted_grad(theta, w, train_seqs, model_cfg, micro_batch, plan.micro_batch)
        updates, state = opt.update(g, state, theta)
        return optax.apply_updates(theta, updates), state

    def phi(theta):
        return _mean_loss(theta, target_seqs, model_cfg, target_micro_batch, plan.micro_batch)

    def final_grad(final):
        # Phi depends on theta_T only: the Adam moments' cotangents start at zero.
        value, g = jax.value_and_grad(phi)(final[0])
        moments = [jnp.zeros_like(x) for x in jax.tree_util.tree_leaves(final[1])
                   if jnp.issubdtype(x.dtype, jnp.inexact)]
        return value, jax.tree_util.tree_leaves(g) + moments

    w = jnp.ones((k,), jnp.result_type(*jax.tree_util.tree_leaves(params)))
    def init():
        state = opt.init(params)
        if adam_state is not None:
            mu, nu, count = adam_state
            state = (state[0]._replace(count=jnp.asarray(count, state[0].count.dtype),
                                       mu=mu, nu=nu),) + tuple(state[1:])
        return params, state

    value, tau = _two_level_grad(step, init, w, inner_steps, per, final_grad,
                                 fuse_last=plan.fuse_last_step)
    return (tau, value) if return_phi else tau


@lru_cache(maxsize=16)
def make_round_fn(model_cfg: GPTConfig, oc: OracleConfig, target_micro_batch=None):
    """fn(params, train_seqs [k, L+1], target_seqs [m, L+1], adam_state=None)
    -> (tau [k], phi), jitted. `adam_state`: (mu, nu, count) of the base run, or None
    (zeros). `target_micro_batch` overrides `oc.target_micro_batch`."""
    target_micro_batch = target_micro_batch or oc.target_micro_batch
    def round_fn(params, train_seqs, target_seqs, adam_state=None):
        return metagradient_round(
            params, model_cfg, train_seqs, target_seqs, oc.inner_steps, oc.inner_lr,
            micro_batch=oc.micro_batch, target_micro_batch=target_micro_batch,
            segments=oc.segments, eps_root=oc.eps_root, b1=oc.b1,
            b2=oc.b2, eps=oc.eps, adam_state=adam_state,
            return_phi=True, remat=oc.remat)

    return jax.jit(round_fn)


@lru_cache(maxsize=16)
def make_rounds_fn(model_cfg: GPTConfig, oc: OracleConfig):
    """fn(params, train [B, k, L+1], target [B, m, L+1], adam_state=None)
    -> (tau [B, k], phi [B]) for B = `oc.rounds_per_device` rounds at once (vmapped), jitted."""
    round_fn = make_round_fn(model_cfg, oc)
    if oc.rounds_per_device == 1:
        def one(params, train, target, adam_state=None):
            tau, phi = round_fn(params, train[0], target[0], adam_state)
            return tau[None], phi[None]
        return jax.jit(one)
    batched = jax.vmap(round_fn, in_axes=(None, 0, 0, None))

    def several(params, train, target, adam_state=None):
        return batched(params, train, target, adam_state)
    return jax.jit(several)


def zscore(x, axis=-1):
    x = np.asarray(x, np.float64)
    mu = x.mean(axis=axis, keepdims=True)
    sd = x.std(axis=axis, keepdims=True)
    return np.where(sd > 0, (x - mu) / np.where(sd > 0, sd, 1.0), 0.0)


def plan_rounds(n_rows: int, oc: OracleConfig, n_target: int):
    """(round_indices [R, k], round_targets [R, m]): each epoch is a fresh
    permutation of the labeled pool cut into rounds of k, so rows are covered
    evenly and no round holds a row twice."""
    rng = np.random.default_rng([oc.seed, 7])
    pool = np.arange(n_rows)
    if oc.pool_size is not None and oc.pool_size < n_rows:
        pool = np.sort(rng.choice(n_rows, oc.pool_size, replace=False))
    if oc.k > len(pool):
        raise ValueError(f"OracleConfig.k ({oc.k}) exceeds the {len(pool)} rows to label")
    rounds = []
    while len(rounds) < oc.rounds:
        perm = rng.permutation(pool)
        rounds.extend(perm[i * oc.k:(i + 1) * oc.k] for i in range(len(perm) // oc.k))
    m = min(oc.target_batch, n_target)
    targets = np.stack([rng.choice(n_target, m, replace=False) for _ in range(oc.rounds)])
    return np.stack(rounds[:oc.rounds]), targets


def aggregate(round_indices, round_tau):
    """(indices [M], scores [M], counts [M]): s = -tau z-scored per round, then
    averaged over the rounds each row appears in."""
    z = zscore(-np.asarray(round_tau), axis=1)
    flat_i = np.asarray(round_indices).reshape(-1)
    indices, inverse, counts = np.unique(flat_i, return_inverse=True, return_counts=True)
    scores = np.bincount(inverse, weights=z.reshape(-1), minlength=len(indices)) / counts
    return indices, scores, counts


def split_half_reliability(round_indices, round_tau) -> float:
    """How reproducible the averaged labels are: each row's appearances are split
    alternately into two halves, the two half means correlated (Spearman) over the rows
    seen at least twice, and that correlation stepped up to the full number of rounds
    (Spearman-Brown, 2r / (1 + r)). With label noise independent between rounds, a
    perfect predictor of the noise-free label can expect a Spearman of about the square
    root of this against the labels (the attenuation bound), so it says whether a
    scorer's held-out Spearman is limited by the scorer or by the labels. NaN when fewer
    than three rows appear twice."""
    from scipy import stats

    z = zscore(-np.asarray(round_tau), axis=1).reshape(-1)
    flat_i = np.asarray(round_indices).reshape(-1)
    order = np.argsort(flat_i, kind="stable")   # stable: appearances stay in round order
    rows_sorted = flat_i[order]
    rows, first, inverse = np.unique(rows_sorted, return_index=True, return_inverse=True)
    half = (np.arange(len(rows_sorted)) - first[inverse]) % 2
    sums = np.zeros((len(rows), 2))
    counts = np.zeros((len(rows), 2))
    np.add.at(sums, (inverse, half), z[order])
    np.add.at(counts, (inverse, half), 1.0)
    seen_twice = counts.min(axis=1) > 0
    if seen_twice.sum() < 3:
        return float("nan")
    a = sums[seen_twice, 0] / counts[seen_twice, 0]
    b = sums[seen_twice, 1] / counts[seen_twice, 1]
    r = float(stats.spearmanr(a, b).statistic)
    if not np.isfinite(r) or r <= -1.0:
        return float("nan")
    return 2.0 * r / (1.0 + r)


@dataclass
class Labels:
    indices: np.ndarray        # [M] corpus rows labeled
    scores: np.ndarray         # [M] mean within-round z-score of s = -tau
    counts: np.ndarray         # [M] rounds each row appeared in
    round_ids: np.ndarray      # [R]
    round_indices: np.ndarray  # [R, k] rows of each round
    round_tau: np.ndarray      # [R, k] raw tau
    round_phi: np.ndarray      # [R] Phi after the inner steps
    round_targets: np.ndarray  # [R, m] target rows Phi was measured on
    round_phi0: np.ndarray     # [R] Phi at the base model, before the inner steps

    @classmethod
    def load(cls, run_dir) -> Labels:
        path = Path(run_dir) / "oracle"
        if not (path / "DONE").exists():
            raise FileNotFoundError(f"no complete oracle labels in {path}")
        a = artifacts.load_arrays(path / "labels.npz")
        if "round_phi0" not in a:  # labels written before Phi(theta_0) was recorded
            a = {**a, "round_phi0": np.full(len(a["round_phi"]), np.nan)}
        return cls(**{f.name: a[f.name] for f in dataclasses.fields(cls)})


# What a round costs, not what it computes: labels of configs differing only here match.
COST_FIELDS = ("remat", "micro_batch", "target_micro_batch", "segments", "rounds_per_device",
               "auto_plan", "memory_budget", "max_rounds_per_device")


def _same_labels(config: dict) -> dict:
    """The settings that decide the labels (the remat plan and the micro-batches change
    only their cost, and the float rounding of the gradient sums)."""
    return {k: v for k, v in config.items() if k not in COST_FIELDS}


@lru_cache(maxsize=8)
def _sharded_round_fn(model_cfg, oc, devices):
    """`oc.rounds_per_device` rounds per device: params replicated, the round axis split
    over `devices`. Cached, so labeling twice in one process compiles once."""
    mesh = Mesh(np.array(devices), ("r",))
    rounds_fn = make_rounds_fn(model_cfg, oc)
    return jax.jit(jax.shard_map(rounds_fn, mesh=mesh, in_specs=(P(), P("r"), P("r"), P()),
                                 out_specs=(P("r"), P("r")), check_vma=False))


def _planner_for(model_cfg, oc, target_rows, n_rounds, n_devices):
    from mgd.pipeline.planner import Planner
    return Planner.for_device(model_cfg, oc, target_rows, n_rounds, n_devices)


class InnerStepsDiverged(UsageError, FloatingPointError):
    """A round's metagradient came out non-finite: the settings, not the code, are at fault."""


def label(params, corpus, model_cfg: GPTConfig, oracle_cfg: OracleConfig, run_dir,
          progress=True, devices=None, adam_state=None, processes=None) -> Labels:
    """Label corpus rows with metagradient scores; persisted under `run_dir/oracle/`.

    `adam_state`: the base run's Adam (mu, nu, count) (`train.adam_moments`); needed
    when `oracle_cfg.warm_start`, ignored otherwise.

    `processes` (`distributed.Processes`, default: JAX's): process i labels rounds i,
    i + P, ... on its local devices and saves them to its shard (`label_shards`) as they
    complete, so a killed run resumes where it stopped; process 0 merges the shards once
    every process is done, and every process returns the labels.

    With `oracle_cfg.auto_plan` the memory planner (`planner.py`) chooses the round
    program for the device; an out-of-memory error moves to a smaller one either way.
    """
    from mgd.pipeline import distributed, label_shards
    oc = oracle_cfg
    processes = processes or distributed.current()
    st = artifacts.stage(run_dir, "oracle")
    if st.done:
        saved = artifacts.read_json(st.path / "config.json")
        if _same_labels(saved) != _same_labels(dataclasses.asdict(oc)):
            raise ValueError(f"{st.path} holds labels for another OracleConfig: {saved}")
        return Labels.load(run_dir)
    if oc.warm_start and adam_state is None:
        raise ValueError("OracleConfig.warm_start needs adam_state: the base run's Adam "
                         "(mu, nu, count), from train.adam_moments")
    adam_state = adam_state if oc.warm_start else None
    tokens, targets = np.asarray(corpus.tokens), np.asarray(corpus.target_tokens)
    round_indices, round_targets = plan_rounds(len(tokens), oc, len(targets))
    key = label_shards.digest(round_indices, round_targets)

    finished = label_shards.load_finished(run_dir, key, round_indices)
    mine = label_shards.load_shard(run_dir, processes.index, key)
    todo = [r for r in processes.rounds(oc.rounds) if r not in finished]
    devices = tuple(devices or jax.local_devices())
    n_dev = len(devices)
    run_oc, planner = oc, None
    if todo and oc.auto_plan:
        planner = _planner_for(model_cfg, oc, round_targets.shape[1], len(todo), n_dev)
        run_oc = planner.plan()
    if todo:
        log.info(f"oracle: process {processes.index} of {processes.count} labels {len(todo)} "
                 f"rounds on {n_dev} devices, {run_oc.rounds_per_device} per device at once "
                 f"({len(finished)} of {oc.rounds} already done)")
        run_oc, planner = _label_rounds(
            params, tokens, targets, round_indices, round_targets, model_cfg, oc, run_oc,
            planner, devices, adam_state, todo, mine,
            lambda: label_shards.save_shard(run_dir, processes.index, key, mine), progress)
    processes.barrier("oracle rounds labeled")
    if processes.is_first:
        finished = label_shards.load_finished(run_dir, key, round_indices)
        missing = [r for r in range(oc.rounds) if r not in finished]
        if missing:
            raise RuntimeError(f"oracle: {len(missing)} rounds have no saved result (first "
                               f"{missing[:5]}); run the same command again to label them")
        plan_meta = planner.metadata() if planner is not None else None
        _merge(run_dir, st, oc, round_indices, round_targets, finished,
               {"devices": n_dev * processes.count, "processes": processes.count,
                "devices_per_process": n_dev, "round_program": _program(run_oc),
                "plan": plan_meta})
        label_shards.clear(run_dir)
    processes.barrier("oracle labels merged")
    return Labels.load(run_dir)


def _program(oc: OracleConfig) -> dict:
    """The round program `oc` runs (what the planner chose, or the configured one)."""
    return {"remat": dataclasses.asdict(oc.remat), "micro_batch": oc.micro_batch,
            "target_micro_batch": oc.target_micro_batch, "segments": oc.segments,
            "rounds_per_device": oc.rounds_per_device}


def _label_rounds(params, tokens, targets, round_indices, round_targets, model_cfg, oc, run_oc,
                  planner, devices, adam_state, todo, mine, save, progress):
    """Run the rounds `todo` in groups of (devices x rounds per device), adding each to
    `mine` and calling `save()` after each group; (the program that ran, the planner)."""
    from mgd.pipeline import label_shards
    from mgd.pipeline.planner import is_out_of_memory
    mesh = Mesh(np.array(devices), ("r",))
    replicated = NamedSharding(mesh, P())
    split = NamedSharding(mesh, P("r"))
    params = jax.device_put(params, replicated)
    adam_state = jax.device_put(adam_state, replicated)
    # Phi before the inner steps, per round: with Phi after them, it says whether the
    # inner steps on a round's (mixed) rows lowered or raised the target loss, a first
    # check on inner_lr (the summary's phi_rose_fraction; the run report shows it).
    phi0_fn = jax.jit(lambda p, x: _mean_loss(p, x, model_cfg, oc.target_micro_batch))

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc="oracle rounds", dynamic_ncols=True)
    n_dev, pos = len(devices), 0
    while pos < len(todo):
        group = n_dev * run_oc.rounds_per_device
        ids = np.array(todo[pos:pos + group])
        n_new = len(ids)
        ids = np.concatenate([ids, np.full(group - n_new, ids[-1])])  # pad by repeating a round
        t0 = time.perf_counter()
        try:
            with nvtx_range("metagradient_round"):  # np.asarray waits for the round
                fn = _sharded_round_fn(model_cfg, run_oc, devices)
                out_tau, out_phi = fn(params, jax.device_put(tokens[round_indices[ids]], split),
                                      jax.device_put(targets[round_targets[ids]], split),
                                      adam_state)
                out_tau, out_phi = np.asarray(out_tau), np.asarray(out_phi)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            if planner is None:
                planner = _planner_for(model_cfg, oc, round_targets.shape[1], len(todo), n_dev)
            run_oc = planner.fallback(run_oc)
            continue
        if not np.all(np.isfinite(out_tau)):
            raise InnerStepsDiverged(
                f"oracle: non-finite metagradient in rounds {sorted(set(ids.tolist()))} (the "
                f"inner steps diverged): lower oracle.inner_lr (now {oc.inner_lr}) or raise "
                f"oracle.eps_root (now {oc.eps_root}) with --set; finished rounds are kept")
        for j, r in enumerate(ids[:n_new]):
            phi0 = float(phi0_fn(params, targets[round_targets[r]]))
            mine[int(r)] = label_shards.Round(out_tau[j].astype(np.float64), float(out_phi[j]), phi0)
        save()
        pos += n_new
        if bar is not None:
            bar.update(n_new)
            bar.set_postfix(phi=f"{out_phi[:n_new].mean():.4f}",
                            s_per_round=f"{(time.perf_counter() - t0) / n_new:.2f}")
    if bar is not None:
        bar.close()
    return run_oc, planner


def _merge(run_dir, st, oc, round_indices, round_targets, finished, meta):
    """Aggregate every round's tau into the labels; write the oracle stage."""
    tau = np.stack([finished[r].tau for r in range(oc.rounds)])
    phi = np.array([finished[r].phi for r in range(oc.rounds)])
    phi0 = np.array([finished[r].phi0 for r in range(oc.rounds)])
    indices, scores, counts = aggregate(round_indices, tau)
    labels = Labels(indices=indices, scores=scores, counts=counts,
                    round_ids=np.arange(oc.rounds), round_indices=round_indices,
                    round_tau=tau, round_phi=phi, round_targets=round_targets,
                    round_phi0=phi0)
    known = np.isfinite(phi0)
    rose = float(np.mean(phi[known] > phi0[known])) if known.any() else float("nan")
    reliability = split_half_reliability(round_indices, tau)
    with st as tmp:
        artifacts.atomic_save_arrays(tmp / "labels.npz", **dataclasses.asdict(labels))
        artifacts.atomic_write_json(tmp / "config.json", dataclasses.asdict(oc))
        artifacts.atomic_write_json(tmp / "summary.json", {
            "rounds": oc.rounds, "labeled_rows": int(len(indices)),
            "mean_rounds_per_row": float(counts.mean()), **meta,
            "phi_mean": float(np.mean(phi)), "phi0_mean": float(np.nanmean(phi0)),
            "phi_rose_fraction": None if math.isnan(rose) else rose,
            "label_reliability": None if math.isnan(reliability) else reliability})
