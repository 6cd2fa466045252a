"""The two-sweep double backward, tile by tile as a kernel would run it, in float64 NumPy.

The specification of the 15-product design (`kernels/DESIGN.md`, the double backward's
"Next", item 0): every quantity is formed on 2-D tiles in the order and with the register-saving
rewrites the kernel uses, so its tests check the kernel's algebra before any CUDA exists.

- Sweep A, query-major (per query tile, keys streamed; 5 tile products): S, the two
  halves of ddS, and A = P ddV + (P * ddS) V. It writes dO' = A - dd * O and per row
  dd = rowsum(ddS * P) and b = rowsum(dO * A) - 2 D dd (no dP, no dO ddV^T).
- Sweep B, key-major (per key tile, query tiles streamed; 10 tile products): S^T, dP^T,
  the two halves of ddS^T, then pass 1 on the unscaled tiles
  (u = ddS_raw - dd / s, ddP = p u, dS = p (dP - D), C = s (dP u - ddS_raw D) - b),
  X^T = ddV dO^T accumulated onto C, pass 2 (dS' = p (C + X)), and
  K' += s (dS^T ddQ + dS'^T Q), V' += s ddP^T dO, and Q' += s (dS ddK + dS' K), the last
  a partial per key tile added into a float32-like accumulator across key tiles (the
  kernel's bulk reduce-add); here the additions are in float64 and in key order.

Inputs and outputs follow `reference.float64.double_backward` ([B, T, H, D], Tq = Tk);
the forward's (O, L) and the backward's D come from the closed form, as the kernel reads
them from the forward and the backward's preprocess.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mgd.reference import float64

__all__ = ["TileCounter", "double_backward"]


@dataclass
class TileCounter:
    """Tile products by sweep, and the (query tile, key tile) pairs each sweep visited."""
    products: dict = field(default_factory=lambda: {"A": 0, "B": 0})
    pairs: dict = field(default_factory=lambda: {"A": 0, "B": 0})

    def mm(self, sweep: str, a, b):
        self.products[sweep] += 1
        return a @ b


def _tiles(t: int, size: int):
    return [(i, min(i + size, t)) for i in range(0, t, size)]


def double_backward(q, k, v, do, ddq, ddk, ddv, *, causal=True, scale=None, block_q=64,
                    block_k=64, counter: TileCounter | None = None):
    """(Q', K', V', dO') as `reference.float64.double_backward`, computed in two sweeps of
    tiles of `block_q` queries and `block_k` keys; `counter` tallies the tile products."""
    q, k, v, do, ddq, ddk, ddv = (np.swapaxes(np.asarray(x, np.float64), 1, 2)
                                  for x in (q, k, v, do, ddq, ddk, ddv))
    if q.shape[-2] != k.shape[-2]:
        raise ValueError("two-sweep model: self-attention only (Tq == Tk)")
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block_q and block_k must be >= 1, got {block_q} and {block_k}")
    s = 1.0 / np.sqrt(q.shape[-1]) if scale is None else float(scale)
    c = counter or TileCounter()
    o, lse = float64.forward(*(np.swapaxes(x, 1, 2) for x in (q, k, v)), causal=causal,
                             scale=s)
    o = np.swapaxes(o, 1, 2)
    delta = np.sum(do * o, axis=-1)                      # the backward's D, per row
    outs = [np.zeros_like(x) for x in (q, k, v, do)]
    for bh in np.ndindex(*q.shape[:2]):
        gq, gk, gv, gdo = (x[bh] for x in outs)
        args = tuple(x[bh] for x in (q, k, v, do, ddq, ddk, ddv, o))
        dd, b = _sweep_a(*args, lse[bh], delta[bh], gdo, s, causal, block_q, block_k, c)
        _sweep_b(*args[:7], lse[bh], delta[bh], dd, b, gq, gk, gv, s, causal, block_q,
                 block_k, c)
    return tuple(np.swapaxes(x, 1, 2) for x in outs)


def _p_tile(scores, lse_rows, rows, cols, causal):
    """exp(s S - L) on a [rows, cols] tile (scores already scaled), masked under causal."""
    p = np.exp(scores - lse_rows[:, None])
    if causal:
        p = np.where(rows[:, None] >= cols[None, :], p, 0.0)
    return p


def _visible(last_q, k0, causal):
    """Whether a query tile ending at row `last_q` and a key tile starting at `k0` share an
    unmasked entry."""
    return not causal or k0 <= last_q


def _sweep_a(q, k, v, do, ddq, ddk, ddv, o, lse, delta, gdo, s, causal, bq, bk, c):
    """Per query tile: dd, b and dO'. Returns the row statistics (dd, b) for sweep B."""
    t = q.shape[0]
    dd, b = np.zeros(t), np.zeros(t)
    for q0, q1 in _tiles(t, bq):
        rows = np.arange(q0, q1)
        acc = np.zeros((q1 - q0, v.shape[-1]))           # A = P ddV + (P * ddS) V
        dd_t = np.zeros(q1 - q0)
        for k0, k1 in _tiles(t, bk):
            if not _visible(q1 - 1, k0, causal):
                continue
            c.pairs["A"] += 1
            cols = np.arange(k0, k1)
            p = _p_tile(s * c.mm("A", q[q0:q1], k[k0:k1].T), lse[q0:q1], rows, cols, causal)
            dds = s * (c.mm("A", ddq[q0:q1], k[k0:k1].T) + c.mm("A", q[q0:q1], ddk[k0:k1].T))
            dd_t += np.sum(dds * p, axis=1)
            acc += c.mm("A", p, ddv[k0:k1]) + c.mm("A", p * dds, v[k0:k1])
        dd[q0:q1] = dd_t
        gdo[q0:q1] = acc - dd_t[:, None] * o[q0:q1]
        b[q0:q1] = np.sum(do[q0:q1] * acc, axis=1) - 2.0 * delta[q0:q1] * dd_t
    return dd, b


