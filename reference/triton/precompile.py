"""Compile kernel configs in worker processes and hand the results to jax-triton.

jax-triton does not use Triton's on-disk cache: for every new (kernel,
signature, constants, warps, stages) it runs Triton's TTIR -> TTGIR -> LLVM ->
PTX stages itself, in the calling process, serially (2 to 3 s per config at
head dim 128 on the H200 host). Those stages are pure functions of the TTIR
text and the options, so they can run anywhere:

1. `launches(...)` lists the kernel launches a primitive would make, by
   running its launch sequence (`primitives.py`) against a recording launch
   function instead of jax-triton.
2. `compile_all(...)` replays each launch through jax-triton's own
   `get_or_create_triton_kernel` in a pool of spawned processes (JAX pinned to
   the CPU there, the GPU's compute capability passed in), capturing the TTIR
   text and the PTX, and runs ptxas -v on the PTX for the register and spill
   counts that prune the autotune grid.
3. `install(results)` patches jax-triton's `compile_ttir_inplace` in this
   process: a TTIR whose text and options match a precompiled one returns the
   stored PTX; anything else compiles as before. A mismatch (say, a different
   jax-triton specialization) therefore costs time, never correctness.
"""
from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import os
import re
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np

from mgd.reference.triton import configs, primitives

# Hopper: registers per thread and shared memory per block.
MAX_REGS = 255
MAX_SHARED = 227 * 1024
_TRITON_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch, reduced to what decides its compiled code."""
    kernel: str                      # function name in kernels.py
    arg_types: tuple                 # jax-triton's type strings, inputs then outputs
    scalar_args: tuple               # (index, type, value) of the scalar inputs
    metaparams: tuple                # sorted (name, value) constexprs
    num_warps: int
    num_stages: int


class _Spec:
    """Shape and dtype of an array, enough for the launch sequences."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)


def _record(sink):
    def launch(kernel, args, outs, grid, config, **constexprs):
        types, scalars = [], []
        for i, a in enumerate(args):
            if isinstance(a, _Spec):
                types.append("*" + _TRITON_TYPES[a.dtype.name])
            # A scalar's value reaches the compiled code only when it equals 1
            # (jax-triton makes it a constant); any other value shares one build.
            elif isinstance(a, np.float32):  # as jax-triton's triton_call reads it
                scalars.append((i, "fp32", 1.0 if a == 1 else 0.5))
            elif isinstance(a, int) and not isinstance(a, bool):
                scalars.append((i, "i32", 1 if a == 1 else 2))
            else:
                raise TypeError(f"unexpected launch argument {a!r} for {kernel.__name__}")
        for i, t, _ in scalars:
            types.insert(i, t)
        types += ["*" + _TRITON_TYPES[np.dtype(d).name] for _, d in outs]
        meta = tuple(sorted({**config.meta(), **constexprs}.items()))
        sink.append(Launch(kernel.__name__, tuple(types), tuple(scalars), meta,
                           config.num_warps, config.num_stages))
        return tuple(_Spec(s, d) for s, d in outs)
    return launch


def _x(b, t, h, d, dtype):
    return _Spec((b, t, h, d), dtype)


def kernel_launches(kernel, head_dim, dtype, causal, cfg, *, t=4096, heads=2):
    """Launches of one tuned kernel (configs.KERNELS) with config cfg."""
    x = _x(1, t, heads, head_dim, dtype)
    st = _Spec((1, heads, t), np.float32)
    kw = dict(causal=causal, scale=1.0 / np.sqrt(head_dim))
    sink = []
    rec = _record(sink)
    if kernel == "fwd":
        primitives.fwd(rec, cfg, x, x, x, **kw)
    elif kernel in ("bwd_dkdv", "bwd_dq"):
        getattr(primitives, kernel)(rec, cfg, x, x, x, x, st, st, **kw)
    elif kernel == "dbwd_rows":
        primitives.dbwd_rows(rec, cfg, x, x, x, x, x, st, x, x, x, **kw)
    elif kernel in ("dbwd_dq", "dbwd_dkdv"):
        getattr(primitives, kernel)(rec, cfg, x, x, x, x, st, x, x, x, st, st, st, **kw)
    else:
        raise ValueError(f"kernel must be one of {configs.KERNELS}, got {kernel!r}")
    return sink


