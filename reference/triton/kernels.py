"""Triton kernels for attention: forward, backward, double backward.

Layout [B, T, H, D] (rows of one head are H*D elements apart); row statistics
[B, H, T] float32. The grid is (row blocks, H, B). Every kernel streams tiles
of the other sequence through registers, so nothing of size T x T ever
reaches memory: extra memory is O(T) row statistics per head.

Logits are kept in base 2 (scaled by log2(e)) so the exponentials are exp2.
Matrix products take the input dtype and accumulate in float32; the
probabilities and score cotangents are rounded to the input dtype before the
second product of each chain, as FlashAttention does.

Causal masking is top-left aligned (query i sees keys j <= i). Tiles are
visited in up to three ranges: tiles needing masks (the diagonal band and the
ragged tail) use the masked step, tiles entirely visible skip the mask work,
and tiles entirely above the diagonal are never visited.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Globals read inside kernels must be constexpr.
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------
# Tile ranges


@triton.jit
def _key_ranges(start_m, Tk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """For a query tile at start_m: keys [0, full) need no mask, [full, hi) do."""
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, Tk)
        # A key tile is fully visible when its last key is <= the tile's first query.
        full = tl.minimum(start_m + 1, Tk) // BLOCK_N * BLOCK_N
    else:
        hi = Tk
        full = Tk // BLOCK_N * BLOCK_N
    return full, hi


@triton.jit
def _query_ranges(start_n, Tq, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """For a key tile at start_n: queries [lo, a) masked, [a, c) unmasked, [c, hi) masked."""
    hi = tl.cdiv(Tq, BLOCK_M) * BLOCK_M
    full_end = Tq // BLOCK_M * BLOCK_M
    if CAUSAL:
        # Queries before start_n see none of these keys; from the first query
        # tile whose first row is >= the tile's last key on, all are visible.
        lo = start_n // BLOCK_M * BLOCK_M
        a = tl.minimum(tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M, hi)
    else:
        lo = 0
        a = 0
    c = tl.maximum(a, full_end)
    return lo, a, c, hi


@triton.jit
def _visible(rows, cols, Tk, CAUSAL: tl.constexpr):
    """[len(rows), len(cols)] mask of the logits that exist and are not masked.

    For per-query tiles: rows past Tq are never stored, so they stay unmasked
    (a fully masked row would only make NaNs there)."""
    ok = cols[None, :] < Tk
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None])
    return ok


@triton.jit
def _visible_t(rows, cols, Tq, Tk, CAUSAL: tl.constexpr):
    """For per-key tiles, transposed [len(cols), len(rows)]: here rows past Tq
    would add to every key's sums, so they are masked too."""
    ok = (rows[None, :] < Tq) & (cols[:, None] < Tk)
    if CAUSAL:
        ok = ok & (cols[:, None] <= rows[None, :])
    return ok


