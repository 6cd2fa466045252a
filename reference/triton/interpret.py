"""Run the kernels on NumPy arrays with Triton's CPU interpreter.

For tests on machines without a GPU. Needs TRITON_INTERPRET=1 in the
environment before `kernels` is first imported (Triton decides at decoration
time whether a kernel is compiled or interpreted), and no torch: the
interpreter is handed thin wrappers that expose a NumPy array the way it
expects a tensor. Interpreted kernels are slow; keep problems small.
"""
from __future__ import annotations

import numpy as np

from mgd.reference.triton import configs, primitives


def _patch_interpreter_index():
    """Triton 3.6's interpreter turns scalar tensors into ints with int() of a
    one-element 1-d array, which NumPy >= 2.4 rejects; loop bounds computed in
    a kernel hit this. Read the element instead."""
    from triton.runtime import interpreter

    if getattr(interpreter, "_mgd_index_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__",
                       lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._mgd_index_patched = True


# How the interpreter names element types (Triton's short names).
_TRITON_TYPES = {"float16": "fp16", "float32": "fp32", "bfloat16": "bf16"}


class _Storage:
    def __init__(self, owner):
        self.owner = owner

    def data_ptr(self):
        return self.owner.array.ctypes.data

    def cpu(self):
        return self  # the "device" is the host already

    def copy_(self, other):
        pass  # the kernel wrote into the same host memory


class _HostTensor:
    """Just enough of a tensor for triton.runtime.interpreter."""

    def __init__(self, array):
        self.array = array
        self.dtype = _TRITON_TYPES[np.dtype(array.dtype).name]

    def data_ptr(self):
        return self.array.ctypes.data

    def untyped_storage(self):
        return _Storage(self)

    def new_empty(self, *args, **kwargs):
        return _HostTensor(self.array)

    def set_(self, storage, *args):
        self.array = storage.owner.array
        return self

    def storage_offset(self):
        return 0

    def size(self):
        return self.array.shape

    def stride(self):
        return tuple(s // self.array.itemsize for s in self.array.strides)


def _host_arg(a):
    if isinstance(a, np.ndarray):
        return _HostTensor(np.ascontiguousarray(a))
    if isinstance(a, np.floating):
        return float(a)
    if isinstance(a, int) and not isinstance(a, bool) and a == 1:
        # jax-triton compiles integer arguments equal to 1 as constants; do the
        # same so those code paths (T=1, H=1) are exercised here too.
        import triton.language as tl

        return tl.constexpr(1)
    return a


def launch(kernel, args, outs, grid, config, **constexprs):
    # Poisoned outputs: an element the kernel fails to write shows up as NaN.
    _patch_interpreter_index()
    results = [np.full(shape, np.nan, dtype=dtype) for shape, dtype in outs]
    kernel[grid](*map(_host_arg, args), *map(_HostTensor, results), **config.meta(), **constexprs)
    return tuple(results)


class _Fixed:
    """One config for every kernel: small tiles make tiny problems span several."""

    def __init__(self, config):
        self.config = config

    def lookup(self, *args):
        return self.config


def _table(block_m, block_n):
    return _Fixed(configs.Config(block_m, block_n, 4, 1))


def forward(q, k, v, *, causal, scale, block_m=16, block_n=16):
    return primitives.forward(launch, q, k, v, causal=causal, scale=scale,
                              table=_table(block_m, block_n))


def backward(q, k, v, o, lse, do, dlse=None, *, causal, scale, block_m=16, block_n=16):
    if dlse is None:
        dlse = np.zeros(lse.shape, np.float32)
    return primitives.backward(launch, q, k, v, o, np.asarray(lse, np.float32), do,
                               np.asarray(dlse, np.float32), causal=causal, scale=scale,
                               table=_table(block_m, block_n))


def double_backward(q, k, v, o, lse, do, ddq, ddk, ddv, *, causal, scale, block_m=16, block_n=16):
    return primitives.double_backward(launch, q, k, v, o, np.asarray(lse, np.float32), do, ddq, ddk,
                                      ddv, causal=causal, scale=scale,
                                      table=_table(block_m, block_n))
