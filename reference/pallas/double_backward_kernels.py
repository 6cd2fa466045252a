"""Double backward kernels: three sweeps, O(T) extra memory.

Given cotangents (ddQ, ddK, ddV) of (dQ, dK, dV), the contract
(docs/attention-math.md) needs two full-row statistics, dd and b,
before dS' can be formed, hence:

  rows  (per query block, over keys)   dd = rowsum(ddS * P)
                                       b  = rowsum(dO * (P ddV)) - 2 D dd + rowsum(P dP ddS)
                                       and P ddV, kept in float32 for dO'
  q     (per query block, over keys)   Q'  = dS ddK + dS' K,   dO' = P ddV + ddP V
  kv    (per key block, over queries)  K'  = dS^T ddQ + dS'^T Q,   V' = ddP^T dO

Matrix products per tile: 5 + 8 + 8 = 21 (the contract's floor is 12; the
recomputation of S, dP and ddS in each sweep is the price of never storing T x T).
dS, dS' and ddP are rounded to the input dtype before their products.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _common as c
from .backward_kernels import delta as _delta


def _tile_terms(q, k, v, do, ddq, ddk, lse, mask, scale):
    """P, dP and ddS = s (ddQ K^T + Q ddK^T) for one tile, all float32."""
    p = c.probabilities(q, k, (lse * c.LOG2E)[:, None], mask, scale)
    dp = c.dot_nt(do, v)
    dds = scale * (c.dot_nt(ddq, k) + c.dot_nt(q, ddk))
    return p, dp, dds


def _second_order(p, dp, dds, w, dlt, dd, b, scale):
    """dS, dS' and ddP of one tile; w = dO ddV^T, the row stats are [block_q, 1]."""
    ds = scale * p * (dp - dlt)
    dp_bar = w - dp * dd - dds * dlt + dp * dds
    ds_bar = scale * p * (dp_bar - b)
    ddp = p * (dds - dd)
    return ds, ds_bar, ddp


def _mask(masked, i, j, block_q, block_k, causal, tk):
    if not masked:
        return None
    return c.tile_mask(i * block_q, j * block_k, block_q, block_k, causal=causal, tk=tk)


def _rows_kernel(q_ref, do_ref, ddq_ref, lse_ref, delta_ref, k_ref, v_ref, ddk_ref, ddv_ref,
                 dd_ref, b_ref, pddv_ref, *, scale, causal, tk, block_q, block_k, num_k_blocks):
    i = pl.program_id(0)
    q, do, ddq, lse = q_ref[...], do_ref[...], ddq_ref[...], lse_ref[...]

    def body(j, carry, masked):
        dd, pdpdds, pddv = carry
        cols = pl.ds(j * block_k, block_k)
        k, v, ddk, ddv = k_ref[cols, :], v_ref[cols, :], ddk_ref[cols, :], ddv_ref[cols, :]
        p, dp, dds = _tile_terms(q, k, v, do, ddq, ddk, lse,
                                 _mask(masked, i, j, block_q, block_k, causal, tk), scale)
        pdds = p * dds
        dd = dd + jnp.sum(pdds, axis=1)
        pdpdds = pdpdds + jnp.sum(pdds * dp, axis=1)
        pddv = pddv + c.dot(p.astype(ddv.dtype), ddv)
        return dd, pdpdds, pddv

    zeros = jnp.zeros((block_q,), jnp.float32)
    dd, pdpdds, pddv = c.query_side_loop(
        i, block_q, block_k, num_k_blocks, causal=causal, tk=tk, body=body,
        carry=(zeros, zeros, jnp.zeros(q.shape, jnp.float32)))
    dd_ref[...] = dd
    b_ref[...] = (jnp.sum(do.astype(jnp.float32) * pddv, axis=1)
                  - 2.0 * delta_ref[...] * dd + pdpdds)
    pddv_ref[...] = pddv


