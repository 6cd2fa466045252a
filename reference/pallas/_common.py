"""What every Pallas attention kernel shares: padding, tile masks, dots, launch.

The kernels read the public [B, T, H, D] layout directly (a BlockSpec picks one
head's [block, D] tile), so aligned inputs are never copied or transposed. The
wrappers pad T up to a block multiple and D up to a power of two only when an
input needs it. Padded keys are masked out of every tile that holds them; padded
query rows carry zeros (and lse 0), so they contribute exactly nothing.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # the Triton lowering's parameters; present in jax 0.10 and 0.11
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - a jax without the GPU Pallas module
    plgpu = None

# Head dims the kernels run on natively. Others up to the largest are zero-padded
# (zeros add nothing to q.k or to any product over D, and the scale is explicit).
# 256 is left out: the double backward's key-side program would hold six
# [block, 256] tiles plus two float32 accumulators, beyond one SM's registers.
NATIVE_HEAD_DIMS = (16, 32, 64, 128)
MAX_HEAD_DIM = NATIVE_HEAD_DIMS[-1]

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def interpret_mode():
    """True where the kernels run through the Pallas interpreter (no GPU)."""
    return jax.default_backend() == "cpu"


def padded_head_dim(d):
    return next(n for n in NATIVE_HEAD_DIMS if n >= d)


def round_up(n, multiple):
    return -(-n // multiple) * multiple


def pad_tokens(x, length, axis=1):
    """Zero-pad axis `axis` of x to `length` (no copy when it already fits)."""
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def pad_head(x, d_padded):
    extra = d_padded - x.shape[-1]
    if extra == 0:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


def prepare(x, length, d_padded):
    """[B, T, H, D] -> [B, length, H, d_padded], zero-padded where needed."""
    return pad_head(pad_tokens(x, length), d_padded)


def unpad(x, length, d):
    return x[:, :length, :, :d]


def dot(a, b):
    """a @ b with float32 accumulation."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


def dot_nt(a, b):
    """a @ b.T with float32 accumulation."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)


def dot_tn(a, b):
    """a.T @ b with float32 accumulation."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


def tile_mask(q_start, k_start, block_q, block_k, *, causal, tk):
    """Which (query, key) pairs of a tile are visible, or None for all of them.

    `tk` is the unpadded key length when the tile may hold padded keys, else None.
    Padded query rows need no mask: their zero inputs contribute exactly zero.
    Causal is top-left aligned: query i sees keys j <= i.
    """
    if not causal and tk is None:
        return None
    rows = q_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
    cols = k_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    if causal and tk is not None:
        return jnp.logical_and(rows >= cols, cols < tk)
    return rows >= cols if causal else cols < tk


def _i32(x):
    # Index arithmetic stays int32 even when jax_enable_x64 promotes Python ints.
    return jnp.asarray(x, jnp.int32)


def _div(a, b):
    return jax.lax.div(_i32(a), _i32(b))


def split_loop(lo, hi, plain_lo, plain_hi, body, carry):
    """fori_loop over [lo, hi) calling body(i, carry, masked).

    Blocks in [plain_lo, plain_hi) need no mask; only the others pay for it
    (on a causal sweep that is the diagonal band, not the whole triangle).
    """
    lo, hi = _i32(lo), _i32(hi)
    a = jnp.clip(_i32(plain_lo), lo, hi)
    b = jnp.clip(_i32(plain_hi), a, hi)
    carry = jax.lax.fori_loop(lo, a, lambda i, c: body(i, c, True), carry)
    carry = jax.lax.fori_loop(a, b, lambda i, c: body(i, c, False), carry)
    return jax.lax.fori_loop(b, hi, lambda i, c: body(i, c, True), carry)


def query_side_loop(q_block, block_q, block_k, num_k_blocks, *, causal, tk, body, carry):
    """Loop a query block over the key blocks it sees; causal blocks past the
    diagonal are skipped, not masked."""
    if not causal and tk is None:
        return jax.lax.fori_loop(0, num_k_blocks, lambda j, c: body(j, c, False), carry)
    q_start = _i32(q_block) * block_q
    hi, plain_hi = _i32(num_k_blocks), _i32(num_k_blocks)
    if causal:
        hi = jnp.minimum(_div(q_start + (block_q + block_k - 1), block_k), hi)
        plain_hi = _div(q_start + 1, block_k)
    if tk is not None:
        plain_hi = jnp.minimum(plain_hi, _i32(tk // block_k))
    return split_loop(0, hi, 0, plain_hi, body, carry)


def key_side_loop(k_block, block_q, block_k, num_q_blocks, *, causal, body, carry):
    """Loop a key block over the query blocks that see it (causal: from the diagonal on)."""
    if not causal:
        return jax.lax.fori_loop(0, num_q_blocks, lambda i, c: body(i, c, False), carry)
    k_start = _i32(k_block) * block_k
    lo = _div(k_start, block_q)
    plain_lo = _div(k_start + (block_k - 1 + block_q - 1), block_q)
    return split_loop(lo, num_q_blocks, plain_lo, num_q_blocks, body, carry)


def probabilities(q, k, lse2, mask, scale):
    """P = exp(s q k^T - lse) for one tile, exactly 0 where masked.

    `lse2` is the row log-sum-exp in base 2 ([block_q, 1]); working in base 2
    lets the exponential be a single exp2.
    """
    s2 = dot_nt(q, k) * (scale * LOG2E)
    p = jnp.exp2(s2 - lse2)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    return p


def compiler_params(config):
    if interpret_mode() or plgpu is None:
        return None
    return plgpu.CompilerParams(num_warps=config["num_warps"], num_stages=config["num_stages"])


def call(kernel, *, grid, in_specs, out_specs, out_shape, config, name):
    """pl.pallas_call with the Triton parameters on a GPU, interpreted on a CPU."""
    kwargs = {}
    params = compiler_params(config)
    if params is not None:
        kwargs["compiler_params"] = params
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=interpret_mode(), name=name,
                          **kwargs)


def row_tile(block, d):
    """BlockSpec of one head's [block, d] tile of a [B, T, H, d] array; grid (i, b, h)."""
    return pl.BlockSpec((None, block, None, d), lambda i, b, h: (b, i, h, 0))


def whole_head(length, d):
    """BlockSpec of one head's full [length, d] slab; the kernel slices it itself."""
    return pl.BlockSpec((None, length, None, d), lambda i, b, h: (b, 0, h, 0))


def row_stat_tile(block):
    """BlockSpec of a [block] piece of a [B, H, T] row statistic; grid (i, b, h)."""
    return pl.BlockSpec((None, None, block), lambda i, b, h: (b, h, i))


def whole_row_stat(length):
    return pl.BlockSpec((None, None, length), lambda i, b, h: (b, h, 0))
