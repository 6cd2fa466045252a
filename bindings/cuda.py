"""The CUDA backend: the Hopper attention kernels (kernels/) through XLA FFI.

The forward (with log-sum-exp), the backward and the double backward run the CUDA
kernels of this package. A stage the built library lacks is delegated to the first
reference backend of `mgd.backends.AUTO_ORDER_GPU` that can serve the inputs here
(Pallas, then Triton, then naive XLA).

Switches, read at call time:
  MGD_CUDA_DELEGATE=forward,backward    (comma list) forces the delegate for the named
      stages, to compare both in one process;
  MGD_CUDA_DETERMINISTIC=0|1    the backward's `deterministic` default (keyword
      `deterministic=` of `backward` overrides it): 1 runs the split form (dQ in its
      own query-major pass, bitwise repeatable), 0 the fused form (dQ reduced in fp32
      by atomics inside the key-major kernel, one pass fewer, last bits vary);
  MGD_CUDA_SPLIT_CALLS=0    issues the double backward as one custom call and leaves the
      forward's and backward's outputs unfenced; by default (1) it is three custom calls
      (XLA drops the parts whose outputs go unused) and the outputs sit behind an
      optimization barrier (XLA's GPU compiler otherwise may compute a forward twice).

Read once per process by the library: MGD_BWD_BULK_REDUCE=0 makes the fused form add
its dQ partials with per-thread red.global instead of one bulk reduce per tile;
MGD_BWD_D64_BLOCKS=128x128 (default), 64x64, 128x64, 64x128 or lean128 picks the block
variant of the bf16 head_dim-64 backward (key-major query block x query-major key block;
lean128: 128x128 with dS from P's bf16 copy and the fused mode on 128-query blocks); all
but the default need a library built with -DMGD_BWD_D64_VARIANTS=ON, else the call fails.

The shared library libmgd_cuda.so is built by CMake (kernels/CMakeLists.txt) and
installed next to this file; its FFI targets are registered with JAX on first use.
"""
from __future__ import annotations

import ctypes
import functools
import importlib
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mgd import devices

NAME = "cuda"
# The double backward's three parts (sweep 1: gdo and row statistics; sweep 2: gk, gv;
# sweep 3: gq) are separate custom calls, so that XLA drops the parts a program leaves unused.
DOUBLE_BACKWARD_TARGETS = {
    "all": ("mgd_attention_double_backward", "MgdAttentionDoubleBackward"),
    "rows": ("mgd_attention_double_backward_rows", "MgdAttentionDoubleBackwardRows"),
    "kv": ("mgd_attention_double_backward_kv", "MgdAttentionDoubleBackwardKV"),
    "q": ("mgd_attention_double_backward_q", "MgdAttentionDoubleBackwardQ"),
}
BACKWARD_TARGET = "mgd_attention_backward"
FORWARD_TARGET = "mgd_attention_forward"
DELEGATE_ENV = "MGD_CUDA_DELEGATE"
LIBRARY = "libmgd_cuda.so"
HEAD_DIMS = (64, 128)
DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


def _library_candidates():
    env = os.environ.get("MGD_CUDA_LIBRARY")
    if env:
        yield env
    here = os.path.dirname(os.path.abspath(__file__))
    yield os.path.join(here, LIBRARY)
    # Editable installs keep the CMake-installed library outside the source tree.
    package = sys.modules.get(__package__) if __package__ else None
    for path in getattr(package, "__path__", []) or []:
        yield os.path.join(str(path), LIBRARY)
    try:
        from importlib import resources
        yield str(resources.files(__package__ or "mgd.bindings").joinpath(LIBRARY))
    except Exception:  # noqa: BLE001 - any failure just means no candidate here
        pass
    import sysconfig
    for key in ("platlib", "purelib"):
        yield os.path.join(sysconfig.get_paths()[key], "mgd", "bindings", LIBRARY)


@functools.cache
def _load():
    """(library, None) once the FFI target is registered, else (None, reason)."""
    tried = []
    for path in _library_candidates():
        if path in tried:
            continue
        tried.append(path)
        if os.path.isfile(path):
            try:
                lib = ctypes.CDLL(path)
            except OSError as err:
                return None, f"{path} cannot be loaded: {err}"
            lib.MgdDoubleBackwardWorkspaceBytes.restype = ctypes.c_size_t
            lib.MgdDoubleBackwardWorkspaceBytes.argtypes = [ctypes.c_int] * 3
            for target, symbol in DOUBLE_BACKWARD_TARGETS.values():
                jax.ffi.register_ffi_target(
                    target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="CUDA")
            if hasattr(lib, "MgdAttentionForward"):
                jax.ffi.register_ffi_target(
                    FORWARD_TARGET, jax.ffi.pycapsule(lib.MgdAttentionForward), platform="CUDA")
            if hasattr(lib, "MgdAttentionBackward"):
                lib.MgdBackwardWorkspaceBytes.restype = ctypes.c_size_t
                lib.MgdBackwardWorkspaceBytes.argtypes = [ctypes.c_int] * 5
                jax.ffi.register_ffi_target(
                    BACKWARD_TARGET, jax.ffi.pycapsule(lib.MgdAttentionBackward), platform="CUDA")
            return lib, None
    return None, ("the CUDA extension (libmgd_cuda.so) is not built: it needs nvcc >= 12.8 at "
                  "install time (pip install . on a machine with CUDA); looked in "
                  + ", ".join(tried))