def _q_kernel(q_ref, do_ref, ddq_ref, lse_ref, delta_ref, dd_ref, b_ref, pddv_ref,
              k_ref, v_ref, ddk_ref, ddv_ref, gq_ref, gdo_ref, *,
              scale, causal, tk, block_q, block_k, num_k_blocks):
    i = pl.program_id(0)
    q, do, ddq, lse = q_ref[...], do_ref[...], ddq_ref[...], lse_ref[...]
    dlt, dd, b = delta_ref[...][:, None], dd_ref[...][:, None], b_ref[...][:, None]
    dtype = q.dtype

    def body(j, carry, masked):
        gq, gdo = carry
        cols = pl.ds(j * block_k, block_k)
        k, v, ddk, ddv = k_ref[cols, :], v_ref[cols, :], ddk_ref[cols, :], ddv_ref[cols, :]
        p, dp, dds = _tile_terms(q, k, v, do, ddq, ddk, lse,
                                 _mask(masked, i, j, block_q, block_k, causal, tk), scale)
        ds, ds_bar, ddp = _second_order(p, dp, dds, c.dot_nt(do, ddv), dlt, dd, b, scale)
        gq = gq + c.dot(ds.astype(dtype), ddk) + c.dot(ds_bar.astype(dtype), k)
        gdo = gdo + c.dot(ddp.astype(dtype), v)
        return gq, gdo

    zeros = jnp.zeros(q.shape, jnp.float32)
    gq, gdo = c.query_side_loop(i, block_q, block_k, num_k_blocks, causal=causal, tk=tk,
                                body=body, carry=(zeros, zeros))
    gq_ref[...] = gq.astype(gq_ref.dtype)
    gdo_ref[...] = (gdo + pddv_ref[...]).astype(gdo_ref.dtype)


def _kv_kernel(k_ref, v_ref, ddk_ref, ddv_ref, q_ref, do_ref, ddq_ref, lse_ref, delta_ref,
               dd_ref, b_ref, gk_ref, gv_ref, *, scale, causal, block_q, block_k, num_q_blocks):
    j = pl.program_id(0)
    k, v, ddk, ddv = k_ref[...], v_ref[...], ddk_ref[...], ddv_ref[...]
    dtype = k.dtype

    def body(i, carry, masked):
        gk, gv = carry
        rows = pl.ds(i * block_q, block_q)
        q, do, ddq = q_ref[rows, :], do_ref[rows, :], ddq_ref[rows, :]
        dlt, dd, b = (delta_ref[rows][:, None], dd_ref[rows][:, None], b_ref[rows][:, None])
        p, dp, dds = _tile_terms(q, k, v, do, ddq, ddk, lse_ref[rows],
                                 _mask(masked, i, j, block_q, block_k, causal, None), scale)
        ds, ds_bar, ddp = _second_order(p, dp, dds, c.dot_nt(do, ddv), dlt, dd, b, scale)
        gk = gk + c.dot_tn(ds.astype(dtype), ddq) + c.dot_tn(ds_bar.astype(dtype), q)
        gv = gv + c.dot_tn(ddp.astype(dtype), do)
        return gk, gv

    zeros = jnp.zeros(k.shape, jnp.float32)
    gk, gv = c.key_side_loop(j, block_q, block_k, num_q_blocks, causal=causal, body=body,
                             carry=(zeros, zeros))
    gk_ref[...] = gk.astype(gk_ref.dtype)
    gv_ref[...] = gv.astype(gv_ref.dtype)


