"""Sweep tile sizes and Triton launch parameters of every Pallas kernel on a GPU.

    python -m mgd.reference.pallas.autotune --out reference/pallas/configs.json

For each (head dim, causal, length range) the sweep times each kernel alone, at
one representative length per range (configs.RANGES), on fresh random inputs:
all candidates are compiled first (in parallel), then each is warmed up and
timed with block_until_ready around every call, and the median is kept. Each
candidate's outputs are first compared with the default config's on the same
inputs (relative L2 within the bf16 tolerance of the kernel's derivative
order); one that disagrees, fails to compile or fails to run is dropped. The
fastest remaining candidate wins; the JSON table holds the winners and the CSV
every timing (or the error), so the choice can be audited.

By default a run merges into the existing table and CSV: the keys it sweeps
(say, --causal full --ranges medium) replace theirs, the others are kept.
--budget-s stops the sweep between kernels; the files are rewritten after
every kernel, so a sweep cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import datetime
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from .. import agreement
from . import _common as c
from . import backward_kernels as bwd
from . import configs as cfgs
from . import double_backward_kernels as dbwd
from .forward_kernel import padded_forward

# (block_q, block_k, num_warps, num_stages). Pruned by hand to shapes Triton can
# hold in registers and shared memory at D = 128 with the kernels' live tiles.
CANDIDATES = {
    "forward": [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                (128, 32, 4, 3), (64, 128, 4, 2)],
    "backward_dkdv": [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 128, 8, 2),
                      (32, 128, 4, 2), (128, 128, 8, 2)],
    "backward_dq": [(64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2), (128, 64, 8, 2),
                    (128, 32, 4, 2), (128, 128, 8, 2)],
    "double_backward_rows": [(64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2), (128, 64, 8, 2),
                             (32, 64, 4, 2), (128, 32, 4, 2)],
    "double_backward_q": [(64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2),
                          (128, 64, 8, 2), (32, 32, 4, 2)],
    "double_backward_kv": [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2),
                           (64, 128, 8, 2), (32, 32, 4, 2)],
}


def _as_config(candidate):
    bq, bk, warps, stages = candidate
    return {"block_q": bq, "block_k": bk, "num_warps": warps, "num_stages": stages}


def _launcher(kernel, causal, scale, t):
    """A function (inputs, config) -> outputs that runs exactly one kernel."""
    def run(x, config):
        if kernel == "forward":
            return padded_forward(x["q"], x["k"], x["v"], causal=causal, scale=scale, tk=t,
                                  config=tuple(sorted(config.items())))
        common = dict(causal=causal, scale=scale, config=config)
        if kernel == "backward_dkdv":
            return bwd.dkdv(x["q"], x["k"], x["v"], x["do"], x["lse"], x["delta"], **common)
        if kernel == "backward_dq":
            return bwd.dq(x["q"], x["k"], x["v"], x["do"], x["lse"], x["delta"], tk=t, **common)
        args = (x["q"], x["k"], x["v"], x["do"], x["ddq"], x["ddk"], x["ddv"], x["lse"],
                x["delta"])
        if kernel == "double_backward_rows":
            return dbwd.rows(*args, tk=t, **common)
        if kernel == "double_backward_q":
            return dbwd.query_side(*args, x["dd"], x["b"], x["pddv"], tk=t, **common)
        if kernel == "double_backward_kv":
            return dbwd.key_side(*args, x["dd"], x["b"], **common)
        raise ValueError(f"unknown kernel {kernel!r}")
    return run


def _inputs(rng, b, t, h, d, dtype, causal, scale):
    def draw():
        return jnp.asarray(rng.standard_normal((b, t, h, d)).astype(np.float32)).astype(dtype)
    x = {name: draw() for name in ("q", "k", "v", "do", "ddq", "ddk", "ddv")}
    forward_default = cfgs.fit_blocks(cfgs.default("forward", interpret=False), t, t)
    x["o"], x["lse"] = padded_forward(x["q"], x["k"], x["v"], causal=causal, scale=scale, tk=t,
                                      config=tuple(sorted(forward_default.items())))
    default = cfgs.fit_blocks(cfgs.default("double_backward_rows", interpret=False), t, t)
    x["delta"] = bwd.delta(x["o"], x["do"], None, config=default)
    x["dd"], x["b"], x["pddv"] = dbwd.rows(x["q"], x["k"], x["v"], x["do"], x["ddq"], x["ddk"],
                                           x["ddv"], x["lse"], x["delta"], causal=causal,
                                           scale=scale, tk=t, config=default)
    return jax.block_until_ready(x)


# Each kernel's derivative order decides its tolerance (mgd.reference.agreement).
AGREE_TOL = {kernel: agreement.BF16_TOLERANCE[order] for kernel, order in {
    "forward": 0, "backward_dkdv": 1, "backward_dq": 1,
    "double_backward_rows": 2, "double_backward_q": 2, "double_backward_kv": 2}.items()}


def _median_ms(fn, x, *, warmup, reps, min_seconds):
    """Median milliseconds per call over >= reps samples.

    One sample is a burst of back-to-back calls (sized to take ~2 ms) closed by
    block_until_ready, so short kernels are not timed as host-sync overhead.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(x))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(x))
    burst = max(1, min(50, int(2e-3 / max(time.perf_counter() - t0, 1e-6))))
    times = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start < min_seconds and len(times) < 200):
        t0 = time.perf_counter()
        for _ in range(burst):
            out = fn(x)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) * 1e3 / burst)
    return statistics.median(times), len(times) * burst