def primitive_launches(head_dim, dtype, causal, table, *, t=4096, heads=2):
    """Every launch of forward, backward and double backward under `table`."""
    x = _x(1, t, heads, head_dim, dtype)
    st = _Spec((1, heads, t), np.float32)
    kw = dict(causal=causal, scale=1.0 / np.sqrt(head_dim), table=table)
    sink = []
    rec = _record(sink)
    primitives.forward(rec, x, x, x, **kw)
    primitives.backward(rec, x, x, x, x, st, x, st, **kw)
    primitives.double_backward(rec, x, x, x, x, st, x, x, x, x, **kw)
    return sink


# ----------------------------------------------------------------------------
# Workers


class _Captured(Exception):
    pass


def _ttir_key(ttir_text, num_warps, num_stages, capability):
    return (hashlib.sha1(ttir_text.encode()).hexdigest(), int(num_warps), int(num_stages),
            int(capability))


def _ptxas_usage(ptx, capability):
    """(registers, spill store bytes, spill load bytes) from ptxas -v, or None."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return None
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", f"-arch={arch}", src, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True)
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    stores = re.search(r"(\d+) bytes spill stores", text)
    loads = re.search(r"(\d+) bytes spill loads", text)
    if not regs:
        return None
    return int(regs.group(1)), int(stores.group(1)) if stores else 0, int(loads.group(1)) if loads else 0


def stub_gpu_plugin():
    """Let jax-triton import where jaxlib has no GPU plugin (a CPU machine).

    jax-triton needs the plugin to launch kernels, not to compile them; its
    import only looks up these two functions. For compile-only use (the
    --dry-run --compile mode of the autotuner, the CPU tests); a no-op where
    the real plugin is present.
    """
    import types

    import jax._src.lib as lib

    if getattr(getattr(lib, "gpu_triton", None), "get_compute_capability", None) is None:
        lib.gpu_triton = types.SimpleNamespace(
            get_compute_capability=lambda device: 90, get_serialized_metadata=lambda *a: b"")


def _worker_init(stub_plugin):
    # Compiling needs no device: keep JAX off the GPU in the workers.
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.pop("TRITON_INTERPRET", None)
    if stub_plugin:
        stub_gpu_plugin()


def _compile_launch(launch, capability):
    """Run jax-triton's compile path for one launch; return what install needs."""
    import jax_triton.triton_lib as jtl

    from mgd.reference.triton import kernels

    t0 = time.perf_counter()
    original = jtl.compile_ttir_inplace
    captured = {}

    def capture(module, backend, options, cc, platform):
        captured["key"] = _ttir_key(str(module), options.num_warps, options.num_stages, cc)
        captured["result"] = original(module, backend, options, cc, platform)
        raise _Captured

    jtl.compile_ttir_inplace = capture
    try:
        jtl.get_or_create_triton_kernel(
            jtl.get_cuda_backend, "cuda", getattr(kernels, launch.kernel), list(launch.arg_types),
            tuple(launch.scalar_args), num_warps=launch.num_warps, num_stages=launch.num_stages,
            num_ctas=1, compute_capability=capability, enable_fp_fusion=True,
            metaparams=dict(launch.metaparams), dump=False)
    except _Captured:
        pass
    except Exception as err:  # noqa: BLE001 - a config that cannot compile is a result
        return dict(launch=launch, error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}",
                    seconds=time.perf_counter() - t0)
    finally:
        jtl.compile_ttir_inplace = original
    res = captured["result"]
    usage = _ptxas_usage(res.binary, capability)
    return dict(launch=launch, key=captured["key"], name=res.name, shared=res.shared_mem_bytes,
                ptx=res.binary, usage=usage, error="", seconds=time.perf_counter() - t0)


