"""Closed-form float64 attention: forward, backward and double backward.

Written out from the contract in docs/attention-math.md with NumPy, not
derived by autodiff, so it is an independent check on every backend (JAX's
own autodiff included). Shapes follow the public op: q [B, Tq, H, D],
k and v [B, Tk, H, D]; row statistics [B, H, Tq].
"""
from __future__ import annotations

import numpy as np

__all__ = ["forward", "backward", "double_backward"]


def _heads_first(x):
    # [B, T, H, D] -> [B, H, T, D] so the matrix products below read like the contract.
    return np.swapaxes(np.asarray(x, dtype=np.float64), 1, 2)


def _tokens_first(x):
    return np.swapaxes(x, 1, 2)


def _probabilities(q, k, causal, scale):
    s = scale * q @ np.swapaxes(k, -1, -2)
    if causal:
        tq, tk = s.shape[-2:]
        s = np.where(np.tril(np.ones((tq, tk), dtype=bool)), s, -np.inf)
    lse = np.logaddexp.reduce(s, axis=-1)
    return np.exp(s - lse[..., None]), lse


def _scale(scale, d):
    return 1.0 / np.sqrt(d) if scale is None else float(scale)


def forward(q, k, v, *, causal=True, scale=None):
    """Returns (o [B,Tq,H,D], lse [B,H,Tq]) in float64."""
    q, k, v = map(_heads_first, (q, k, v))
    p, lse = _probabilities(q, k, causal, _scale(scale, q.shape[-1]))
    return _tokens_first(p @ v), lse


def backward(q, k, v, do, *, causal=True, scale=None):
    """Returns (dq, dk, dv) for the cotangent `do` of the output."""
    q, k, v, do = map(_heads_first, (q, k, v, do))
    s = _scale(scale, q.shape[-1])
    p, _ = _probabilities(q, k, causal, s)
    o = p @ v
    dp = do @ np.swapaxes(v, -1, -2)
    delta = np.sum(do * o, axis=-1, keepdims=True)
    ds = s * p * (dp - delta)
    dq = ds @ k
    dk = np.swapaxes(ds, -1, -2) @ q
    dv = np.swapaxes(p, -1, -2) @ do
    return tuple(map(_tokens_first, (dq, dk, dv)))


def double_backward(q, k, v, do, ddq, ddk, ddv, *, causal=True, scale=None):
    """Cotangents of (q, k, v, do) given cotangents (ddq, ddk, ddv) of (dq, dk, dv)."""
    q, k, v, do, ddq, ddk, ddv = map(_heads_first, (q, k, v, do, ddq, ddk, ddv))
    s = _scale(scale, q.shape[-1])
    t = lambda x: np.swapaxes(x, -1, -2)  # noqa: E731
    p, _ = _probabilities(q, k, causal, s)
    o = p @ v
    dp = do @ t(v)
    delta = np.sum(do * o, axis=-1, keepdims=True)
    ds = s * p * (dp - delta)

    dds = s * (ddq @ t(k) + q @ t(ddk))
    dd = np.sum(dds * p, axis=-1, keepdims=True)
    dp_bar = do @ t(ddv) - dp * dd - dds * delta + dp * dds
    ddp = p * (dds - dd)
    b = np.sum(dp_bar * p, axis=-1, keepdims=True)
    ds_bar = s * p * (dp_bar - b)

    gq = ds @ ddk + ds_bar @ k
    gk = t(ds) @ ddq + t(ds_bar) @ q
    gv = t(ddp) @ do
    gdo = p @ ddv + ddp @ v
    return tuple(map(_tokens_first, (gq, gk, gv, gdo)))