def time_primitives(lengths, head_configs, dtype, table, log):
    """Time the three public primitives with `table` in force (causal, B=1)."""
    from . import backward, double_backward, forward
    cfgs._table_cache[cfgs.TABLE_PATH] = table
    rng = np.random.default_rng(1)
    for h, d in head_configs:
        for t in lengths:
            x = _inputs(rng, 1, t, h, d, dtype, True, d ** -0.5)
            kw = dict(causal=True, scale=d ** -0.5)
            x["o"], x["lse"] = forward(x["q"], x["k"], x["v"], **kw)
            prims = {
                "forward": (2, lambda x, kw=kw: forward(x["q"], x["k"], x["v"], **kw)),
                "backward": (5, lambda x, kw=kw: backward(x["q"], x["k"], x["v"], x["o"], x["lse"],
                                                            x["do"], **kw)),
                "double_backward": (12, lambda x, kw=kw: double_backward(
                    x["q"], x["k"], x["v"], x["o"], x["lse"], x["do"], x["ddq"], x["ddk"],
                    x["ddv"], **kw)),
            }
            for name, (products, fn) in prims.items():
                ms, _ = _median_ms(jax.jit(fn), x, warmup=2, reps=5, min_seconds=0.05)
                # Effective rate: the contract's product count, halved for causal.
                tflops = products * 2 * h * t * t * d / 2 / (ms * 1e-3) / 1e12
                log(f"primitive {name:16s} H{h} D{d} T{t:6d} causal {ms:9.3f} ms "
                    f"{tflops:6.1f} effective TFLOP/s")