def rows(q, k, v, do, ddq, ddk, ddv, lse, dlt, *, causal, scale, tk, config):
    """Sweep 1: (dd, b, P ddV) on padded inputs."""
    bq, bk = config["block_q"], config["block_k"]
    b_, tq_pad, h, d = q.shape
    tk_pad = k.shape[1]
    kernel = functools.partial(_rows_kernel, scale=scale, causal=causal,
                               tk=None if tk == tk_pad else tk, block_q=bq, block_k=bk,
                               num_k_blocks=tk_pad // bk)
    stat = jax.ShapeDtypeStruct((b_, h, tq_pad), jnp.float32)
    return c.call(
        kernel, grid=(tq_pad // bq, b_, h),
        in_specs=[c.row_tile(bq, d)] * 3 + [c.row_stat_tile(bq)] * 2
        + [c.whole_head(tk_pad, d)] * 4,
        out_specs=[c.row_stat_tile(bq), c.row_stat_tile(bq), c.row_tile(bq, d)],
        out_shape=[stat, stat, jax.ShapeDtypeStruct(q.shape, jnp.float32)],
        config=config, name="mgd_attention_double_backward_rows",
    )(q, do, ddq, lse, dlt, k, v, ddk, ddv)


def query_side(q, k, v, do, ddq, ddk, ddv, lse, dlt, dd, b, pddv, *, causal, scale, tk, config):
    """Sweep 2: (Q', dO') on padded inputs."""
    bq, bk = config["block_q"], config["block_k"]
    b_, tq_pad, h, d = q.shape
    tk_pad = k.shape[1]
    kernel = functools.partial(_q_kernel, scale=scale, causal=causal,
                               tk=None if tk == tk_pad else tk, block_q=bq, block_k=bk,
                               num_k_blocks=tk_pad // bk)
    return c.call(
        kernel, grid=(tq_pad // bq, b_, h),
        in_specs=[c.row_tile(bq, d)] * 3 + [c.row_stat_tile(bq)] * 4 + [c.row_tile(bq, d)]
        + [c.whole_head(tk_pad, d)] * 4,
        out_specs=[c.row_tile(bq, d), c.row_tile(bq, d)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct(do.shape, do.dtype)],
        config=config, name="mgd_attention_double_backward_q",
    )(q, do, ddq, lse, dlt, dd, b, pddv, k, v, ddk, ddv)


def key_side(q, k, v, do, ddq, ddk, ddv, lse, dlt, dd, b, *, causal, scale, config):
    """Sweep 3: (K', V') on padded inputs."""
    bq, bk = config["block_q"], config["block_k"]
    b_, tq_pad, h, d = q.shape
    tk_pad = k.shape[1]
    kernel = functools.partial(_kv_kernel, scale=scale, causal=causal, block_q=bq, block_k=bk,
                               num_q_blocks=tq_pad // bq)
    return c.call(
        kernel, grid=(tk_pad // bk, b_, h),
        in_specs=[c.row_tile(bk, d)] * 4 + [c.whole_head(tq_pad, d)] * 3
        + [c.whole_row_stat(tq_pad)] * 4,
        out_specs=[c.row_tile(bk, d), c.row_tile(bk, d)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        config=config, name="mgd_attention_double_backward_kv",
    )(k, v, ddk, ddv, q, do, ddq, lse, dlt, dd, b)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "tk", "rows_config",
                                             "q_config", "kv_config"))
def padded_double_backward(q, k, v, o, lse, do, ddq, ddk, ddv, *, causal, scale, tk,
                           rows_config, q_config, kv_config):
    """(gq, gk, gv, gdo) on padded inputs (zeros in every padded row, finite lse)."""
    rows_config, q_config, kv_config = dict(rows_config), dict(q_config), dict(kv_config)
    dlt = _delta(o, do, None, config=rows_config)
    dd, b, pddv = rows(q, k, v, do, ddq, ddk, ddv, lse, dlt, causal=causal, scale=scale, tk=tk,
                       config=rows_config)
    gq, gdo = query_side(q, k, v, do, ddq, ddk, ddv, lse, dlt, dd, b, pddv, causal=causal,
                         scale=scale, tk=tk, config=q_config)
    gk, gv = key_side(q, k, v, do, ddq, ddk, ddv, lse, dlt, dd, b, causal=causal, scale=scale,
                      config=kv_config)
    return gq, gk, gv, gdo
