"""The public attention op and its three primitives, differentiable to second order.

The nesting follows docs/attention-math.md ("the JAX nesting trap"):

    attention            custom_vjp; its forward rule binds `_forward_pair`,
                         itself differentiable, so O keeps depending on q, k, v
                         when the backward rule is differentiated again. Its
                         residuals o and lse carry `RESIDUAL_NAMES`, so a remat
                         policy can keep them and rerun no forward kernel.
    _forward_pair        custom_vjp (o, lse); backward = backend.backward.
    _backward            custom_vjp (dq, dk, dv) of (q, k, v, do); its backward is
                         backend.double_backward. The saved o and lse are caches
                         of functions of q, k, v whose dependence the double
                         backward formula already carries, so their cotangents
                         are zero.

`impl="xla"` is the naive baseline: the plain function, differentiated by JAX
with no custom rules at all.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mgd import _checks, backends
from mgd.reference import xla as _xla

__all__ = ["attention", "attention_forward", "attention_backward", "attention_double_backward",
           "RESIDUAL_NAMES"]

# Names of attention's residuals (o, lse) for `jax.checkpoint_policies.save_only_these_names`.
RESIDUAL_NAMES = ("attention_o", "attention_lse")


def _backend(impl):
    return backends.load(impl)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _forward_pair(q, k, v, causal, scale, impl):
    return _backend(impl).forward(q, k, v, causal=causal, scale=scale)


def _forward_pair_fwd(q, k, v, causal, scale, impl):
    o, lse = _forward_pair(q, k, v, causal, scale, impl)
    return (o, lse), (q, k, v, o, lse)


def _forward_pair_bwd(causal, scale, impl, res, cotangents):
    q, k, v, o, lse = res
    do, dlse = cotangents
    return _backend(impl).backward(q, k, v, o, lse, do, causal=causal, scale=scale, dlse=dlse)


_forward_pair.defvjp(_forward_pair_fwd, _forward_pair_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _backward(q, k, v, do, o, lse, causal, scale, impl):
    return _backend(impl).backward(q, k, v, o, lse, do, causal=causal, scale=scale)


def _backward_fwd(q, k, v, do, o, lse, causal, scale, impl):
    grads = _backward(q, k, v, do, o, lse, causal, scale, impl)
    return grads, (q, k, v, do, o, lse)


def _backward_bwd(causal, scale, impl, res, cotangents):
    q, k, v, do, o, lse = res
    ddq, ddk, ddv = cotangents
    gq, gk, gv, gdo = _backend(impl).double_backward(
        q, k, v, o, lse, do, ddq, ddk, ddv, causal=causal, scale=scale)
    return gq, gk, gv, gdo, jnp.zeros_like(o), jnp.zeros_like(lse)


_backward.defvjp(_backward_fwd, _backward_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention(q, k, v, causal, scale, impl):
    return _forward_pair(q, k, v, causal, scale, impl)[0]


def _attention_fwd(q, k, v, causal, scale, impl):
    o, lse = _forward_pair(q, k, v, causal, scale, impl)
    o, lse = checkpoint_name(o, RESIDUAL_NAMES[0]), checkpoint_name(lse, RESIDUAL_NAMES[1])
    return o, (q, k, v, o, lse)


def _attention_bwd(causal, scale, impl, res, do):
    q, k, v, o, lse = res
    return _backward(q, k, v, do, o, lse, causal, scale, impl)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _prepare(q, k, v, causal, scale, impl):
    _checks.check_qkv(q, k, v)
    causal = _checks.check_causal(causal)
    scale = _checks.resolve_scale(scale, q.shape[-1])
    if not isinstance(impl, str):
        raise TypeError(f"impl must be a string, got {impl!r}")
    name = backends.resolve(impl, q, k, v, causal=causal).NAME
    return causal, scale, name


def attention(q, k, v, *, causal=True, scale=None, impl="auto"):
    """Softmax attention on [batch, seq, heads, head_dim] arrays.

    Args:
      q: queries [B, Tq, H, D]; k, v: keys and values [B, Tk, H, D], one dtype.
      causal: query i attends to keys j <= i.
      scale: logit scale, 1/sqrt(D) when None.
      impl: "xla", "pallas", "triton", "cuda", or "auto" (the fastest that can serve).

    Returns the output [B, Tq, H, D] in the input dtype. Works under jit and vmap;
    jax.grad and grad-of-grad (reverse-over-reverse Hessian-vector products) run
    through the chosen backend's backward and double backward.
    """
    causal, scale, name = _prepare(q, k, v, causal, scale, impl)
    if name == "xla":
        return _xla.attention(q, k, v, causal=causal, scale=scale)
    return _attention(q, k, v, causal, scale, name)


def attention_forward(q, k, v, *, causal=True, scale=None, impl="auto"):
    """(o, lse): the output and float32 row log-sum-exp [B, H, Tq]. Differentiable."""
    causal, scale, name = _prepare(q, k, v, causal, scale, impl)
    return _forward_pair(q, k, v, causal, scale, name)


def attention_backward(q, k, v, o, lse, do, *, causal=True, scale=None, impl="auto"):
    """(dq, dk, dv) for the output cotangent `do`, given the forward's o and lse.

    Differentiable in (q, k, v, do): its VJP is the double backward.
    """
    causal, scale, name = _prepare(q, k, v, causal, scale, impl)
    _checks.check_like("o", o, q)
    _checks.check_like("do", do, q)
    _checks.check_lse(lse, q)
    return _backward(q, k, v, do, o, lse, causal, scale, name)


def attention_double_backward(q, k, v, o, lse, do, ddq, ddk, ddv, *, causal=True, scale=None,
                              impl="auto"):
    """Cotangents of (q, k, v, do) given cotangents (ddq, ddk, ddv) of (dq, dk, dv)."""
    causal, scale, name = _prepare(q, k, v, causal, scale, impl)
    for arg, like, label in ((o, q, "o"), (do, q, "do"), (ddq, q, "ddq"), (ddk, k, "ddk"),
                             (ddv, v, "ddv")):
        _checks.check_like(label, arg, like)
    _checks.check_lse(lse, q)
    return _backend(name).double_backward(q, k, v, o, lse, do, ddq, ddk, ddv,
                                          causal=causal, scale=scale)