@triton.jit
def _load_rows(ptr, base, rows, row_stride, offs_d, T, MASK: tl.constexpr):
    ptrs = ptr + base + rows[:, None] * row_stride + offs_d[None, :]
    if MASK:
        return tl.load(ptrs, mask=rows[:, None] < T, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _load_stat(ptr, base, rows, T, MASK: tl.constexpr):
    if MASK:
        return tl.load(ptr + base + rows, mask=rows < T, other=0.0)
    else:
        return tl.load(ptr + base + rows)


@triton.jit
def _bases(Tq, Tk, H, HEAD_DIM: tl.constexpr):
    """Offsets of this program's (batch, head) in the token arrays and the stats."""
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    row_stride = H * HEAD_DIM
    q_base = b * Tq * row_stride + h * HEAD_DIM
    k_base = b * Tk * row_stride + h * HEAD_DIM
    stat_base = (b * H + h) * Tq
    return row_stride, q_base, k_base, stat_base


# ----------------------------------------------------------------------------
# Forward


@triton.jit
def _fwd_step(acc, m_i, l_i, q, K, V, k_base, row_stride, start_n, offs_m, offs_n, offs_d, Tq, Tk,
              qk_scale, MASK: tl.constexpr, CAUSAL: tl.constexpr):
    cols = start_n + offs_n
    k = _load_rows(K, k_base, cols, row_stride, offs_d, Tk, MASK)
    v = _load_rows(V, k_base, cols, row_stride, offs_d, Tk, MASK)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if MASK:
        s = tl.where(_visible(offs_m, cols, Tk, CAUSAL), s, float("-inf"))
    # Every row sees key 0 (in the first tile), so m_new is finite from the start.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def attention_fwd(Q, K, V, sm_scale, Tq, Tk, H, O, LSE,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    row_stride, q_base, k_base, stat_base = _bases(Tq, Tk, H, HEAD_DIM)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qk_scale = sm_scale * LOG2E

    q = _load_rows(Q, q_base, offs_m, row_stride, offs_d, Tq, True)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full, hi = _key_ranges(start_m, Tk, BLOCK_M, BLOCK_N, CAUSAL)
    for start_n in range(0, full, BLOCK_N):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, K, V, k_base, row_stride, start_n, offs_m, offs_n,
                                  offs_d, Tq, Tk, qk_scale, False, CAUSAL)
    for start_n in range(full, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, K, V, k_base, row_stride, start_n, offs_m, offs_n,
                                  offs_d, Tq, Tk, qk_scale, True, CAUSAL)

    o = acc / l_i[:, None]
    lse = m_i * LN2 + tl.log(l_i)
    rows_ok = offs_m < Tq
    tl.store(O + q_base + offs_m[:, None] * row_stride + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=rows_ok[:, None])
    tl.store(LSE + stat_base + offs_m, lse, mask=rows_ok)


# ----------------------------------------------------------------------------
# Backward


@triton.jit
def attention_bwd_delta(O, DO, DLSE, Tq, H, DELTA,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """D = rowsum(dO * O) - dlse, the row term shared by both backward sweeps."""
    start_m = tl.program_id(0) * BLOCK_M
    row_stride, q_base, _, stat_base = _bases(Tq, Tq, H, HEAD_DIM)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    o = _load_rows(O, q_base, offs_m, row_stride, offs_d, Tq, True).to(tl.float32)
    do = _load_rows(DO, q_base, offs_m, row_stride, offs_d, Tq, True).to(tl.float32)
    dlse = _load_stat(DLSE, stat_base, offs_m, Tq, True)
    tl.store(DELTA + stat_base + offs_m, tl.sum(o * do, 1) - dlse, mask=offs_m < Tq)


@triton.jit
def _bwd_kv_step(dk, dv, k, v, Q, DO, LSE, DELTA, q_base, stat_base, row_stride, start_m, offs_m,
                 cols, offs_d, Tq, Tk, qk_scale, MASK: tl.constexpr, CAUSAL: tl.constexpr):
    rows = start_m + offs_m
    q = _load_rows(Q, q_base, rows, row_stride, offs_d, Tq, MASK)
    do = _load_rows(DO, q_base, rows, row_stride, offs_d, Tq, MASK)
    lse2 = _load_stat(LSE, stat_base, rows, Tq, MASK) * LOG2E
    delta = _load_stat(DELTA, stat_base, rows, Tq, MASK)
    # Transposed tiles [keys, queries], so the sums over queries are plain products.
    p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse2[None, :])
    if MASK:
        p_t = tl.where(_visible_t(rows, cols, Tq, Tk, CAUSAL), p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do)
    dp_t = tl.dot(v, tl.trans(do))
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q)
    return dk, dv


