"""The primitives on JAX arrays: kernel launches through jax-triton.

Imported only when the backend runs (it needs triton and jax-triton).
jax-triton's `triton_call` has no batching rule (its primitive raises under
`jax.vmap`), so each primitive goes through `batching.fold_batch`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import jax_triton

from mgd.reference.triton import configs, primitives
from mgd.reference.triton.batching import fold_batch


def _launch(kernel, args, outs, grid, config, **constexprs):
    out_shape = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in outs]
    results = jax_triton.triton_call(
        *args, kernel=kernel, out_shape=out_shape, grid=grid,
        num_warps=config.num_warps, num_stages=config.num_stages,
        **config.meta(), **constexprs)
    return tuple(results)


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def forward(q, k, v, *, causal, scale, table=None):
    # table: a configs.Table to use instead of the committed one (tests hold each
    # tuned entry to float64 at a length of their choosing).
    def fn(q, k, v):
        return primitives.forward(_launch, q, k, v, causal=causal, scale=scale,
                                  table=table or configs.table())
    return fold_batch(fn)(q, k, v)


def backward(q, k, v, o, lse, do, *, causal, scale, dlse=None, table=None):
    lse = _f32(lse)
    dlse = jnp.zeros_like(lse) if dlse is None else _f32(dlse)

    def fn(q, k, v, o, lse, do, dlse):
        return primitives.backward(_launch, q, k, v, o, lse, do, dlse, causal=causal, scale=scale,
                                   table=table or configs.table())
    return fold_batch(fn)(q, k, v, o, lse, do, dlse)


def double_backward(q, k, v, o, lse, do, ddq, ddk, ddv, *, causal, scale, table=None):
    lse = _f32(lse)

    def fn(q, k, v, o, lse, do, ddq, ddk, ddv):
        return primitives.double_backward(_launch, q, k, v, o, lse, do, ddq, ddk, ddv,
                                          causal=causal, scale=scale,
                                          table=table or configs.table())
    return fold_batch(fn)(q, k, v, o, lse, do, ddq, ddk, ddv)