def _gpu_reason():
    reason = devices.gpu_unavailable_reason()
    if reason is not None:
        return reason
    gpus = devices.gpus()
    kind = getattr(gpus[0], "compute_capability", None)
    if kind is not None and str(kind) not in ("9.0",):
        return f"needs a Hopper GPU (compute capability 9.0), found {kind} ({gpus[0].device_kind})"
    if kind is None and "H100" not in gpus[0].device_kind and "H200" not in gpus[0].device_kind \
            and "H800" not in gpus[0].device_kind and "GH200" not in gpus[0].device_kind:
        return f"needs a Hopper GPU (H100/H200), found {gpus[0].device_kind}"
    return None


def unavailable_reason(q, k, v, *, causal):
    """None if the kernel can serve these inputs here, else why not."""
    dtype = np.dtype(q.dtype)
    if dtype not in DTYPES:
        return f"dtype must be bfloat16 or float16, got {dtype.name}"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head_dim must be 64 or 128, got {q.shape[-1]}"
    if tuple(k.shape) != tuple(q.shape) or tuple(v.shape) != tuple(q.shape):
        return (f"query and key lengths must be equal (self-attention), got q {tuple(q.shape)}, "
                f"k {tuple(k.shape)}")
    reason = _gpu_reason()
    if reason is not None:
        return reason
    _, reason = _load()
    return reason


def _require():
    lib, reason = _load()
    if lib is None:
        from mgd.backends import BackendUnavailable
        raise BackendUnavailable(f"impl='cuda': {reason}")
    return lib


def _nvtx_range(name):
    """An NVTX range around the Python-side call, if the nvtx package is installed."""
    try:
        nvtx = importlib.import_module("nvtx")
    except ImportError:
        import contextlib
        return contextlib.nullcontext()
    return nvtx.annotate(name, color="green")


def double_backward(q, k, v, o, lse, do, ddq, ddk, ddv, *, causal, scale):
    """Cotangents (gq, gk, gv, gdo) of (q, k, v, do): three fused sweeps on Hopper, in one
    custom call, or (split_calls()) each in its own, so that gk and gv, or gq, are not
    computed where nothing uses them."""
    lib = _require()
    *lead, t, h, d = q.shape
    batch = int(np.prod(lead)) if lead else 1
    workspace = int(lib.MgdDoubleBackwardWorkspaceBytes(batch, t, h))
    like = jax.ShapeDtypeStruct(q.shape, q.dtype)
    inputs = (q, k, v, o, do, ddq, ddk, ddv, lse.astype(jnp.float32))
    attrs = {"causal": np.int32(bool(causal)), "scale": np.float32(scale)}

    def part(name, outs):
        return jax.ffi.ffi_call(DOUBLE_BACKWARD_TARGETS[name][0], outs, vmap_method="broadcast_all")

    with _nvtx_range(f"mgd.cuda.double_backward B={batch} T={t} H={h} D={d}"):
        if not split_calls():
            gq, gk, gv, gdo, _ = part("all", (like, like, like, like,
                                              jax.ShapeDtypeStruct((workspace,), jnp.uint8)))(
                *inputs, **attrs)
            return gq, gk, gv, gdo
        gdo, stats = part("rows", (like, jax.ShapeDtypeStruct((workspace,), jnp.uint8)))(
            *inputs, **attrs)
        gk, gv = part("kv", (like, like))(*inputs, stats, **attrs)
        gq = part("q", like)(*inputs, stats, **attrs)
    return gq, gk, gv, gdo


def _delegate_for(q, k, v, causal):
    """The backend that serves forward and backward on this path: the first other
    backend of `mgd.backends.AUTO_ORDER_GPU` (the measured order) that can serve."""
    from mgd import backends
    for name in backends.AUTO_ORDER_GPU:
        if name == NAME:
            continue
        try:
            module = backends.load(name)
        except backends.BackendUnavailable:
            continue
        if module.unavailable_reason(q, k, v, causal=causal) is None:
            return module
    return importlib.import_module("mgd.reference.xla")


def delegated_stages():
    """Stages forced onto the delegate by MGD_CUDA_DELEGATE (read at call time)."""
    raw = os.environ.get(DELEGATE_ENV, "")
    return {part.strip() for part in raw.split(",") if part.strip()}


