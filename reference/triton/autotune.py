"""Sweep tile sizes and launch settings for each kernel on this GPU; write the table.

    python -m mgd.reference.triton.autotune --out reference/triton/configs.json

For each (heads, head dim), causality and sequence length it times every
candidate config of every kernel on fresh random inputs (B=1), each kernel on
its own with the other kernels' inputs computed once beforehand. Timing: JAX
dispatches asynchronously, so each sample is a burst of calls ended by one
block_until_ready, divided by the burst length; warm-up first, the median of
several samples reported. The fastest config per (kernel, head dim, causal, T)
goes into the JSON table the wrappers read; every measurement, including
configs that failed to compile or launch, goes into the CSV next to it.

Candidates are a handful per kernel around the shapes FlashAttention-style
kernels use on Hopper; a config is never chosen by anything but its time.

Compilation is serial: `triton.compile` is not thread-safe here (from 4
threads on the CPU, Triton 3.6 under Python 3.11 failed in 2 of 3 runs, e.g.
in its `ast.parse` of the kernel source: "AST constructor recursion depth
mismatch"), and jax-triton keeps its compiled kernels in-process, so worker
processes would not help. jax-triton caches a compiled kernel independently of the sequence
lengths (runtime arguments): each config pays Triton's compile once, at its
first length.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time

import numpy as np

from mgd.reference.triton import configs
from mgd.reference.triton.configs import Config

# (block_m, block_n, num_warps, num_stages) per kernel and head dim; the
# default config is always added. block_m tiles queries, block_n keys, in
# every kernel. Each list holds only configs that compile for sm_90a without
# register spills and within shared memory (checked without a GPU by
# `compile_stats.py --all-candidates`; see NOTES.md), seeded with the tiles
# the Pallas kernels chose on the H200. Three to four per kernel keep the
# default sweep (2 head shapes x 3 lengths) near three minutes, most of it
# compilation.
SMALL_HEAD = {
    "fwd": [(128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 2), (128, 128, 8, 2)],
    "bwd_dkdv": [(32, 64, 4, 2), (64, 64, 8, 2), (32, 128, 8, 2), (16, 64, 4, 2)],
    "bwd_dq": [(64, 64, 4, 2), (128, 128, 8, 2), (128, 32, 4, 2)],
    "dbwd_rows": [(64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2)],
    "dbwd_dq": [(64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2)],
    "dbwd_dkdv": [(16, 64, 4, 2), (32, 128, 8, 2), (16, 128, 8, 2)],
}
# Head dim 128: every T x T x D product doubles its operand tiles and the
# float32 [tile, HEAD_DIM] accumulators double too; the double-backward key
# kernel holds two of them and spills with 64-key tiles at every warp count
# and query tile compiled (16, 32, 64; 4 or 8 warps).
LARGE_HEAD = {
    "fwd": [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
    "bwd_dkdv": [(32, 64, 4, 2), (16, 64, 4, 2), (32, 128, 8, 2)],
    "bwd_dq": [(64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2)],
    "dbwd_rows": [(64, 32, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)],
    "dbwd_dq": [(64, 32, 4, 2), (64, 32, 8, 2), (128, 32, 8, 2)],
    "dbwd_dkdv": [(64, 32, 8, 2), (32, 32, 8, 2), (128, 32, 8, 2)],
}


def candidates(kernel, head_dim):
    out = [configs.default(kernel, head_dim)]
    for c in (LARGE_HEAD if head_dim >= 128 else SMALL_HEAD)[kernel]:
        cfg = Config(*c)
        if cfg not in out:
            out.append(cfg)
    return out


def time_ms(fn, *args, warmup=2, samples=5, min_burst_ms=10.0):
    """Median ms per call of a jitted fn (compiled and warmed up first)."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = max(time.perf_counter() - t0, 1e-6)
    burst = max(1, min(200, int(min_burst_ms / 1e3 / one)))
    per_call = []
    for _ in range(samples):
        t0 = time.perf_counter()
        out = None
        for _ in range(burst):
            out = fn(*args)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t0) * 1e3 / burst)
    return statistics.median(per_call)


def _problem(rng, t, h, d, dtype):
    import jax.numpy as jnp

    def draw():
        return jnp.asarray(rng.standard_normal((1, t, h, d)).astype(np.float32)).astype(dtype)

    return {name: draw() for name in ("q", "k", "v", "do", "ddq", "ddk", "ddv")}


def kernel_fns(kernel, cfg, causal, scale):
    """(jitted fn, names of the inputs it takes) that runs one kernel."""
    import jax

    from mgd.reference.triton import jax_calls, primitives as P

    launch = jax_calls._launch
    kw = dict(causal=causal, scale=scale)
    fns = {
        "fwd": (lambda q, k, v: P.fwd(launch, cfg, q, k, v, **kw), ("q", "k", "v")),
        "bwd_dkdv": (lambda q, k, v, do, lse, delta: P.bwd_dkdv(launch, cfg, q, k, v, do, lse, delta, **kw),
                     ("q", "k", "v", "do", "lse", "delta")),
        "bwd_dq": (lambda q, k, v, do, lse, delta: P.bwd_dq(launch, cfg, q, k, v, do, lse, delta, **kw),
                   ("q", "k", "v", "do", "lse", "delta")),
        "dbwd_rows": (lambda q, k, v, o, do, lse, ddq, ddk, ddv: P.dbwd_rows(
            launch, cfg, q, k, v, o, do, lse, ddq, ddk, ddv, **kw),
            ("q", "k", "v", "o", "do", "lse", "ddq", "ddk", "ddv")),
        "dbwd_dq": (lambda q, k, v, do, lse, ddq, ddk, ddv, delta2, dd, bstat: P.dbwd_dq(
            launch, cfg, q, k, v, do, lse, ddq, ddk, ddv, delta2, dd, bstat, **kw),
            ("q", "k", "v", "do", "lse", "ddq", "ddk", "ddv", "delta2", "dd", "bstat")),
        "dbwd_dkdv": (lambda q, k, v, do, lse, ddq, ddk, ddv, delta2, dd, bstat: P.dbwd_dkdv(
            launch, cfg, q, k, v, do, lse, ddq, ddk, ddv, delta2, dd, bstat, **kw),
            ("q", "k", "v", "do", "lse", "ddq", "ddk", "ddv", "delta2", "dd", "bstat")),
    }
    fn, names = fns[kernel]
    return jax.jit(fn), names


