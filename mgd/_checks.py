"""Input validation for the attention op: every error names the argument."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)


def _dtype_name(x):
    return np.dtype(x.dtype).name


def check_qkv(q, k, v):
    """Shapes [B, Tq, H, D] and [B, Tk, H, D], one floating dtype for all three."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
        if len(x.shape) != 4:
            raise ValueError(
                f"{name} must have rank 4 [batch, seq, heads, head_dim], got shape {tuple(x.shape)}")
        if not any(np.dtype(x.dtype) == np.dtype(d) for d in FLOAT_DTYPES):
            raise TypeError(
                f"{name} must be float32, bfloat16, float16 or float64, got {_dtype_name(x)}")
    if not (np.dtype(q.dtype) == np.dtype(k.dtype) == np.dtype(v.dtype)):
        raise TypeError(
            f"q, k and v must share one dtype, got q={_dtype_name(q)}, "
            f"k={_dtype_name(k)}, v={_dtype_name(v)}")
    b, tq, h, d = q.shape
    if k.shape[0] != b or k.shape[2] != h or k.shape[3] != d:
        raise ValueError(
            f"k must be [batch={b}, seq, heads={h}, head_dim={d}] to match q, got {k.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k={k.shape}, v={v.shape}")
    if tq == 0 or k.shape[1] == 0:
        raise ValueError(f"sequence lengths must be positive, got q: {tq}, k: {k.shape[1]}")
    if d == 0:
        raise ValueError("head_dim (last axis of q) must be positive")


def check_like(name, x, like):
    """A cotangent or saved tensor must match the tensor it belongs to."""
    if tuple(x.shape) != tuple(like.shape):
        raise ValueError(f"{name} must have shape {tuple(like.shape)}, got {tuple(x.shape)}")
    if np.dtype(x.dtype) != np.dtype(like.dtype):
        raise TypeError(f"{name} must have dtype {_dtype_name(like)}, got {_dtype_name(x)}")


def check_lse(lse, q):
    b, tq, h, _ = q.shape
    if tuple(lse.shape) != (b, h, tq):
        raise ValueError(f"lse must have shape [batch, heads, seq_q] = {(b, h, tq)}, got {tuple(lse.shape)}")
    if np.dtype(lse.dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"lse must be float32, got {_dtype_name(lse)}")


def resolve_scale(scale, head_dim):
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"scale must be a positive Python float or None, got {scale!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"scale must be a finite positive number, got {scale!r}")
    return value


def check_causal(causal):
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    return bool(causal)
