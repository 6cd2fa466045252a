"""The three attention primitives as sequences of kernel launches.

Written once against a `launch` function so the same launch logic serves JAX
on a GPU (`jax_calls.py`, through jax-triton) and NumPy arrays under Triton's
CPU interpreter (`interpret.py`, for tests without a GPU):

    launch(kernel, args, outs, grid, config, **constexprs) -> tuple of outputs

`args` are the kernel's inputs in order (arrays and Python/NumPy scalars),
`outs` the (shape, dtype) of the outputs that follow them in the kernel's
signature, `config` a `configs.Config`. Arrays are [B, T, H, D] (row
statistics [B, H, T], float32) and must be contiguous.

Each kernel has its own launch function (`KERNEL_CALLS`), which the
autotuner times one at a time.
"""
from __future__ import annotations

import numpy as np

from mgd.reference.triton import configs, kernels

F32 = np.dtype(np.float32)


def _cdiv(a, b):
    return -(-a // b)


def _dims(q, k):
    b, tq, h, d = q.shape
    return b, tq, k.shape[1], h, d


def _stats(q):
    b, tq, h, _ = q.shape
    return ((b, h, tq), F32)


def fwd(launch, cfg, q, k, v, *, causal, scale):
    b, tq, tk, h, d = _dims(q, k)
    return launch(kernels.attention_fwd, [q, k, v, np.float32(scale), tq, tk, h],
                  [(q.shape, q.dtype), _stats(q)],
                  (_cdiv(tq, cfg.block_m), h, b), cfg, HEAD_DIM=d, CAUSAL=causal)


def bwd_delta(launch, o, do, dlse):
    b, tq, h, d = o.shape
    cfg = configs.DELTA
    (delta,) = launch(kernels.attention_bwd_delta, [o, do, dlse, tq, h], [_stats(o)],
                      (_cdiv(tq, cfg.block_m), h, b), cfg, HEAD_DIM=d)
    return delta


def bwd_dkdv(launch, cfg, q, k, v, do, lse, delta, *, causal, scale):
    b, tq, tk, h, d = _dims(q, k)
    return launch(kernels.attention_bwd_dkdv,
                  [q, k, v, do, lse, delta, np.float32(scale), tq, tk, h],
                  [(k.shape, k.dtype), (v.shape, v.dtype)],
                  (_cdiv(tk, cfg.block_n), h, b), cfg, HEAD_DIM=d, CAUSAL=causal)


def bwd_dq(launch, cfg, q, k, v, do, lse, delta, *, causal, scale):
    b, tq, tk, h, d = _dims(q, k)
    (dq,) = launch(kernels.attention_bwd_dq,
                   [q, k, v, do, lse, delta, np.float32(scale), tq, tk, h],
                   [(q.shape, q.dtype)],
                   (_cdiv(tq, cfg.block_m), h, b), cfg, HEAD_DIM=d, CAUSAL=causal)
    return dq


def dbwd_rows(launch, cfg, q, k, v, o, do, lse, ddq, ddk, ddv, *, causal, scale):
    """Sweep 1: dO' and the row statistics D, dd, b."""
    b, tq, tk, h, d = _dims(q, k)
    return launch(kernels.attention_dbwd_rows,
                  [q, k, v, o, do, lse, ddq, ddk, ddv, np.float32(scale), tq, tk, h],
                  [(do.shape, do.dtype), _stats(q), _stats(q), _stats(q)],
                  (_cdiv(tq, cfg.block_m), h, b), cfg, HEAD_DIM=d, CAUSAL=causal)


def dbwd_dq(launch, cfg, q, k, v, do, lse, ddq, ddk, ddv, delta, dd, bstat, *, causal, scale):
    """Sweep 2, per query tile: Q'."""
    b, tq, tk, h, d = _dims(q, k)
    (gq,) = launch(kernels.attention_dbwd_dq,
                   [q, k, v, do, lse, ddq, ddk, ddv, delta, dd, bstat, np.float32(scale), tq, tk, h],
                   [(q.shape, q.dtype)],
                   (_cdiv(tq, cfg.block_m), h, b), cfg, HEAD_DIM=d, CAUSAL=causal)
    return gq


def dbwd_dkdv(launch, cfg, q, k, v, do, lse, ddq, ddk, ddv, delta, dd, bstat, *, causal, scale):
    """Sweep 2, per key tile: K' and V'."""
    b, tq, tk, h, d = _dims(q, k)
    return launch(kernels.attention_dbwd_dkdv,
                  [q, k, v, do, lse, ddq, ddk, ddv, delta, dd, bstat, np.float32(scale), tq, tk, h],
                  [(k.shape, k.dtype), (v.shape, v.dtype)],
                  (_cdiv(tk, cfg.block_n), h, b), cfg, HEAD_DIM=d, CAUSAL=causal)


def _lookup(table, kernel, q, k, causal):
    return table.lookup(kernel, q.shape[-1], causal, max(q.shape[1], k.shape[1]))


def forward(launch, q, k, v, *, causal, scale, table):
    cfg = _lookup(table, "fwd", q, k, causal)
    return fwd(launch, cfg, q, k, v, causal=causal, scale=scale)


def backward(launch, q, k, v, o, lse, do, dlse, *, causal, scale, table):
    """dlse: the cotangent of lse (zeros when the caller has none)."""
    delta = bwd_delta(launch, o, do, dlse)
    kw = dict(causal=causal, scale=scale)
    dk, dv = bwd_dkdv(launch, _lookup(table, "bwd_dkdv", q, k, causal), q, k, v, do, lse, delta, **kw)
    dq = bwd_dq(launch, _lookup(table, "bwd_dq", q, k, causal), q, k, v, do, lse, delta, **kw)
    return dq, dk, dv


def double_backward(launch, q, k, v, o, lse, do, ddq, ddk, ddv, *, causal, scale, table):
    kw = dict(causal=causal, scale=scale)
    gdo, delta, dd, bstat = dbwd_rows(launch, _lookup(table, "dbwd_rows", q, k, causal),
                                      q, k, v, o, do, lse, ddq, ddk, ddv, **kw)
    stats = (delta, dd, bstat)
    gq = dbwd_dq(launch, _lookup(table, "dbwd_dq", q, k, causal),
                 q, k, v, do, lse, ddq, ddk, ddv, *stats, **kw)
    gk, gv = dbwd_dkdv(launch, _lookup(table, "dbwd_dkdv", q, k, causal),
                       q, k, v, do, lse, ddq, ddk, ddv, *stats, **kw)
    return gq, gk, gv, gdo
