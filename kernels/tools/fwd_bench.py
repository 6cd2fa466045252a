"""Forward timing through JAX: impl='cuda' (our kernel) against the Pallas forward and the
cuda path's delegate (MGD_CUDA_DELEGATE=forward) in one process, bf16, causal, B=1.

    python kernels/tools/fwd_bench.py [T ...]

Medians of CUDA-synchronized wall-clock times after a warm-up; effective TFLOP/s count
2 products of B*H*T*T*D*2 FLOP, halved for causal. Prints one table row per shape.
"""
from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import mgd


def median_ms(fn, args, reps=30, warm_s=0.5):
    jax.block_until_ready(fn(*args))
    end = time.perf_counter() + warm_s
    while time.perf_counter() < end:
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def run(kind, q, k, v):
    os.environ.pop("MGD_CUDA_DELEGATE", None)
    impl = "pallas" if kind == "pallas" else "cuda"
    if kind == "cuda-delegate":
        os.environ["MGD_CUDA_DELEGATE"] = "forward"
    fn = jax.jit(lambda q, k, v: mgd.attention_forward(q, k, v, causal=True, impl=impl))
    try:
        return median_ms(fn, (q, k, v))
    finally:
        os.environ.pop("MGD_CUDA_DELEGATE", None)


def main(lengths):
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}", flush=True)
    for h, d in ((16, 128), (12, 64)):
        for t in lengths:
            rng = np.random.default_rng(t)
            q, k, v = (jnp.asarray(rng.standard_normal((1, t, h, d)), jnp.bfloat16) for _ in range(3))
            flop = 2 * 2 * h * t * t * d / 2
            row = [f"H={h:2d} D={d:3d} T={t:6d}"]
            for kind in ("cuda", "pallas", "cuda-delegate"):
                try:
                    ms = run(kind, q, k, v)
                    row.append(f"{kind} {ms:8.3f} ms {flop / ms / 1e9:6.1f} TF/s")
                except Exception as err:  # noqa: BLE001 - one failed cell must not stop the table
                    row.append(f"{kind} n/a ({type(err).__name__}: {str(err)[:50]})")
            print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [1024, 2048, 4096, 8192, 16384, 32768])