def _sweep_b(q, k, v, do, ddq, ddk, ddv, lse, delta, dd, b, gq, gk, gv, s, causal, bq, bk, c):
    """Per key tile: K', V', and Q' partials added across key tiles."""
    t = q.shape[0]
    for k0, k1 in _tiles(t, bk):
        cols = np.arange(k0, k1)
        acc_k = np.zeros((k1 - k0, q.shape[-1]))
        acc_v = np.zeros((k1 - k0, v.shape[-1]))
        for q0, q1 in _tiles(t, bq):
            if not _visible(q1 - 1, k0, causal):
                continue
            c.pairs["B"] += 1
            rows = np.arange(q0, q1)
            # Key-major tiles are transposed ([keys, queries]); transposing back keeps the
            # formulas readable and is free in a kernel (the accumulator's layout).
            st = c.mm("B", k[k0:k1], q[q0:q1].T)
            dpt = c.mm("B", v[k0:k1], do[q0:q1].T)
            ddst = c.mm("B", ddk[k0:k1], q[q0:q1].T) + c.mm("B", k[k0:k1], ddq[q0:q1].T)
            p = _p_tile(s * st.T, lse[q0:q1], rows, cols, causal)
            dp, dds_raw = dpt.T, ddst.T
            # Pass 1: the scale s is left to the epilogues of K', V' and Q'.
            u = dds_raw - dd[q0:q1, None] / s
            ddp = p * u
            ds = p * (dp - delta[q0:q1, None])
            cc = s * (dp * u - dds_raw * delta[q0:q1, None]) - b[q0:q1, None]
            cc = cc + c.mm("B", ddv[k0:k1], do[q0:q1].T).T       # X^T onto C
            ds_bar = p * cc                                       # pass 2
            acc_k += s * (c.mm("B", ds.T, ddq[q0:q1]) + c.mm("B", ds_bar.T, q[q0:q1]))
            acc_v += s * c.mm("B", ddp.T, do[q0:q1])
            gq[q0:q1] += s * (c.mm("B", ds, ddk[k0:k1]) + c.mm("B", ds_bar, k[k0:k1]))
        gk[k0:k1] = acc_k
        gv[k0:k1] = acc_v