def sweep(*, head_configs, causal_values, ranges, dtype, kernels, warmup, reps, min_seconds, log,
          checkpoint=lambda rows, table: None, budget_s=None):
    rng = np.random.default_rng(0)
    rows, table = [], {}
    started = time.perf_counter()
    for h, d in head_configs:
        for causal in causal_values:
            for _, label, t in cfgs.RANGES:
                if label not in ranges:
                    continue
                scale = 1.0 / float(np.sqrt(d))
                x = _inputs(rng, 1, t, h, d, dtype, causal, scale)
                for kernel in kernels:
                    if budget_s is not None and time.perf_counter() - started > budget_s:
                        log(f"budget of {budget_s:.0f} s spent; stopping the sweep here")
                        return rows, table
                    run = _launcher(kernel, causal, scale, t)
                    cands = [_as_config(cand) for cand in CANDIDATES[kernel]]
                    # The default config's outputs are the yardstick of every candidate.
                    default = cfgs.fit_blocks(cfgs.default(kernel, interpret=False), t, t)
                    jitted = [jax.jit(functools.partial(run, config=cfg)) for cfg in [default] + cands]

                    def compile_one(fn, x=x):
                        try:
                            return fn.lower(x).compile(), None
                        except Exception as err:  # a candidate that cannot compile loses
                            return None, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"

                    with concurrent.futures.ThreadPoolExecutor(8) as pool:
                        compiled = list(pool.map(compile_one, jitted))
                    (ref_fn, ref_error), compiled = compiled[0], compiled[1:]
                    ref = None
                    if ref_fn is not None:
                        try:
                            ref = jax.block_until_ready(ref_fn(x))
                        except Exception as err:  # noqa: BLE001
                            ref_error = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                    if ref is None or not np.isfinite(agreement.worst_rel_l2(ref, ref)):
                        log(f"{kernel} H{h} D{d}: the default config gives no usable yardstick "
                            f"({ref_error or 'non-finite output'}); not tuned")
                        continue
                    best = None
                    for cfg, (fn, error) in zip(cands, compiled):
                        ms, n, err_l2 = float("nan"), 0, float("nan")
                        if fn is not None:
                            try:
                                err_l2 = agreement.worst_rel_l2(fn(x), ref)
                                if err_l2 > AGREE_TOL[kernel]:
                                    error = (f"wrong: disagrees with the default config "
                                             f"(rel L2 {err_l2:.2e})")
                                else:
                                    ms, n = _median_ms(fn, x, warmup=warmup, reps=reps,
                                                       min_seconds=min_seconds)
                            except Exception as err:
                                error = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                        rows.append(dict(kernel=kernel, head_dim=d, heads=h, causal=causal,
                                         range=label, t=t, **cfg, median_ms=ms, runs=n,
                                         rel_err_vs_default=err_l2, error=error or ""))
                        if error is None and (best is None or ms < best[0]):
                            best = (ms, cfg)
                        log(f"{kernel:22s} H{h} D{d} {'causal' if causal else 'full':6s} T{t:6d} "
                            f"{cfg} -> {ms:9.3f} ms{' ' + error if error else ''}")
                    if best is not None:
                        table.setdefault(kernel, {})[cfgs.key(d, causal, t)] = dict(
                            best[1], median_ms=round(best[0], 4))
                    checkpoint(rows, table)  # a sweep cut short still leaves its results
    return rows, table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON table to write")
    parser.add_argument("--csv", help="full timing grid (default: OUT with .csv)")
    parser.add_argument("--heads", default="16x128,12x64",
                        help="comma-separated HxD pairs, e.g. 12x64,16x128")
    parser.add_argument("--causal", choices=("causal", "full", "both"), default="causal")
    parser.add_argument("--ranges", default=",".join(label for _, label, _ in cfgs.RANGES),
                        help="length ranges to tune (configs.RANGES)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--kernels", default=",".join(cfgs.KERNELS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--min-seconds", type=float, default=0.05,
                        help="keep timing a candidate at least this long (and >= --reps runs)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop sweeping after this many seconds (the files keep what was timed)")
    parser.add_argument("--replace", action="store_true",
                        help="write only this sweep's results (default: merge into the existing "
                             "table and CSV, replacing the keys swept)")
    parser.add_argument("--time-primitives", default="",
                        help="after tuning, time forward/backward/double_backward at these "
                             "comma-separated lengths with the new table")
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu" or c.interpret_mode():
        parser.error(f"autotuning needs a GPU; JAX's backend here is {jax.default_backend()}")

    head_configs = [tuple(int(n) for n in pair.split("x")) for pair in args.heads.split(",")]
    causal_values = {"causal": (True,), "full": (False,), "both": (True, False)}[args.causal]
    kernels = [k for k in args.kernels.split(",") if k]
    started = time.time()
    csv_path = args.csv or os.path.splitext(args.out)[0] + ".csv"

    old_rows, old_table, old_meta = [], {}, {}
    if not args.replace:
        if os.path.exists(csv_path):
            with open(csv_path, newline="") as f:
                old_rows = list(csv.DictReader(f))
        if os.path.exists(args.out):
            with open(args.out) as f:
                saved = json.load(f)
            old_table, old_meta = saved.get("configs", {}), saved.get("meta", {})

    def row_key(row):
        return (row["kernel"], str(row["head_dim"]), str(row["causal"]), row["range"])

    def write(rows, table):
        swept = {row_key(r) for r in rows}
        all_rows = [r for r in old_rows if row_key(r) not in swept] + rows
        merged = {k: dict(v) for k, v in old_table.items()}
        for kernel, entries in table.items():
            merged.setdefault(kernel, {}).update(entries)
        fields = list(dict.fromkeys(f for r in all_rows for f in r))
        # Written beside the target and renamed: a sweep killed mid-write
        # leaves the previous file, never half of one.
        with open(csv_path + ".tmp", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(all_rows)
        os.replace(csv_path + ".tmp", csv_path)
        meta = {"written": datetime.datetime.now(datetime.UTC).isoformat(
                    timespec="seconds"),
                "device": jax.devices()[0].device_kind, "jax": jax.__version__,
                "dtype": args.dtype,
                "ranges": [[bound, label, t] for bound, label, t in cfgs.RANGES],
                "timing": f"median of >= {args.reps} runs after {args.warmup} warm-up, "
                          "block_until_ready per call, B=1, random normal inputs",
                "sweep_seconds": round(time.time() - started, 1),
                "selection": "fastest candidate whose outputs agree with the default config's "
                             "(AGREE_TOL); CSV column error says why a candidate was dropped"}
        if old_meta and not args.replace:
            meta["earlier_sweeps"] = old_meta.get("earlier_sweeps", []) + [
                {k: v for k, v in old_meta.items() if k != "earlier_sweeps"}]
        meta["this_sweep"] = {"heads": args.heads, "causal": args.causal, "ranges": args.ranges}
        with open(args.out + ".tmp", "w") as f:
            json.dump({"meta": meta, "configs": merged}, f, indent=1, sort_keys=True)
        os.replace(args.out + ".tmp", args.out)
        return meta

    try:
        rows, table = sweep(head_configs=head_configs, causal_values=causal_values,
                            ranges=args.ranges.split(","), dtype=jnp.dtype(args.dtype),
                            kernels=kernels, warmup=args.warmup, reps=args.reps,
                            min_seconds=args.min_seconds, log=lambda line: print(line, flush=True),
                            checkpoint=write, budget_s=args.budget_s)
    except KeyboardInterrupt:  # the files hold every kernel finished before the signal
        print("interrupted; the files keep the kernels swept so far", flush=True)
        return
    if not rows:
        print("nothing was timed; the table is unchanged", flush=True)
        return
    meta = write(rows, table)
    print(f"wrote {args.out} and {csv_path} in {meta['sweep_seconds']} s", flush=True)
    if args.time_primitives:
        time_primitives([int(t) for t in args.time_primitives.split(",")], head_configs[:1],
                        jnp.dtype(args.dtype), table, lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
