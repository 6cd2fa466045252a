"""Naive attention in plain XLA, differentiated by JAX's own autodiff.

This is the baseline the fused kernels are measured against: it materializes
the [T, T] score matrix per head, and its backward and double backward are
`jax.vjp` applied once and twice. Low-precision inputs go through the matrix
products with float32 accumulation, and softmax statistics stay in float32,
as the contract asks of every backend.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

NAME = "xla"


def _accumulator(dtype):
    # float32 for bf16/fp16/fp32 inputs; float64 stays float64 (the reference checks).
    return jnp.promote_types(dtype, jnp.float32)


def _matmul(spec, a, b):
    # HIGHEST keeps float32 inputs out of TF32 on GPUs; it is a no-op for bf16/fp16.
    return jnp.einsum(spec, a, b, preferred_element_type=_accumulator(a.dtype),
                      precision=jax.lax.Precision.HIGHEST)


def scores(q, k, *, causal, scale):
    """Masked, scaled logits [B, H, Tq, Tk] in float32."""
    s = scale * _matmul("bqhd,bkhd->bhqk", q, k)
    if causal:
        tq, tk = s.shape[-2:]
        mask = jnp.arange(tq)[:, None] >= jnp.arange(tk)[None, :]
        s = jnp.where(mask, s, -jnp.inf)
    return s


def forward_with_lse(q, k, v, *, causal, scale):
    """The forward as one differentiable function of (q, k, v): (o, lse)."""
    s = scores(q, k, causal=causal, scale=scale)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - lse[..., None])
    o = _matmul("bhqk,bkhd->bqhd", p.astype(v.dtype), v)
    return o.astype(q.dtype), lse


def attention(q, k, v, *, causal, scale):
    return forward_with_lse(q, k, v, causal=causal, scale=scale)[0]


# The three primitives, as naive autodiff gives them, each compiled as one XLA
# program. `o` and `lse` are part of the common backend signature; autodiff
# recomputes what it needs instead.

_static = partial(jax.jit, static_argnames=("causal", "scale"))


@_static
def forward(q, k, v, *, causal, scale):
    return forward_with_lse(q, k, v, causal=causal, scale=scale)


@_static
def backward(q, k, v, o, lse, do, *, causal, scale, dlse=None):
    del o, lse
    f = lambda q, k, v: forward_with_lse(q, k, v, causal=causal, scale=scale)  # noqa: E731
    (_, lse_primal), vjp = jax.vjp(f, q, k, v)
    if dlse is None:
        dlse = jnp.zeros_like(lse_primal)
    return vjp((do, dlse))


@_static
def double_backward(q, k, v, o, lse, do, ddq, ddk, ddv, *, causal, scale):
    del o, lse
    bwd = lambda q, k, v, do: jax.vjp(  # noqa: E731
        lambda q, k, v: attention(q, k, v, causal=causal, scale=scale), q, k, v)[1](do)
    _, vjp = jax.vjp(bwd, q, k, v, do)
    return vjp((ddq, ddk, ddv))


def unavailable_reason(q, k, v, *, causal):
    return None  # runs wherever JAX runs