def _kernel_reason(stage, symbol, q, k, v, causal):
    """None if our kernel for `stage` serves these inputs here (the library exports
    `symbol` and MGD_CUDA_DELEGATE does not name the stage), else why the delegate runs it."""
    if stage in delegated_stages():
        return f"{DELEGATE_ENV} names {stage}"
    reason = unavailable_reason(q, k, v, causal=causal)
    if reason is not None:
        return reason
    lib, _ = _load()
    if not hasattr(lib, symbol):
        return f"the CUDA library was built without the {stage} kernel"
    return None


def forward_kernel_reason(q, k, v, *, causal):
    """None if our forward kernel serves these inputs here, else why the delegate runs it."""
    return _kernel_reason("forward", "MgdAttentionForward", q, k, v, causal)


def split_calls():
    """The double backward in droppable parts, outputs fenced (MGD_CUDA_SPLIT_CALLS=0: not)."""
    return os.environ.get("MGD_CUDA_SPLIT_CALLS", "1").strip() != "0"


def _fenced(outputs):
    """The outputs behind an optimization barrier when split_calls() is on.

    XLA's GPU compiler may fuse a custom call with a dynamic-update-slice of its result
    (storing a scan's residuals in place) by cloning the call into the fusion, so that a
    result with other users is computed twice; behind the barrier the pattern does not match."""
    return jax.lax.optimization_barrier(outputs) if split_calls() else outputs


def kernel_forward(q, k, v, *, causal, scale):
    """(o, lse [..., H, T] float32, natural log) from our Hopper forward kernel."""
    _require()
    *lead, t, h, d = q.shape
    batch = int(np.prod(lead)) if lead else 1
    outs = (jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((*lead, h, t), jnp.float32))
    call = jax.ffi.ffi_call(FORWARD_TARGET, outs, vmap_method="broadcast_all")
    with _nvtx_range(f"mgd.cuda.forward B={batch} T={t} H={h} D={d}"):
        return _fenced(call(q, k, v, causal=np.int32(bool(causal)), scale=np.float32(scale)))


def forward(q, k, v, *, causal, scale):
    """(o, lse): our kernel where it serves (see forward_kernel_reason), else the delegate."""
    # The kernel folds scale * log2(e) into one exponent and takes positive scales only.
    if forward_kernel_reason(q, k, v, causal=causal) is None and float(scale) > 0:
        return kernel_forward(q, k, v, causal=causal, scale=scale)
    return _delegate_for(q, k, v, causal).forward(q, k, v, causal=causal, scale=scale)


def deterministic_default():
    """The backward's `deterministic` default, from MGD_CUDA_DETERMINISTIC (on unless "0")."""
    return os.environ.get("MGD_CUDA_DETERMINISTIC", "1").strip() != "0"


def backward_kernel_reason(q, k, v, *, causal):
    """None if our backward kernel serves these inputs here, else why the delegate runs it."""
    return _kernel_reason("backward", "MgdAttentionBackward", q, k, v, causal)


def kernel_backward(q, k, v, o, lse, do, *, causal, scale, dlse=None, deterministic=None):
    """(dq, dk, dv) from our Hopper kernels: preprocess, key-major dK/dV, then either a
    query-major dQ pass (deterministic) or dQ fused into the key-major pass (fp32 atomics)."""
    lib = _require()
    if deterministic is None:
        deterministic = deterministic_default()
    *lead, t, h, d = q.shape
    batch = int(np.prod(lead)) if lead else 1
    workspace = int(lib.MgdBackwardWorkspaceBytes(batch, t, h, d, int(bool(deterministic))))
    like = jax.ShapeDtypeStruct(q.shape, q.dtype)
    outs = (like, like, like, jax.ShapeDtypeStruct((workspace,), jnp.uint8))
    call = jax.ffi.ffi_call(BACKWARD_TARGET, outs, vmap_method="broadcast_all")
    lse = lse.astype(jnp.float32)
    has_dlse = dlse is not None
    dlse = dlse.astype(jnp.float32) if has_dlse else lse  # ignored when has_dlse is 0
    with _nvtx_range(f"mgd.cuda.backward B={batch} T={t} H={h} D={d}"):
        dq, dk, dv, _ = call(q, k, v, o, do, lse, dlse, causal=np.int32(bool(causal)),
                             has_dlse=np.int32(has_dlse),
                             deterministic=np.int32(bool(deterministic)),
                             scale=np.float32(scale))
    return _fenced((dq, dk, dv))


def backward(q, k, v, o, lse, do, *, causal, scale, dlse=None, deterministic=None):
    """(dq, dk, dv): our kernel where it serves (see backward_kernel_reason), else the
    delegate reference backend."""
    if backward_kernel_reason(q, k, v, causal=causal) is None:
        return kernel_backward(q, k, v, o, lse, do, causal=causal, scale=scale, dlse=dlse,
                               deterministic=deterministic)
    return _delegate_for(q, k, v, causal).backward(q, k, v, o, lse, do, causal=causal,
                                                    scale=scale, dlse=dlse)