@triton.jit
def attention_bwd_dkdv(Q, K, V, DO, LSE, DELTA, sm_scale, Tq, Tk, H, DK, DV,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    row_stride, q_base, k_base, stat_base = _bases(Tq, Tk, H, HEAD_DIM)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    qk_scale = sm_scale * LOG2E
    k = _load_rows(K, k_base, cols, row_stride, offs_d, Tk, True)
    v = _load_rows(V, k_base, cols, row_stride, offs_d, Tk, True)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    lo, a, c, hi = _query_ranges(start_n, Tq, BLOCK_M, BLOCK_N, CAUSAL)
    for start_m in range(lo, a, BLOCK_M):
        dk, dv = _bwd_kv_step(dk, dv, k, v, Q, DO, LSE, DELTA, q_base, stat_base, row_stride, start_m,
                              offs_m, cols, offs_d, Tq, Tk, qk_scale, True, CAUSAL)
    for start_m in range(a, c, BLOCK_M):
        dk, dv = _bwd_kv_step(dk, dv, k, v, Q, DO, LSE, DELTA, q_base, stat_base, row_stride, start_m,
                              offs_m, cols, offs_d, Tq, Tk, qk_scale, False, CAUSAL)
    for start_m in range(c, hi, BLOCK_M):
        dk, dv = _bwd_kv_step(dk, dv, k, v, Q, DO, LSE, DELTA, q_base, stat_base, row_stride, start_m,
                              offs_m, cols, offs_d, Tq, Tk, qk_scale, True, CAUSAL)
    out = k_base + cols[:, None] * row_stride + offs_d[None, :]
    ok = cols[:, None] < Tk
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=ok)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_q_step(dq, q, do, lse2, delta, K, V, k_base, row_stride, start_n, offs_m, offs_n, offs_d,
                Tq, Tk, qk_scale, MASK: tl.constexpr, CAUSAL: tl.constexpr):
    cols = start_n + offs_n
    k = _load_rows(K, k_base, cols, row_stride, offs_d, Tk, MASK)
    v = _load_rows(V, k_base, cols, row_stride, offs_d, Tk, MASK)
    p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
    if MASK:
        p = tl.where(_visible(offs_m, cols, Tk, CAUSAL), p, 0.0)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def attention_bwd_dq(Q, K, V, DO, LSE, DELTA, sm_scale, Tq, Tk, H, DQ,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    row_stride, q_base, k_base, stat_base = _bases(Tq, Tk, H, HEAD_DIM)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qk_scale = sm_scale * LOG2E
    q = _load_rows(Q, q_base, offs_m, row_stride, offs_d, Tq, True)
    do = _load_rows(DO, q_base, offs_m, row_stride, offs_d, Tq, True)
    lse2 = _load_stat(LSE, stat_base, offs_m, Tq, True) * LOG2E
    delta = _load_stat(DELTA, stat_base, offs_m, Tq, True)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full, hi = _key_ranges(start_m, Tk, BLOCK_M, BLOCK_N, CAUSAL)
    for start_n in range(0, full, BLOCK_N):
        dq = _bwd_q_step(dq, q, do, lse2, delta, K, V, k_base, row_stride, start_n, offs_m, offs_n,
                         offs_d, Tq, Tk, qk_scale, False, CAUSAL)
    for start_n in range(full, hi, BLOCK_N):
        dq = _bwd_q_step(dq, q, do, lse2, delta, K, V, k_base, row_stride, start_n, offs_m, offs_n,
                         offs_d, Tq, Tk, qk_scale, True, CAUSAL)
    tl.store(DQ + q_base + offs_m[:, None] * row_stride + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=offs_m[:, None] < Tq)


# ----------------------------------------------------------------------------
# Double backward. Names follow the contract: dds is the tangent of S, dd and b
# the row statistics, dp_bar the cotangent of P, ds_bar = s * P * (dp_bar - b).
#
# Sweep 1 (per query tile) reduces dd over all keys and on the way assembles
# dO' = P ddV + ddP V = P ddV + (P * ddS) V - dd * O, which needs no row
# statistic inside the loop; D and b follow from O, dO and dO' after it (five
# products per tile pair). Sweep 2 computes Q' per query tile and K', V'
# per key tile, each recomputing the tile products it needs.


@triton.jit
def _dbwd_rows_step(dd, acc, q, ddq, lse2, K, V, DDK, DDV, k_base, row_stride,
                    start_n, offs_m, offs_n, offs_d, Tq, Tk, sm_scale, qk_scale,
                    MASK: tl.constexpr, CAUSAL: tl.constexpr):
    cols = start_n + offs_n
    k = _load_rows(K, k_base, cols, row_stride, offs_d, Tk, MASK)
    v = _load_rows(V, k_base, cols, row_stride, offs_d, Tk, MASK)
    ddk = _load_rows(DDK, k_base, cols, row_stride, offs_d, Tk, MASK)
    ddv = _load_rows(DDV, k_base, cols, row_stride, offs_d, Tk, MASK)
    p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
    if MASK:
        p = tl.where(_visible(offs_m, cols, Tk, CAUSAL), p, 0.0)
    dds = (tl.dot(ddq, tl.trans(k)) + tl.dot(q, tl.trans(ddk))) * sm_scale
    p_dds = p * dds
    dd += tl.sum(p_dds, 1)
    # P ddV and (P * ddS) V share one float32 accumulator: at head dim 128 a
    # second [BLOCK_M, HEAD_DIM] accumulator is what made this kernel spill.
    acc = tl.dot(p.to(ddv.dtype), ddv, acc)
    acc = tl.dot(p_dds.to(v.dtype), v, acc)
    return dd, acc


@triton.jit
def attention_dbwd_rows(Q, K, V, O, DO, LSE, DDQ, DDK, DDV, sm_scale, Tq, Tk, H,
                        GDO, DELTA, DD, BSTAT,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        CAUSAL: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    row_stride, q_base, k_base, stat_base = _bases(Tq, Tk, H, HEAD_DIM)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qk_scale = sm_scale * LOG2E
    q = _load_rows(Q, q_base, offs_m, row_stride, offs_d, Tq, True)
    ddq = _load_rows(DDQ, q_base, offs_m, row_stride, offs_d, Tq, True)
    lse2 = _load_stat(LSE, stat_base, offs_m, Tq, True) * LOG2E

    dd = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full, hi = _key_ranges(start_m, Tk, BLOCK_M, BLOCK_N, CAUSAL)
    for start_n in range(0, full, BLOCK_N):
        dd, acc = _dbwd_rows_step(
            dd, acc, q, ddq, lse2, K, V, DDK, DDV, k_base, row_stride, start_n,
            offs_m, offs_n, offs_d, Tq, Tk, sm_scale, qk_scale, False, CAUSAL)
    for start_n in range(full, hi, BLOCK_N):
        dd, acc = _dbwd_rows_step(
            dd, acc, q, ddq, lse2, K, V, DDK, DDV, k_base, row_stride, start_n,
            offs_m, offs_n, offs_d, Tq, Tk, sm_scale, qk_scale, True, CAUSAL)

    # O and dO are read only after the loop: held across it (O as a float32
    # tile), they took registers the head-dim-128 loop needs.
    o = _load_rows(O, q_base, offs_m, row_stride, offs_d, Tq, True).to(tl.float32)
    do32 = _load_rows(DO, q_base, offs_m, row_stride, offs_d, Tq, True).to(tl.float32)
    delta = tl.sum(o * do32, 1)
    gdo = acc - dd[:, None] * o
    # The contract's one-sweep b = rowsum(dO * (P ddV)) - 2 D dd + rowsum(P dP ddS)
    # equals rowsum(dO * dO') - D dd, since rowsum(dO * ((P * ddS) V)) is
    # rowsum(P * ddS * dP): the loop needs no second row sum.
    b = tl.sum(do32 * gdo, 1) - delta * dd
    rows_ok = offs_m < Tq
    tl.store(GDO + q_base + offs_m[:, None] * row_stride + offs_d[None, :],
             gdo.to(GDO.dtype.element_ty), mask=rows_ok[:, None])
    tl.store(DELTA + stat_base + offs_m, delta, mask=rows_ok)
    tl.store(DD + stat_base + offs_m, dd, mask=rows_ok)
    tl.store(BSTAT + stat_base + offs_m, b, mask=rows_ok)


@triton.jit
def _dbwd_q_step(acc, q, do, ddq, lse2, delta, dd, b, K, V, DDK, DDV, k_base, row_stride, start_n,
                 offs_m, offs_n, offs_d, Tq, Tk, sm_scale, qk_scale,
                 MASK: tl.constexpr, CAUSAL: tl.constexpr):
    cols = start_n + offs_n
    k = _load_rows(K, k_base, cols, row_stride, offs_d, Tk, MASK)
    v = _load_rows(V, k_base, cols, row_stride, offs_d, Tk, MASK)
    ddk = _load_rows(DDK, k_base, cols, row_stride, offs_d, Tk, MASK)
    ddv = _load_rows(DDV, k_base, cols, row_stride, offs_d, Tk, MASK)
    p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
    if MASK:
        p = tl.where(_visible(offs_m, cols, Tk, CAUSAL), p, 0.0)
    dp = tl.dot(do, tl.trans(v))
    dds = (tl.dot(ddq, tl.trans(k)) + tl.dot(q, tl.trans(ddk))) * sm_scale
    dp_bar = tl.dot(do, tl.trans(ddv)) - dp * dd[:, None] - dds * delta[:, None] + dp * dds
    ds = p * (dp - delta[:, None])
    ds_bar = p * (dp_bar - b[:, None])
    acc += tl.dot(ds.to(ddk.dtype), ddk)
    acc += tl.dot(ds_bar.to(k.dtype), k)
    return acc


@triton.jit
def attention_dbwd_dq(Q, K, V, DO, LSE, DDQ, DDK, DDV, DELTA, DD, BSTAT, sm_scale, Tq, Tk, H, GQ,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      CAUSAL: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    row_stride, q_base, k_base, stat_base = _bases(Tq, Tk, H, HEAD_DIM)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qk_scale = sm_scale * LOG2E
    q = _load_rows(Q, q_base, offs_m, row_stride, offs_d, Tq, True)
    do = _load_rows(DO, q_base, offs_m, row_stride, offs_d, Tq, True)
    ddq = _load_rows(DDQ, q_base, offs_m, row_stride, offs_d, Tq, True)
    lse2 = _load_stat(LSE, stat_base, offs_m, Tq, True) * LOG2E
    delta = _load_stat(DELTA, stat_base, offs_m, Tq, True)
    dd = _load_stat(DD, stat_base, offs_m, Tq, True)
    b = _load_stat(BSTAT, stat_base, offs_m, Tq, True)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full, hi = _key_ranges(start_m, Tk, BLOCK_M, BLOCK_N, CAUSAL)
    for start_n in range(0, full, BLOCK_N):
        acc = _dbwd_q_step(acc, q, do, ddq, lse2, delta, dd, b, K, V, DDK, DDV, k_base, row_stride,
                           start_n, offs_m, offs_n, offs_d, Tq, Tk, sm_scale, qk_scale, False, CAUSAL)
    for start_n in range(full, hi, BLOCK_N):
        acc = _dbwd_q_step(acc, q, do, ddq, lse2, delta, dd, b, K, V, DDK, DDV, k_base, row_stride,
                           start_n, offs_m, offs_n, offs_d, Tq, Tk, sm_scale, qk_scale, True, CAUSAL)
    tl.store(GQ + q_base + offs_m[:, None] * row_stride + offs_d[None, :],
             (acc * sm_scale).to(GQ.dtype.element_ty), mask=offs_m[:, None] < Tq)


@triton.jit
def _dbwd_kv_step(acc_k, acc_v, k, v, ddk, ddv, Q, DO, DDQ, LSE, DELTA, DD, BSTAT, q_base, stat_base,
                  row_stride, start_m, offs_m, cols, offs_d, Tq, Tk, sm_scale, qk_scale,
                  MASK: tl.constexpr, CAUSAL: tl.constexpr):
    rows = start_m + offs_m
    q = _load_rows(Q, q_base, rows, row_stride, offs_d, Tq, MASK)
    do = _load_rows(DO, q_base, rows, row_stride, offs_d, Tq, MASK)
    ddq = _load_rows(DDQ, q_base, rows, row_stride, offs_d, Tq, MASK)
    lse2 = _load_stat(LSE, stat_base, rows, Tq, MASK) * LOG2E
    delta = _load_stat(DELTA, stat_base, rows, Tq, MASK)
    dd = _load_stat(DD, stat_base, rows, Tq, MASK)
    b = _load_stat(BSTAT, stat_base, rows, Tq, MASK)
    # Transposed tiles [keys, queries].
    p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse2[None, :])
    if MASK:
        p_t = tl.where(_visible_t(rows, cols, Tq, Tk, CAUSAL), p_t, 0.0)
    dp_t = tl.dot(v, tl.trans(do))
    dds_t = (tl.dot(k, tl.trans(ddq)) + tl.dot(ddk, tl.trans(q))) * sm_scale
    dp_bar_t = (tl.dot(ddv, tl.trans(do)) - dp_t * dd[None, :] - dds_t * delta[None, :]
                + dp_t * dds_t)
    ds_t = p_t * (dp_t - delta[None, :])
    ds_bar_t = p_t * (dp_bar_t - b[None, :])
    acc_k += tl.dot(ds_t.to(ddq.dtype), ddq)
    acc_k += tl.dot(ds_bar_t.to(q.dtype), q)
    ddp_t = p_t * (dds_t - dd[None, :])
    acc_v += tl.dot(ddp_t.to(do.dtype), do)
    return acc_k, acc_v


@triton.jit
def attention_dbwd_dkdv(Q, K, V, DO, LSE, DDQ, DDK, DDV, DELTA, DD, BSTAT, sm_scale, Tq, Tk, H,
                        GK, GV,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        CAUSAL: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    row_stride, q_base, k_base, stat_base = _bases(Tq, Tk, H, HEAD_DIM)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    qk_scale = sm_scale * LOG2E
    k = _load_rows(K, k_base, cols, row_stride, offs_d, Tk, True)
    v = _load_rows(V, k_base, cols, row_stride, offs_d, Tk, True)
    ddk = _load_rows(DDK, k_base, cols, row_stride, offs_d, Tk, True)
    ddv = _load_rows(DDV, k_base, cols, row_stride, offs_d, Tk, True)
    acc_k = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    acc_v = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    lo, a, c, hi = _query_ranges(start_n, Tq, BLOCK_M, BLOCK_N, CAUSAL)
    for start_m in range(lo, a, BLOCK_M):
        acc_k, acc_v = _dbwd_kv_step(acc_k, acc_v, k, v, ddk, ddv, Q, DO, DDQ, LSE, DELTA, DD, BSTAT,
                                     q_base, stat_base, row_stride, start_m, offs_m, cols, offs_d,
                                     Tq, Tk, sm_scale, qk_scale, True, CAUSAL)
    for start_m in range(a, c, BLOCK_M):
        acc_k, acc_v = _dbwd_kv_step(acc_k, acc_v, k, v, ddk, ddv, Q, DO, DDQ, LSE, DELTA, DD, BSTAT,
                                     q_base, stat_base, row_stride, start_m, offs_m, cols, offs_d,
                                     Tq, Tk, sm_scale, qk_scale, False, CAUSAL)
    for start_m in range(c, hi, BLOCK_M):
        acc_k, acc_v = _dbwd_kv_step(acc_k, acc_v, k, v, ddk, ddv, Q, DO, DDQ, LSE, DELTA, DD, BSTAT,
                                     q_base, stat_base, row_stride, start_m, offs_m, cols, offs_d,
                                     Tq, Tk, sm_scale, qk_scale, True, CAUSAL)
    out = k_base + cols[:, None] * row_stride + offs_d[None, :]
    ok = cols[:, None] < Tk
    tl.store(GK + out, (acc_k * sm_scale).to(GK.dtype.element_ty), mask=ok)
    tl.store(GV + out, acc_v.to(GV.dtype.element_ty), mask=ok)
