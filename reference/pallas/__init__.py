"""Pallas attention backend: fused forward, backward and double backward kernels.

On a GPU the kernels go through Pallas's Triton lowering; on a CPU the same
kernel code runs under the Pallas interpreter (slow, for tests). The functions
below are plain kernels; differentiability comes from `mgd.op`.

Every function takes an optional `configs` mapping kernel name -> partial config
({"block_q", "block_k", "num_warps", "num_stages"}) that overrides the tuned
table in configs.json (see `configs.py`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import _common as c
from . import configs as _configs
from .backward_kernels import padded_backward
from .double_backward_kernels import padded_double_backward
from .forward_kernel import padded_forward

NAME = "pallas"

_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def unavailable_reason(q, k, v, *, causal):
    del causal  # both masks run everywhere
    if not (c.interpret_mode() or _on_nvidia_gpu()):
        return (f"Pallas kernels need an NVIDIA GPU (Triton lowering) or the CPU interpreter; "
                f"this is a {jax.default_backend()} backend")
    if q.dtype not in _SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported (float32, bfloat16, float16)"
    d = q.shape[-1]
    if d > c.MAX_HEAD_DIM:
        return f"head dim {d} is larger than the kernels' largest tile ({c.MAX_HEAD_DIM})"
    return None


def _on_nvidia_gpu():
    if jax.default_backend() != "gpu" or c.plgpu is None:
        return False
    device = jax.devices()[0]
    version = str(getattr(device.client, "platform_version", "")).lower()
    return "cuda" in version or "nvidia" in device.device_kind.lower()


class _Plan:
    """Tile configs for the kernels of one call, and the padded extents they need."""

    def __init__(self, kernels, q, k, causal, overrides):
        self.tq, self.tk, self.d = q.shape[1], k.shape[1], q.shape[-1]
        self.dp = c.padded_head_dim(self.d)
        t = max(self.tq, self.tk)
        interpret = c.interpret_mode()
        self.configs = [
            _configs.fit_blocks(
                _configs.lookup(name, self.dp, causal, t, interpret=interpret, overrides=overrides),
                self.tq, self.tk)
            for name in kernels]
        # Blocks are powers of two, so the largest is a multiple of all of them.
        self.tq_pad = c.round_up(self.tq, max(cfg["block_q"] for cfg in self.configs))
        self.tk_pad = c.round_up(self.tk, max(cfg["block_k"] for cfg in self.configs))

    def static(self, i):
        return tuple(sorted(self.configs[i].items()))

    def rows(self, *xs):
        return [c.prepare(x, self.tq_pad, self.dp) for x in xs]

    def keys(self, *xs):
        return [c.prepare(x, self.tk_pad, self.dp) for x in xs]

    def stat(self, x):
        # Padded rows get lse 0: finite, and harmless since their inputs are zero.
        return c.pad_tokens(x.astype(jnp.float32), self.tq_pad, axis=2)


def _check_head_dim(q):
    if q.shape[-1] > c.MAX_HEAD_DIM:
        raise ValueError(f"q: head dim {q.shape[-1]} is larger than the Pallas kernels' largest "
                         f"supported head dim, {c.MAX_HEAD_DIM}")


def forward(q, k, v, *, causal, scale, configs=None):
    _check_head_dim(q)
    plan = _Plan(("forward",), q, k, causal, configs)
    (qp,), (kp, vp) = plan.rows(q), plan.keys(k, v)
    o, lse = padded_forward(qp, kp, vp, causal=causal, scale=float(scale), tk=plan.tk,
                            config=plan.static(0))
    return c.unpad(o, plan.tq, plan.d), lse[:, :, :plan.tq]


def backward(q, k, v, o, lse, do, *, causal, scale, dlse=None, configs=None):
    _check_head_dim(q)
    plan = _Plan(("backward_dkdv", "backward_dq"), q, k, causal, configs)
    qp, op, dop = plan.rows(q, o, do)
    kp, vp = plan.keys(k, v)
    dlse = None if dlse is None else plan.stat(dlse)
    dq, dk, dv = padded_backward(qp, kp, vp, op, plan.stat(lse), dop, dlse, causal=causal,
                                 scale=float(scale), tk=plan.tk,
                                 dkdv_config=plan.static(0), dq_config=plan.static(1))
    return (c.unpad(dq, plan.tq, plan.d), c.unpad(dk, plan.tk, plan.d),
            c.unpad(dv, plan.tk, plan.d))


def double_backward(q, k, v, o, lse, do, ddq, ddk, ddv, *, causal, scale, configs=None):
    _check_head_dim(q)
    plan = _Plan(("double_backward_rows", "double_backward_q", "double_backward_kv"),
                 q, k, causal, configs)
    qp, op, dop, ddqp = plan.rows(q, o, do, ddq)
    kp, vp, ddkp, ddvp = plan.keys(k, v, ddk, ddv)
    gq, gk, gv, gdo = padded_double_backward(
        qp, kp, vp, op, plan.stat(lse), dop, ddqp, ddkp, ddvp, causal=causal,
        scale=float(scale), tk=plan.tk, rows_config=plan.static(0), q_config=plan.static(1),
        kv_config=plan.static(2))
    return (c.unpad(gq, plan.tq, plan.d), c.unpad(gk, plan.tk, plan.d),
            c.unpad(gv, plan.tk, plan.d), c.unpad(gdo, plan.tq, plan.d))
