"""The attention backends behind `mgd.attention`, and how `impl="auto"` picks one.

A backend is a module with the same four functions (see `reference/xla.py`):

    forward(q, k, v, *, causal, scale)                          -> (o, lse)
    backward(q, k, v, o, lse, do, *, causal, scale, dlse=None)   -> (dq, dk, dv)
    double_backward(q, k, v, o, lse, do, ddq, ddk, ddv, *, causal, scale)
                                                                 -> (gq, gk, gv, gdo)
    unavailable_reason(q, k, v, *, causal) -> None, or why it cannot serve

Modules are imported lazily: a machine without Triton or the CUDA extension
can still use the others.
"""
from __future__ import annotations

import importlib
import warnings

import jax

MODULES = {
    "xla": "mgd.reference.xla",
    "pallas": "mgd.reference.pallas",
    "triton": "mgd.reference.triton",
    "cuda": "mgd.bindings.cuda",
}

# `auto` on a GPU tries these in order, fastest first as measured on an H200 (bf16,
# causal; see docs/results.md): the CUDA double backward leads; Pallas and Triton trade
# places by stage and head dim, and Pallas leads the backward and double backward at
# D=128. The CUDA backend's own forward and backward delegate along this order too.
AUTO_ORDER_GPU = ("cuda", "pallas", "triton", "xla")
# On a CPU the kernels only run interpreted, which is far slower than XLA.
AUTO_ORDER_CPU = ("xla",)


class BackendUnavailable(RuntimeError):
    """Raised when the requested `impl` cannot run these inputs here."""


_warned: set[str] = set()


def _warn_once(message):
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def load(name):
    if name not in MODULES:
        raise ValueError(f"impl must be one of {sorted(MODULES) + ['auto']}, got {name!r}")
    try:
        return importlib.import_module(MODULES[name])
    except ImportError as err:
        raise BackendUnavailable(f"impl={name!r} cannot be imported: {err}") from err


def unavailable_reason(name, q, k, v, *, causal):
    try:
        module = load(name)
    except BackendUnavailable as err:
        return str(err)
    return module.unavailable_reason(q, k, v, causal=causal)


def resolve(impl, q, k, v, *, causal):
    """The backend module for `impl`, raising BackendUnavailable with the reason."""
    if impl != "auto":
        reason = unavailable_reason(impl, q, k, v, causal=causal)
        if reason is not None:
            raise BackendUnavailable(f"impl={impl!r} cannot serve this call: {reason}")
        return load(impl)
    order = AUTO_ORDER_CPU if jax.default_backend() == "cpu" else AUTO_ORDER_GPU
    for name in order:
        reason = unavailable_reason(name, q, k, v, causal=causal)
        if reason is None:
            return load(name)
        if name != order[-1]:
            _warn_once(f"mgd.attention(impl='auto'): skipping {name!r}: {reason}")
    raise BackendUnavailable("no attention backend can serve this call")


def available(q, k, v, *, causal=True):
    """Names of the backends that can serve these inputs on this machine."""
    return [n for n in MODULES if unavailable_reason(n, q, k, v, causal=causal) is None]
