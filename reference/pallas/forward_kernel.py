"""Forward kernel: O and the float32 row log-sum-exp, one query block per program.

Online softmax over the key blocks (FlashAttention-2): a running row maximum m,
running sum l and unnormalized accumulator, rescaled when m grows. Scores live
in base 2 so each exponential is one exp2; the stored lse is natural-log.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _common as c

# Finite stand-in for -inf: a fully masked row (padding only) stays NaN-free.
_MASKED = -1e30


def _kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, causal, tk, block_q, block_k,
            num_k_blocks):
    i = pl.program_id(0)
    q = q_ref[...]
    d = q.shape[-1]

    def body(j, carry, masked):
        acc, m, l = carry
        k = k_ref[pl.ds(j * block_k, block_k), :]
        v = v_ref[pl.ds(j * block_k, block_k), :]
        s2 = c.dot_nt(q, k) * (scale * c.LOG2E)
        if masked:
            mask = c.tile_mask(i * block_q, j * block_k, block_q, block_k, causal=causal, tk=tk)
            s2 = jnp.where(mask, s2, _MASKED)
        m_new = jnp.maximum(m, jnp.max(s2, axis=1))
        p = jnp.exp2(s2 - m_new[:, None])
        if masked:
            p = jnp.where(mask, p, 0.0)
        rescale = jnp.exp2(m - m_new)
        l = l * rescale + jnp.sum(p, axis=1)
        # P is rounded to the value dtype before the product, as FlashAttention does.
        acc = acc * rescale[:, None] + c.dot(p.astype(v.dtype), v)
        return acc, m_new, l

    carry = (jnp.zeros((block_q, d), jnp.float32),
             jnp.full((block_q,), _MASKED, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    acc, m, l = c.query_side_loop(i, block_q, block_k, num_k_blocks, causal=causal, tk=tk,
                                  body=body, carry=carry)
    # Every real row sees key 0, so l > 0 there; padded rows are cut off later.
    l = jnp.maximum(l, 1e-30)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = (m + jnp.log2(l)) * c.LN2


@functools.partial(jax.jit, static_argnames=("causal", "scale", "tk", "config"))
def padded_forward(q, k, v, *, causal, scale, tk, config):
    """Forward on padded [B, T, H, Dp] inputs; returns padded (o, lse)."""
    config = dict(config)
    bq, bk = config["block_q"], config["block_k"]
    b, tq_pad, h, d = q.shape
    tk_pad = k.shape[1]
    kernel = functools.partial(
        _kernel, scale=scale, causal=causal, tk=None if tk == tk_pad else tk,
        block_q=bq, block_k=bk, num_k_blocks=tk_pad // bk)
    return c.call(
        kernel, grid=(tq_pad // bq, b, h),
        in_specs=[c.row_tile(bq, d), c.whole_head(tk_pad, d), c.whole_head(tk_pad, d)],
        out_specs=[c.row_tile(bq, d), c.row_stat_tile(bq)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, tq_pad), jnp.float32)],
        config=config, name="mgd_attention_forward")(q, k, v)
