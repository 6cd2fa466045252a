"""Times the attention backward side by side in one process: impl cuda's own kernel,
the Pallas reference, and cuDNN's fused attention backward where the device's JAX has
it. B=1, causal, bf16; effective TFLOP/s count 5 products, halved for causal.

    python3 scripts/bwd_timing.py [--lengths 1024 2048 ...] [--heads-dims 12:64 16:128]
"""
from __future__ import annotations

import argparse
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from mgd.bindings import cuda
from mgd.reference import pallas


def _median_ms(fn, args, min_reps=5, budget_s=1.0):
    jax.block_until_ready(fn(*args))
    end = time.perf_counter() + 0.2  # let the clocks ramp up before timing
    while time.perf_counter() < end:
        jax.block_until_ready(fn(*args))
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def _cudnn_backward(q, k, v, do, scale):
    def f(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                            implementation="cudnn")
    _, vjp = jax.vjp(f, q, k, v)
    return jax.jit(lambda g, do: g(do)), (vjp, do)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--heads-dims", nargs="+", default=["12:64", "16:128"])
    args = parser.parse_args()
    print(f"device {jax.devices()[0].device_kind}; jax {jax.__version__}")
    print(f"{'H':>3} {'D':>4} {'T':>6} | {'cuda ms':>8} {'TF/s':>6} | {'fused ms':>8} {'TF/s':>6} | "
          f"{'pallas ms':>9} {'TF/s':>6} | {'cudnn ms':>8} {'TF/s':>6} | best cuda/pallas")
    for hd in args.heads_dims:
        h, d = (int(x) for x in hd.split(":"))
        for t in args.lengths:
            rng = np.random.default_rng(t + d)
            q, k, v, do = (jnp.asarray(rng.standard_normal((1, t, h, d)), jnp.bfloat16)
                           for _ in range(4))
            scale = d ** -0.5
            o, lse = jax.jit(partial(pallas.forward, causal=True, scale=scale))(q, k, v)
            flop = 5 * 2 * h * t * t * d / 2
            row = {}
            ours = jax.jit(partial(cuda.kernel_backward, causal=True, scale=scale,
                                   deterministic=True))
            ref = jax.jit(partial(pallas.backward, causal=True, scale=scale))
            fused = jax.jit(partial(cuda.kernel_backward, causal=True, scale=scale,
                                    deterministic=False))
            row["cuda"] = _median_ms(ours, (q, k, v, o, lse, do))
            row["fused"] = _median_ms(fused, (q, k, v, o, lse, do))
            row["pallas"] = _median_ms(ref, (q, k, v, o, lse, do))
            try:
                fn, fargs = _cudnn_backward(q, k, v, do, scale)
                row["cudnn"] = _median_ms(fn, fargs)
            except Exception as err:  # noqa: BLE001 - cuDNN attention is optional here
                row["cudnn"] = float("nan")
                print(f"  cudnn unavailable: {type(err).__name__}: {str(err)[:80]}")
            tf = {name: flop / ms / 1e9 for name, ms in row.items()}
            best = min(row["cuda"], row["fused"])
            print(f"{h:3d} {d:4d} {t:6d} | {row['cuda']:8.3f} {tf['cuda']:6.1f} | "
                  f"{row['fused']:8.3f} {tf['fused']:6.1f} | "
                  f"{row['pallas']:9.3f} {tf['pallas']:6.1f} | {row['cudnn']:8.3f} "
                  f"{tf['cudnn']:6.1f} | {row['pallas'] / best:.2f}x", flush=True)


if __name__ == "__main__":
    main()