def _intermediates(x, causal, scale):
    """o, lse, delta (backward) and the double backward's row statistics, once."""
    import jax
    import jax.numpy as jnp

    from mgd.reference.triton import jax_calls, primitives as P

    launch, table = jax_calls._launch, configs.Table()
    o, lse = jax.jit(lambda q, k, v: P.forward(launch, q, k, v, causal=causal, scale=scale,
                                               table=table))(x["q"], x["k"], x["v"])
    delta = jax.jit(lambda o, do: P.bwd_delta(launch, o, do, jnp.zeros_like(lse)))(o, x["do"])
    _, delta2, dd, bstat = jax.jit(lambda *a: P.dbwd_rows(
        launch, configs.default("dbwd_rows", x["q"].shape[-1]), *a, causal=causal, scale=scale))(
        x["q"], x["k"], x["v"], o, x["do"], lse, x["ddq"], x["ddk"], x["ddv"])
    return dict(x, o=o, lse=lse, delta=delta, delta2=delta2, dd=dd, bstat=bstat)


def sweep(ts, head_shapes, causals, dtype_name, kernels, log=print, budget_s=None):
    import jax.numpy as jnp

    dtype = jnp.dtype(dtype_name)
    rng = np.random.default_rng(0)
    rows, best = [], {}
    start = time.perf_counter()
    for h, d in head_shapes:
        scale = 1.0 / float(np.sqrt(d))
        for causal in causals:
            for t in ts:
                x = _intermediates(_problem(rng, t, h, d, dtype), causal, scale)
                for kernel in kernels:
                    for cfg in candidates(kernel, d):
                        if budget_s is not None and time.perf_counter() - start > budget_s:
                            log(f"budget of {budget_s:.0f} s spent; stopping the sweep here")
                            return rows, best
                        row = dict(kernel=kernel, heads=h, head_dim=d, causal=causal, t=t,
                                   dtype=dtype_name, block_m=cfg.block_m, block_n=cfg.block_n,
                                   num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                        t0 = time.perf_counter()
                        try:
                            fn, names = kernel_fns(kernel, cfg, causal, scale)
                            ms = time_ms(fn, *(x[n] for n in names))
                            row.update(ms=round(ms, 5), status="ok")
                        except Exception as err:  # a config the GPU cannot run is data too
                            ms = None
                            row.update(ms="", status=f"failed: {type(err).__name__}: {str(err)[:200]}")
                        row["wall_s"] = round(time.perf_counter() - t0, 2)
                        rows.append(row)
                        log(",".join(str(row[c]) for c in ("kernel", "heads", "head_dim", "causal", "t",
                                                           "block_m", "block_n", "num_warps",
                                                           "num_stages", "ms", "status")))
                        key = (kernel, d, causal, t)
                        if ms is not None and (key not in best or ms < best[key][1]):
                            best[key] = (cfg, ms)
                del x
    return rows, best


DEFAULT_T = (1024, 4096, 16384)
DEFAULT_HEADS = ("12x64", "16x128")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON table to write (e.g. reference/triton/configs.json)")
    parser.add_argument("--csv", help="CSV of every measurement (default: --out with .csv)")
    parser.add_argument("--t", type=int, nargs="+", default=list(DEFAULT_T))
    parser.add_argument("--heads", nargs="+", default=list(DEFAULT_HEADS),
                        help="HxD pairs, e.g. 12x64 16x128")
    parser.add_argument("--causal", choices=["true", "false", "both"], default="true")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--kernels", nargs="+", default=list(configs.KERNELS), choices=configs.KERNELS)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop sweeping after this many seconds (the table keeps what was timed)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)

    import jax

    if jax.devices()[0].platform != "gpu":
        sys.exit("autotune needs an NVIDIA GPU; JAX sees " + jax.devices()[0].platform)
    heads = [tuple(int(x) for x in s.split("x")) for s in args.heads]
    causals = {"true": [True], "false": [False], "both": [True, False]}[args.causal]
    t0 = time.perf_counter()
    rows, best = sweep(args.t, heads, causals, args.dtype, args.kernels,
                       log=lambda s: print(s, flush=True), budget_s=args.budget_s)
    entries = [configs.entry(kernel, d, causal, t, cfg, ms=round(ms, 5))
               for (kernel, d, causal, t), (cfg, ms) in sorted(best.items(), key=str)]
    table = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
             "dtype": args.dtype, "sweep_s": round(time.perf_counter() - t0, 1), "entries": entries}
    with open(args.out, "w") as f:
        json.dump(table, f, indent=1)
    csv_path = args.csv or (args.out.rsplit(".", 1)[0] + ".csv")
    if rows:
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    print(f"wrote {args.out} ({len(entries)} entries) and {csv_path} ({len(rows)} rows) "
          f"in {table['sweep_s']} s")


if __name__ == "__main__":
    main()