def default_jobs(cap=16):
    """Cores this process may use, at most `cap`: os.cpu_count() can report
    the whole host where a job is given a few cores, and each worker holds
    a JAX and Triton import (a few hundred MB)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, cap))


def compile_all(launches, capability, *, jobs=None, deadline_s=None, log=print, stub_plugin=False):
    """{Launch: result dict} for the distinct launches, compiled in `jobs`
    spawned processes; launches not finished by `deadline_s` are left out."""
    todo = list(dict.fromkeys(launches))
    jobs = jobs or default_jobs()
    out = {}
    if not todo:
        return out
    start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")  # the parent may hold a CUDA context
    pool = ProcessPoolExecutor(min(jobs, len(todo)), mp_context=ctx, initializer=_worker_init,
                               initargs=(stub_plugin,))
    futures = {pool.submit(_compile_launch, launch, capability): launch for launch in todo}
    try:
        remaining = None if deadline_s is None else max(1.0, deadline_s)
        for fut in as_completed(futures, timeout=remaining):
            try:
                out[futures[fut]] = fut.result()
            except Exception as err:  # noqa: BLE001 - a crashed worker loses its launch only
                out[futures[fut]] = dict(launch=futures[fut], error=f"worker: {err!r}"[:200])
    except TimeoutError:
        log(f"precompile: deadline of {deadline_s:.0f} s reached with {len(out)} of {len(todo)} done")
    finally:
        unfinished = [fut for fut in futures if not fut.done()]
        pool.shutdown(wait=False, cancel_futures=True)
        if unfinished:  # workers still compiling would hold cores the timing needs
            for proc in list((pool._processes or {}).values()):
                proc.terminate()
    log(f"precompile: {len(out)} of {len(todo)} launches in {time.perf_counter() - start:.1f} s "
        f"on {jobs} processes")
    return out


# ----------------------------------------------------------------------------
# This process


_STORE = {}


def install(results):
    """Serve the precompiled PTX to jax-triton in this process (idempotent)."""
    import jax_triton.triton_lib as jtl

    for r in results.values():
        if not r.get("error"):
            _STORE[r["key"]] = r
    if getattr(jtl, "_mgd_precompiled", False):
        return
    original = jtl.compile_ttir_inplace

    def serve(module, backend, options, cc, platform):
        hit = _STORE.get(_ttir_key(str(module), options.num_warps, options.num_stages, cc))
        if hit is None or platform != "cuda":
            return original(module, backend, options, cc, platform)
        serve.hits += 1
        return jtl.CompilationResult(binary=hit["ptx"], name=hit["name"],
                                     shared_mem_bytes=hit["shared"], ttgir=None, llir=None)

    serve.hits = 0
    jtl.compile_ttir_inplace = serve
    jtl._mgd_precompiled = True


def hits():
    import jax_triton.triton_lib as jtl

    return getattr(jtl.compile_ttir_inplace, "hits", 0)


def verdict(result):
    """'ok', or why compile statistics rule the config out of timing."""
    if result is None:
        return "not compiled"
    if result.get("error"):
        return "error: " + result["error"]
    if result["shared"] > MAX_SHARED:
        return f"shared memory {result['shared']} > {MAX_SHARED}"
    usage = result.get("usage")
    if usage and (usage[1] or usage[2]):
        return f"spills ({usage[1]} B stored, {usage[2]} B loaded)"
    return "ok"


def capability():
    """The GPU's compute capability as jax-triton reads it (e.g. 90)."""
    import jax_triton.triton_lib as jtl

    return int(jtl.triton_kernel_call_lib.get_compute_capability(0))
