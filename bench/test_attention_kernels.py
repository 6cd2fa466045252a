"""Kernel benchmarks: forward, backward, double backward and the full HVP, per
implementation, over the shape grid of bench/grid.py.

    pytest bench -m gpu -k "double_backward and cuda"      # one slice of the GPU grid
    pytest bench -m cpu_subset --benchmark-disable          # the CI smoke subset

Every test is named test_<stage>[<impl>-<shape id>] and grouped by stage and
shape, so pytest-benchmark's table compares implementations side by side.
"""
from __future__ import annotations

import time
import zlib
from functools import cache, partial

import jax
import jax.numpy as jnp
import pytest

import mgd
from bench import grid, harness
from mgd import backends

STAGES = ("forward", "backward", "double_backward", "hvp")


def _params():
    params = [pytest.param(impl, shape, id=f"{impl}-{shape.id}", marks=pytest.mark.gpu)
              for shape in grid.gpu_shapes() for impl in grid.gpu_impls()]
    params += [pytest.param(impl, shape, id=f"{impl}-{shape.id}-cpu",
                            marks=pytest.mark.cpu_subset)
               for impl, shape in grid.CPU_CASES]
    return params


# ------------------------------------------------------------ the functions

def _stage_function(stage, impl, causal):
    if stage == "forward":
        return jax.jit(partial(mgd.attention_forward, causal=causal, impl=impl))
    if stage == "backward":
        return jax.jit(partial(mgd.attention_backward, causal=causal, impl=impl))
    if stage == "double_backward":
        return jax.jit(partial(mgd.attention_double_backward, causal=causal, impl=impl))
    if stage == "hvp":
        return jax.jit(harness.hvp_function(impl, causal))
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


# --------------------------------------------------------------- the inputs

@cache
def _forward(impl, causal):
    # One jitted function per (impl, mask), so the input sets share one compile.
    return jax.jit(partial(mgd.attention_forward, causal=causal, impl=impl))


def _normal(key, shape, dtype):
    # Standard normal, drawn in float32 then rounded: never zeros, never constant.
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _qkv(key, shape):
    dims = (shape.b, shape.t, shape.h, shape.d)
    kq, kk, kv = jax.random.split(key, 3)
    dtype = jnp.dtype(shape.dtype)
    return _normal(kq, dims, dtype), _normal(kk, dims, dtype), _normal(kv, dims, dtype)


def _input_set(stage, impl, shape, key, qkv=None):
    keys = jax.random.split(key, 5)
    q, k, v = qkv if qkv is not None else _qkv(keys[0], shape)
    if stage == "forward":
        return (q, k, v)
    dims, dtype = q.shape, q.dtype
    if stage == "hvp":
        c, uq, uk, uv = (_normal(kx, dims, jnp.float32) for kx in jax.random.split(keys[1], 4))
        return (q, k, v, c, uq, uk, uv)
    o, lse = _forward(impl, shape.causal)(q, k, v)
    do = _normal(keys[2], dims, dtype)
    if stage == "backward":
        return (q, k, v, o, lse, do)
    ddq, ddk, ddv = (_normal(kx, dims, dtype) for kx in jax.random.split(keys[3], 3))
    return (q, k, v, o, lse, do, ddq, ddk, ddv)


def _input_sets_or_skip(stage, impl, shape, disabled):
    """Fresh random input sets; skips (with the backend's reason) when `impl`
    cannot serve this shape here."""
    seed = zlib.crc32(f"{stage} {shape.id}".encode()) % 2**31  # stable across processes
    keys = jax.random.split(jax.random.PRNGKey(seed), 64)
    qkv = _qkv(keys[0], shape)
    reason = backends.unavailable_reason(impl, *qkv, causal=shape.causal)
    if reason is not None:
        pytest.skip(f"impl={impl!r} cannot serve {shape.id}: {reason}")
    first = _input_set(stage, impl, shape, keys[1], qkv=qkv)
    jax.block_until_ready(first)
    count = harness.n_input_sets(harness.nbytes(first), disabled)
    sets = [first] + [_input_set(stage, impl, shape, keys[2 + i]) for i in range(count - 1)]
    return jax.block_until_ready(sets)


# ---------------------------------------------------------------- the runner

def _bench(benchmark, stage, impl, shape):
    benchmark.group = f"{stage} {shape.id}"
    info = benchmark.extra_info
    info.update(harness.base_info(stage, impl))
    info.update(shape.as_dict())
    info.update(shape=shape.id, n_products=grid.PRODUCTS[stage], flops=grid.flops(stage, shape))
    jitted = _stage_function(stage, impl, shape.causal)
    before = harness.memory_stats()
    failure = median = None
    harness.progress(f"start {impl} {stage} {shape.id}")
    shorter = harness.shorter_oom(info)
    if shorter is not None:
        message = f"not attempted: out of memory already at T={shorter}"
        harness.progress(f"end {impl} {stage} {shape.id}: {message}")
        harness.record_oom(benchmark, message, inferred_from=shorter)
        pytest.skip(f"out of memory: {impl} {stage} {shape.id} ({message})")
    try:
        sets = _input_sets_or_skip(stage, impl, shape, benchmark.disabled)
        info["input_sets"] = len(sets)
        outputs = jax.eval_shape(jitted, *sets[0])
        # Each input read once and each output written once: the least traffic
        # any implementation can get away with.
        info["bytes_moved"] = harness.nbytes(sets[0]) + harness.nbytes(outputs)
        if not benchmark.disabled:
            start = time.perf_counter()
            # Compiles (XLA's autotuning included) outside the timed region; the
            # timed calls below find the executable in JAX's cache.
            info["compiled_bytes"] = harness.compiled_memory(jitted, sets[0])
            info["compile_s"] = time.perf_counter() - start
            harness.progress(f"compiled {impl} {stage} {shape.id} in {info['compile_s']:.1f} s")
        median = harness.measure(benchmark, stage, jitted, sets)
    except Exception as err:  # noqa: BLE001 - anything but out-of-memory is re-raised
        if not harness.is_oom(err):
            raise
        failure = f"{type(err).__name__}: {err}"
    if failure is not None:
        sets = None  # drop the device buffers before the next benchmark allocates
    outcome = failure or (f"median {median * 1e3:.3f} ms" if median is not None else "ran once")
    harness.progress(f"end {impl} {stage} {shape.id}: {outcome}")
    harness.settle_memory(benchmark, info, before, failure, f"{impl} {stage} {shape.id}")
    if median is not None:
        info["median_s"] = median
        info["tflops"] = info["flops"] / median / 1e12
        info["tbytes_per_s"] = info["bytes_moved"] / median / 1e12
        harness.record_result(benchmark, median)


@pytest.mark.parametrize("impl, shape", _params())
def test_forward(benchmark, impl, shape):
    _bench(benchmark, "forward", impl, shape)


@pytest.mark.parametrize("impl, shape", _params())
def test_backward(benchmark, impl, shape):
    _bench(benchmark, "backward", impl, shape)


@pytest.mark.parametrize("impl, shape", _params())
def test_double_backward(benchmark, impl, shape):
    _bench(benchmark, "double_backward", impl, shape)


@pytest.mark.parametrize("impl, shape", _params())
def test_hvp(benchmark, impl, shape):
    _bench(benchmark, "hvp", impl, shape)
