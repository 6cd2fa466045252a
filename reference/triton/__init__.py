"""Attention in Triton kernels called from JAX: forward, backward, double backward.

The backend interface of `mgd.backends` (see `reference/xla.py`). Triton and
jax-triton are imported only when a primitive runs, so `import mgd` works
without them; `unavailable_reason` says what is missing.

Kernels: `kernels.py`; the launch sequence of each primitive: `primitives.py`;
JAX glue (jax-triton, vmap): `jax_calls.py`; tuned tile sizes: `configs.py`
and `configs.json`, written by `python -m mgd.reference.triton.autotune`.
"""
from __future__ import annotations

import functools
import importlib.util

import numpy as np

from mgd.reference.triton.configs import HEAD_DIMS

NAME = "triton"
DTYPES = ("bfloat16", "float16", "float32")


def _gpu_reason():
    import jax

    try:
        device = jax.devices()[0]
    except RuntimeError as err:  # no backend at all
        return f"needs an NVIDIA GPU; JAX found no devices ({err})"
    if device.platform != "gpu":
        return f"needs an NVIDIA GPU; JAX's default devices are {device.platform}"
    if "cuda" not in getattr(device.client, "platform_version", "cuda").lower():
        return f"needs an NVIDIA GPU (CUDA); JAX's GPU is {device.client.platform_version}"
    return None


@functools.cache
def _import_reason():
    """Why the kernels cannot be imported here, or None (checked once)."""
    for module, name in (("triton", "triton"), ("jax_triton", "jax-triton")):
        if importlib.util.find_spec(module) is None:
            return f"{name} is not installed (pip install 'metagrad-distill[triton]')"
    try:
        from mgd.reference.triton import jax_calls  # noqa: F401  (compiles nothing yet)
    except Exception as err:  # noqa: BLE001 - e.g. a jax-triton built for another triton
        return f"the Triton kernels cannot be imported: {type(err).__name__}: {err}"
    return None


def unavailable_reason(q, k, v, *, causal):
    del k, v, causal  # any lengths, causal or not
    reason = _gpu_reason()
    if reason is not None:
        return reason
    reason = _import_reason()
    if reason is not None:
        return reason
    d = q.shape[-1]
    if d not in HEAD_DIMS:
        return f"head_dim {d} is not supported (Triton kernels take {HEAD_DIMS})"
    dtype = np.dtype(q.dtype).name
    if dtype not in DTYPES:
        return f"dtype {dtype} is not supported (Triton kernels take {', '.join(DTYPES)})"
    return None


def _calls():
    from mgd.reference.triton import jax_calls

    return jax_calls


def forward(q, k, v, *, causal, scale):
    return _calls().forward(q, k, v, causal=causal, scale=scale)


def backward(q, k, v, o, lse, do, *, causal, scale, dlse=None):
    return _calls().backward(q, k, v, o, lse, do, causal=causal, scale=scale, dlse=dlse)


def double_backward(q, k, v, o, lse, do, ddq, ddk, ddv, *, causal, scale):
    return _calls().double_backward(q, k, v, o, lse, do, ddq, ddk, ddv, causal=causal, scale=scale)
