"""Backward kernels (FlashAttention-2 layout).

    delta = rowsum(dO * O) - dlse          one pass over the query rows
    dK, dV: one program per key block, looping over the query blocks that see it
    dQ:     one program per query block, looping over the key blocks it sees

P is recomputed from the saved lse; P and dS are rounded to the input dtype
before their second product.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _common as c


def _delta_kernel(o_ref, do_ref, *rest):
    *dlse_ref, delta_ref = rest
    delta = jnp.sum(o_ref[...].astype(jnp.float32) * do_ref[...].astype(jnp.float32), axis=1)
    if dlse_ref:
        delta = delta - dlse_ref[0][...]
    delta_ref[...] = delta


def delta(o, do, dlse, *, config):
    """rowsum(dO * O) - dlse as [B, H, T] float32 (padded shapes in, padded out)."""
    bq = config["block_q"]
    b, t, h, d = o.shape
    in_specs = [c.row_tile(bq, d), c.row_tile(bq, d)]
    args = [o, do]
    if dlse is not None:
        in_specs.append(c.row_stat_tile(bq))
        args.append(dlse)
    return c.call(_delta_kernel, grid=(t // bq, b, h), in_specs=in_specs,
                  out_specs=c.row_stat_tile(bq),
                  out_shape=jax.ShapeDtypeStruct((b, h, t), jnp.float32),
                  config={"num_warps": 4, "num_stages": 1}, name="mgd_attention_delta")(*args)


def _tile_grads(q, k, v, do, lse, dlt, mask, scale):
    """P and s * P * (dP - delta) for one tile."""
    p = c.probabilities(q, k, (lse * c.LOG2E)[:, None], mask, scale)
    dp = c.dot_nt(do, v)
    return p, scale * p * (dp - dlt[:, None])


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                 scale, causal, block_q, block_k, num_q_blocks):
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]
    dtype = k.dtype

    def body(i, carry, masked):
        dk, dv = carry
        rows = pl.ds(i * block_q, block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        mask = (c.tile_mask(i * block_q, j * block_k, block_q, block_k, causal=causal, tk=None)
                if masked else None)
        p, ds = _tile_grads(q, k, v, do, lse_ref[rows], delta_ref[rows], mask, scale)
        dv = dv + c.dot_tn(p.astype(dtype), do)
        dk = dk + c.dot_tn(ds.astype(dtype), q)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = c.key_side_loop(j, block_q, block_k, num_q_blocks, causal=causal, body=body,
                             carry=(zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, dq_ref, *,
               scale, causal, tk, block_q, block_k, num_k_blocks):
    i = pl.program_id(0)
    q, do = q_ref[...], do_ref[...]
    lse, dlt = lse_ref[...], delta_ref[...]

    def body(j, dq, masked):
        cols = pl.ds(j * block_k, block_k)
        k, v = k_ref[cols, :], v_ref[cols, :]
        mask = (c.tile_mask(i * block_q, j * block_k, block_q, block_k, causal=causal, tk=tk)
                if masked else None)
        _, ds = _tile_grads(q, k, v, do, lse, dlt, mask, scale)
        return dq + c.dot(ds.astype(k.dtype), k)

    dq = c.query_side_loop(i, block_q, block_k, num_k_blocks, causal=causal, tk=tk, body=body,
                           carry=jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def dkdv(q, k, v, do, lse, dlt, *, causal, scale, config):
    """(dk, dv) on padded inputs, one program per key block."""
    bq, bk = config["block_q"], config["block_k"]
    b, tq_pad, h, d = q.shape
    tk_pad = k.shape[1]
    return c.call(
        functools.partial(_dkdv_kernel, scale=scale, causal=causal, block_q=bq, block_k=bk,
                          num_q_blocks=tq_pad // bq),
        grid=(tk_pad // bk, b, h),
        in_specs=[c.whole_head(tq_pad, d), c.row_tile(bk, d), c.row_tile(bk, d),
                  c.whole_head(tq_pad, d), c.whole_row_stat(tq_pad), c.whole_row_stat(tq_pad)],
        out_specs=[c.row_tile(bk, d), c.row_tile(bk, d)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        config=config, name="mgd_attention_backward_dkdv")(q, k, v, do, lse, dlt)


def dq(q, k, v, do, lse, dlt, *, causal, scale, tk, config):
    """dq on padded inputs, one program per query block; `tk` is the unpadded key length."""
    bq, bk = config["block_q"], config["block_k"]
    b, tq_pad, h, d = q.shape
    tk_pad = k.shape[1]
    return c.call(
        functools.partial(_dq_kernel, scale=scale, causal=causal,
                          tk=None if tk == tk_pad else tk, block_q=bq, block_k=bk,
                          num_k_blocks=tk_pad // bk),
        grid=(tq_pad // bq, b, h),
        in_specs=[c.row_tile(bq, d), c.row_tile(bq, d), c.row_stat_tile(bq), c.row_stat_tile(bq),
                  c.whole_head(tk_pad, d), c.whole_head(tk_pad, d)],
        out_specs=c.row_tile(bq, d),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        config=config, name="mgd_attention_backward_dq")(q, do, lse, dlt, k, v)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "tk", "dkdv_config",
                                             "dq_config"))
def padded_backward(q, k, v, o, lse, do, dlse, *, causal, scale, tk, dkdv_config, dq_config):
    """(dq, dk, dv) on padded inputs. Padded query rows must hold zeros in q and do
    and a finite lse; then they add nothing to dk and dv."""
    dkdv_config, dq_config = dict(dkdv_config), dict(dq_config)
    dlt = delta(o, do, dlse, config=dq_config)
    dk, dv = dkdv(q, k, v, do, lse, dlt, causal=causal, scale=scale, config=dkdv_config)
    dq_ = dq(q, k, v, do, lse, dlt, causal=causal, scale=scale, tk=tk, config=dq_config)
    return dq_, dk, dv
