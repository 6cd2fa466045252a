"""Sweep tile sizes, warps and stages of each Triton kernel on this GPU; write the table.

    python -m mgd.reference.triton.autotune --out reference/triton/configs.json [--budget-s 140]
    python -m mgd.reference.triton.autotune --out unused.json --dry-run   # the grid, no GPU

Three phases, so the sweep fits a short device call:

1. Compile the whole grid (`grid_candidates`: default, hand-picked seeds and a
   regular grid per kernel and head dim) in a pool of processes through
   jax-triton's own compile path (`precompile.py`), reading registers, spills
   and shared memory from each build.
2. Prune: a config that spills, exceeds shared memory or fails to compile is
   not timed. Of the rest, at most --max-timed per (kernel, head dim) are
   timed: the default, then the seeds, then the grid by tile area (largest
   first). The prune is by compile statistics only, never by guessed speed.
3. Time serially, one kernel at a time with the other kernels' inputs computed
   once, on fresh random inputs per (head dim, causal, T): a burst of calls
   closed by one block_until_ready, median of several bursts. Every candidate's
   outputs are compared with the default config's on the same inputs (relative
   L2 within the bf16 tolerance of the kernel's derivative order) and a config
   that fails, or disagrees, is dropped. The default config itself is first
   checked against the float64 reference at a small T.

The fastest surviving config per (kernel, head dim, causal, T) goes into the
JSON table the wrappers read (`configs.Table`, nearest T on a log scale);
every row, including pruned, failed and wrong configs, into the CSV. Both are
rewritten after every key, so a sweep stopped by --budget-s or SIGINT keeps
what it measured, and what it never reached falls back to `configs.default`.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import threading
import time

import numpy as np

from mgd.reference import agreement
from mgd.reference.triton import configs
from mgd.reference.triton.configs import Config

# Seeds per kernel and head dim: the tiles measured or chosen before (Pallas's
# H200 tiles, the first H200 run, compile statistics; see NOTES.md).
SMALL_HEAD = {
    "fwd": [(128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 2), (128, 128, 8, 2)],
    "bwd_dkdv": [(32, 64, 4, 2), (64, 64, 8, 2), (32, 128, 8, 2), (16, 64, 4, 2)],
    "bwd_dq": [(64, 64, 4, 2), (128, 128, 8, 2), (128, 32, 4, 2)],
    "dbwd_rows": [(64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2)],
    "dbwd_dq": [(64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2)],
    "dbwd_dkdv": [(16, 64, 4, 2), (32, 128, 8, 2), (16, 128, 8, 2)],
}
LARGE_HEAD = {
    "fwd": [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
    "bwd_dkdv": [(32, 64, 4, 2), (16, 64, 4, 2), (32, 128, 8, 2)],
    "bwd_dq": [(64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2)],
    "dbwd_rows": [(64, 32, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)],
    "dbwd_dq": [(64, 32, 4, 2), (64, 32, 8, 2), (128, 32, 8, 2)],
    "dbwd_dkdv": [(64, 32, 8, 2), (32, 32, 8, 2), (128, 32, 8, 2)],
}
# The regular grid. Query-tile kernels hold a [block_m, D] accumulator and
# stream key tiles; key-tile kernels the reverse, with block_n the resident
# tile. Double-backward tiles stay at or below 64 x 128 elements: they hold
# several float32 [block_m, block_n] tiles at once.
_QUERY_SIDE = ("fwd", "bwd_dq", "dbwd_rows", "dbwd_dq")
_MAX_AREA = {"fwd": 128 * 128, "bwd_dq": 128 * 128, "bwd_dkdv": 64 * 128}


def _grid(kernel):
    if kernel in _QUERY_SIDE:
        ms, ns = (64, 128), (32, 64, 128)
    else:
        ms, ns = (16, 32, 64), (32, 64, 128)
    stages = (2, 3) if kernel == "fwd" else (2,)
    area = _MAX_AREA.get(kernel, 64 * 128)
    return [Config(m, n, w, s) for m in ms for n in ns for w in (4, 8) for s in stages
            if m * n <= area]


def candidates(kernel, head_dim):
    """Default first, then the seeds: what is timed when nothing is pruned."""
    out = [configs.default(kernel, head_dim)]
    for c in (LARGE_HEAD if head_dim >= 128 else SMALL_HEAD)[kernel]:
        cfg = Config(*c)
        if cfg not in out:
            out.append(cfg)
    return out


def grid_candidates(kernel, head_dim):
    """Everything compiled: candidates() then the grid, without repeats."""
    out = candidates(kernel, head_dim)
    seen = set(out)
    for cfg in _grid(kernel):
        if cfg not in seen:
            seen.add(cfg)
            out.append(cfg)
    return out


def timing_list(kernel, head_dim, verdicts, max_timed):
    """The configs to time: compile-clean ones, default and seeds first, then
    the grid by tile area (largest first); the default is always timed (it is
    the correctness yardstick and the fallback)."""
    seeds = candidates(kernel, head_dim)
    grid = [c for c in grid_candidates(kernel, head_dim) if c not in seeds]
    grid.sort(key=lambda c: (-c.block_m * c.block_n, c.num_warps, c.num_stages))
    out = [seeds[0]]
    for cfg in seeds[1:] + grid:
        if len(out) >= max_timed:
            break
        if verdicts.get(cfg, "ok") == "ok":
            out.append(cfg)
    return out


def compile_order(kernels, head_dims):
    """(kernel, head dim, config) in the order timing_list reads them, round
    robin over kernels and head dims (128 first), so a compile phase cut
    short by its deadline loses the configs least likely to be timed."""
    ranked = []
    for d in head_dims:
        for k in kernels:
            seeds = candidates(k, d)
            grid = [c for c in grid_candidates(k, d) if c not in seeds]
            grid.sort(key=lambda c: (-c.block_m * c.block_n, c.num_warps, c.num_stages))
            ranked += [(i, -d, k, cfg) for i, cfg in enumerate(seeds + grid)]
    return [(k, -nd, cfg) for _, nd, k, cfg in sorted(ranked, key=lambda r: r[:3])]


def time_ms(fn, *args, warmup=2, samples=5, min_burst_ms=5.0):
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


KERNEL_INPUTS = {
    "fwd": ("q", "k", "v"),
    "bwd_dkdv": ("q", "k", "v", "do", "lse", "delta"),
    "bwd_dq": ("q", "k", "v", "do", "lse", "delta"),
    "dbwd_rows": ("q", "k", "v", "o", "do", "lse", "ddq", "ddk", "ddv"),
    "dbwd_dq": ("q", "k", "v", "do", "lse", "ddq", "ddk", "ddv", "delta2", "dd", "bstat"),
    "dbwd_dkdv": ("q", "k", "v", "do", "lse", "ddq", "ddk", "ddv", "delta2", "dd", "bstat"),
}
# Each kernel's derivative order decides its tolerance (mgd.reference.agreement).
AGREE_TOL = {kernel: agreement.BF16_TOLERANCE[order] for kernel, order in {
    "fwd": 0, "bwd_dkdv": 1, "bwd_dq": 1, "dbwd_rows": 2, "dbwd_dq": 2, "dbwd_dkdv": 2}.items()}


def runtime():
    """(launch, jit): how kernels run here. The GPU path: jax-triton under
    jax.jit. A dry run on the CPU interpreter swaps this out."""
    import jax

    from mgd.reference.triton import jax_calls

    return jax_calls._launch, jax.jit


@functools.cache
def kernel_fn(kernel, cfg, causal, scale):
    """A jitted function of KERNEL_INPUTS[kernel] that runs one kernel."""
    from mgd.reference.triton import primitives as P

    launch, jit = runtime()
    run = getattr(P, kernel)
    return jit(lambda *a: run(launch, cfg, *a, causal=causal, scale=scale))


def _intermediates(x, causal, scale):
    """o, lse, delta (backward) and the double backward's row statistics, once."""
    import jax.numpy as jnp

    from mgd.reference.triton import primitives as P

    (launch, jit), d = runtime(), x["q"].shape[-1]
    o, lse = jit(lambda q, k, v: P.fwd(launch, configs.default("fwd", d), q, k, v,
                                       causal=causal, scale=scale))(x["q"], x["k"], x["v"])
    delta = jit(lambda o, do: P.bwd_delta(launch, o, do, jnp.zeros_like(lse)))(o, x["do"])
    _, delta2, dd, bstat = jit(lambda *a: P.dbwd_rows(
        launch, configs.default("dbwd_rows", d), *a, causal=causal, scale=scale))(
        x["q"], x["k"], x["v"], o, x["do"], lse, x["ddq"], x["ddk"], x["ddv"])
    return dict(x, o=o, lse=lse, delta=delta, delta2=delta2, dd=dd, bstat=bstat)


class DefaultsTable:
    """A table with no entries: every kernel at configs.default."""

    def lookup(self, kernel, head_dim, *_):
        return configs.default(kernel, head_dim)


def check_defaults(head_dim, causal, dtype, t=200, heads=2, log=print):
    """Worst relative L2 error of the default-config primitives against float64."""
    import jax.numpy as jnp

    from mgd.reference import float64 as f64
    from mgd.reference.triton import primitives as P

    rng = np.random.default_rng(12345)
    x = _problem(rng, t, heads, head_dim, dtype)
    q, k, v, do, ddq, ddk, ddv = (x[n] for n in ("q", "k", "v", "do", "ddq", "ddk", "ddv"))
    kw = dict(causal=causal, scale=1.0 / math.sqrt(head_dim))
    (launch, jit), table = runtime(), DefaultsTable()
    o, lse = jit(lambda *a: P.forward(launch, *a, table=table, **kw))(q, k, v)
    grads = jit(lambda *a: P.backward(launch, *a, table=table, **kw))(
        q, k, v, o, lse, do, jnp.zeros_like(lse))
    second = jit(lambda *a: P.double_backward(launch, *a, table=table, **kw))(
        q, k, v, o, lse, do, ddq, ddk, ddv)
    wide = [np.asarray(np.asarray(a, np.float32), np.float64) for a in (q, k, v, do, ddq, ddk, ddv)]
    ref = (f64.forward(*wide[:3], **kw)[0], *f64.backward(*wide[:4], **kw),
           *f64.double_backward(*wide, **kw))
    errs = [agreement.rel_l2(a, b) for a, b in zip((o, *grads, *second), ref)]
    tol = (1.5e-2, 3e-2, 3e-2, 3e-2, 5e-2, 5e-2, 5e-2, 5e-2)
    ok = all(e <= t_ for e, t_ in zip(errs, tol))
    log(f"default configs D={head_dim} causal={causal} vs float64 at T={t}: "
        f"max rel L2 {max(errs):.2e} {'ok' if ok else 'WRONG'}")
    return ok, max(errs)


def sweep_keys(heads, ts, causal, noncausal_ts):
    """(h, d, causal, t) in the order they are timed, so that a sweep cut
    short loses the least: causal at the two longest lengths (4096 first),
    then non-causal, then the other causal lengths (shortest last: a length
    without its own entry takes the nearest tuned one); head dim 128 before
    64 throughout."""
    by_d = sorted(heads, key=lambda hd: -hd[1])
    order = sorted(ts, key=lambda t: (t != 4096, -t)) if causal else []
    first, rest = order[:2], order[2:]
    keys = [(h, d, True, t) for t in first for h, d in by_d]
    keys += [(h, d, False, t) for t in noncausal_ts for h, d in by_d]
    keys += [(h, d, True, t) for t in rest for h, d in by_d]
    return keys


class Sweep:
    def __init__(self, args, log=print):
        self.args, self.log = args, log
        self.rows, self.best, self.meta = [], {}, {}
        self.started = time.perf_counter()

    def over_budget(self):
        b = self.args.budget_s
        return b is not None and time.perf_counter() - self.started > b

    def _row(self, kernel, h, d, causal, t, cfg, **extra):
        row = dict(kernel=kernel, heads=h, head_dim=d, causal=causal, t=t, dtype=self.args.dtype,
                   block_m=cfg.block_m, block_n=cfg.block_n, num_warps=cfg.num_warps,
                   num_stages=cfg.num_stages, regs="", spill_bytes="", shared="", ms="",
                   rel_err="", status="")
        row.update(extra)
        self.rows.append(row)
        return row

    def time_key(self, h, d, causal, t, timed, stats):
        import jax.numpy as jnp

        dtype = jnp.dtype(self.args.dtype)
        scale = 1.0 / math.sqrt(d)
        rng = np.random.default_rng(hash((h, d, causal, t)) % 2**32)
        x = _intermediates(_problem(rng, t, h, d, dtype), causal, scale)
        for kernel in self.args.kernels:
            ref = None
            for cfg in timed[(kernel, d)]:
                if self.over_budget():
                    return False
                st = stats.get((kernel, d, cfg)) or {}
                usage = st.get("usage") or ("", "", "")
                row = self._row(kernel, h, d, causal, t, cfg, regs=usage[0],
                                spill_bytes=(usage[1] + usage[2]) if usage[0] != "" else "",
                                shared=st.get("shared", ""))
                t0 = time.perf_counter()
                try:
                    fn = kernel_fn(kernel, cfg, causal, scale)
                    args = [x[n] for n in KERNEL_INPUTS[kernel]]
                    out = fn(*args)
                    out = out if isinstance(out, tuple) else (out,)
                    if ref is None:  # the default runs first: the yardstick
                        ref = out
                        err = max(agreement.rel_l2(a, a) for a in out)  # inf if non-finite
                    else:
                        err = max(agreement.rel_l2(a, b) for a, b in zip(out, ref))
                    row["rel_err"] = f"{err:.2e}"
                    if err > AGREE_TOL[kernel]:
                        row["status"] = f"wrong: disagrees with the default config ({err:.2e})"
                    else:
                        ms = time_ms(fn, *args)
                        row.update(ms=round(ms, 5), status="ok")
                        key = (kernel, d, causal, t)
                        if key not in self.best or ms < self.best[key][1]:
                            self.best[key] = (cfg, ms)
                except Exception as err:  # noqa: BLE001 - a config the GPU cannot run is data too
                    row["status"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
                row["wall_s"] = round(time.perf_counter() - t0, 2)
                self.log(",".join(str(row[c]) for c in (
                    "kernel", "heads", "head_dim", "causal", "t", "block_m", "block_n", "num_warps",
                    "num_stages", "regs", "spill_bytes", "ms", "rel_err", "status", "wall_s")))
        return True

    def write(self):
        import jax

        entries = [configs.entry(kernel, d, causal, t, cfg, ms=round(ms, 5))
                   for (kernel, d, causal, t), (cfg, ms) in sorted(self.best.items(), key=str)]
        table = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                 "dtype": self.args.dtype, "sweep_s": round(time.perf_counter() - self.started, 1),
                 **self.meta, "entries": entries}
        # Written beside the target and renamed: a sweep killed mid-write
        # leaves the previous file, never half of one.
        with open(self.args.out + ".tmp", "w") as f:
            json.dump(table, f, indent=1)
        os.replace(self.args.out + ".tmp", self.args.out)
        if self.rows:
            fields = list(dict.fromkeys(k for r in self.rows for k in r))
            path = csv_path(self.args)
            with open(path + ".tmp", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields, restval="")
                writer.writeheader()
                writer.writerows(self.rows)
            os.replace(path + ".tmp", path)
        return len(entries)


def csv_path(args):
    return args.csv or (args.out.rsplit(".", 1)[0] + ".csv")


def precompile_grid(args, keys, log, cc=None, stub_plugin=False):
    """Phase 1 and 2: compile statistics for the grid; the lists to time."""
    from mgd.reference.triton import precompile

    cc = precompile.capability() if cc is None else cc
    head_dims = sorted({d for _, d, _, _ in keys})
    plan = {(k, d, cfg): precompile.kernel_launches(k, d, args.dtype, True, cfg)
            for d in head_dims for k in args.kernels for cfg in grid_candidates(k, d)}
    # The default primitives (check_defaults) add the delta kernel's launch.
    extra = [l for d in head_dims
             for l in precompile.primitive_launches(d, args.dtype, True, DefaultsTable())]
    results = precompile.compile_all([l for key in compile_order(args.kernels, head_dims)
                                      for l in plan[key]] + extra, cc, jobs=args.jobs,
                                     deadline_s=args.precompile_s, log=log,
                                     stub_plugin=stub_plugin)
    if not stub_plugin:
        precompile.install(results)
    stats, timed, pruned = {}, {}, []
    for (k, d, cfg), launches in plan.items():
        r = results.get(launches[0])
        stats[(k, d, cfg)] = r or {}
        v = precompile.verdict(r)
        # Not compiled in time: only the default and the seeds are timed then.
        stats[(k, d, cfg)]["verdict"] = v
    for d in head_dims:
        for k in args.kernels:
            verdicts = {cfg: stats[(k, d, cfg)]["verdict"] for cfg in grid_candidates(k, d)}
            seeds = set(candidates(k, d))
            usable = {cfg: ("ok" if v == "not compiled" and cfg in seeds else v)
                      for cfg, v in verdicts.items()}
            timed[(k, d)] = timing_list(k, d, usable, args.max_timed)
            pruned += [(k, d, cfg, v) for cfg, v in verdicts.items() if v not in ("ok", "not compiled")]
    return cc, stats, timed, pruned, results


def dry_run(args, keys):
    print(f"sweep order ({len(keys)} keys): " + ", ".join(
        f"H{h}/D{d}/{'causal' if c else 'full'}/T{t}" for h, d, c, t in keys))
    head_dims = sorted({d for _, d, _, _ in keys})
    total = 0
    for d in head_dims:
        for k in args.kernels:
            grid = grid_candidates(k, d)
            total += len(grid)
            print(f"{k:10s} D={d:3d}: {len(grid):2d} compiled; timed at most {args.max_timed}: "
                  f"{[dataclasses.astuple(c) for c in timing_list(k, d, {}, args.max_timed)]}")
    print(f"{total} configs to compile (causal builds; non-causal builds of the timed ones follow)")
    try:
        from mgd.reference.triton import precompile
    except ImportError as err:
        print(f"launches not recorded: {err}")
        return
    order = compile_order(args.kernels, head_dims)
    assert len(order) == total and len(set(order)) == total
    launches = [l for k, d, c in order for l in precompile.kernel_launches(k, d, args.dtype, True, c)]
    assert len(set(launches)) == total, "one launch per (kernel, head dim, config)"
    print(f"{len(set(launches))} distinct kernel launches recorded; e.g. {launches[0]}")
    if not args.compile:
        return
    # Compile statistics for sm_90a on this machine (no GPU needed), and the
    # timing lists they would give on the device.
    precompile.stub_gpu_plugin()
    _, stats, timed, pruned, _ = precompile_grid(args, keys, print, cc=90, stub_plugin=True)
    for (k, d, cfg), st in stats.items():
        usage = st.get("usage") or ("", "", "")
        print(f"{k},{d},{','.join(map(str, dataclasses.astuple(cfg)))},regs={usage[0]},"
              f"spill_bytes={usage[1]}/{usage[2]},shared={st.get('shared', '')},{st['verdict']}")
    for (k, d), cfgs in timed.items():
        print(f"timed {k} D={d}: {[dataclasses.astuple(c) for c in cfgs]}")


DEFAULT_T = (1024, 4096, 16384)
DEFAULT_HEADS = ("12x64", "16x128")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True,
                        help="JSON table to write (e.g. reference/triton/configs.json)")
    parser.add_argument("--csv", help="CSV of every measurement (default: --out with .csv)")
    parser.add_argument("--t", type=int, nargs="+", default=list(DEFAULT_T),
                        help="causal lengths to time")
    parser.add_argument("--noncausal-t", type=int, nargs="*", default=[4096],
                        help="non-causal lengths to time (after all causal ones)")
    parser.add_argument("--heads", nargs="+", default=list(DEFAULT_HEADS),
                        help="HxD pairs, e.g. 12x64 16x128")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--kernels", nargs="+", default=list(configs.KERNELS), choices=configs.KERNELS)
    parser.add_argument("--max-timed", type=int, default=5,
                        help="configs timed per (kernel, head dim) after pruning")
    parser.add_argument("--jobs", type=int, default=None,
                        help="compiling processes (default: the cores this process may use, <= 16)")
    parser.add_argument("--precompile-s", type=float, default=45.0,
                        help="deadline of the parallel compile phase")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop after this many seconds in all (the table keeps what was timed)")
    parser.add_argument("--no-precompile", action="store_true",
                        help="time the seeds only, compiling serially in this process")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the grid, the timing order and the recorded launches; no GPU")
    parser.add_argument("--compile", action="store_true",
                        help="with --dry-run: compile the grid for sm_90a here (needs triton and "
                             "jax-triton, no GPU) and show what would be pruned and timed")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    log = lambda s: print(s, flush=True)  # noqa: E731
    heads = [tuple(int(x) for x in s.split("x")) for s in args.heads]
    keys = sweep_keys(heads, args.t, True, args.noncausal_t)
    if args.dry_run:
        dry_run(args, keys)
        return

    import jax

    if jax.devices()[0].platform != "gpu":
        sys.exit("autotune needs an NVIDIA GPU; JAX sees " + jax.devices()[0].platform)
    sweep = Sweep(args, log)
    head_dims = sorted({d for _, d, _, _ in keys})
    if args.no_precompile:
        stats, pruned = {}, []
        timed = {(k, d): candidates(k, d)[:args.max_timed] for d in head_dims for k in args.kernels}
    else:
        cc, stats, timed, pruned, _ = precompile_grid(args, keys, log)
        sweep.meta["compute_capability"] = cc
        for k, d, cfg, why in pruned:
            st = stats.get((k, d, cfg)) or {}
            usage = st.get("usage") or ("", "", "")
            sweep._row(k, "", d, True, "", cfg, regs=usage[0],
                       spill_bytes=(usage[1] + usage[2]) if usage[0] != "" else "",
                       shared=st.get("shared", ""), status="pruned: " + why)
        log(f"pruned {len(pruned)} configs by compile statistics; timing "
            f"{sum(len(v) for v in timed.values())} per key")
    sweep.meta["timed_per_kernel"] = {f"{k}/d{d}": [list(dataclasses.astuple(c)) for c in v]
                                      for (k, d), v in timed.items()}

    # Non-causal builds of the timed configs compile in the background while
    # the causal keys are timed.
    background = {}
    if not args.no_precompile and any(not c for _, _, c, _ in keys):
        from mgd.reference.triton import precompile

        launches = [l for (k, d), cfgs in timed.items() for c in cfgs
                    for l in precompile.kernel_launches(k, d, args.dtype, False, c)]
        launches += [l for d in head_dims
                     for l in precompile.primitive_launches(d, args.dtype, False, DefaultsTable())]

        def compile_noncausal():
            # Two cores fewer than the first phase: the timing loop needs the host too.
            jobs = max(1, (args.jobs or precompile.default_jobs()) - 2)
            background.update(precompile.compile_all(
                launches, sweep.meta["compute_capability"], jobs=jobs,
                deadline_s=args.precompile_s, log=log))

        thread = threading.Thread(target=compile_noncausal, daemon=True)
        thread.start()
    else:
        thread = None

    checked = {}
    try:
        for h, d, causal, t in keys:
            if (d, causal) not in checked:
                if thread is not None and not causal:
                    thread.join()
                    from mgd.reference.triton import precompile
                    precompile.install(background)
                checked[(d, causal)] = check_defaults(d, causal, jax.numpy.dtype(args.dtype), log=log)
                sweep.meta.setdefault("default_check", {})[f"d{d}/{'causal' if causal else 'full'}"] = (
                    f"{'ok' if checked[(d, causal)][0] else 'WRONG'}, max rel L2 "
                    f"{checked[(d, causal)][1]:.2e} vs float64 at T=200")
            if not checked[(d, causal)][0]:
                log(f"skipping H{h} D{d} causal={causal}: the default configs disagree with float64")
                continue
            log(f"== H{h} D{d} {'causal' if causal else 'full'} T{t} "
                f"({time.perf_counter() - sweep.started:.0f} s)")
            done = sweep.time_key(h, d, causal, t, timed, stats)
            n = sweep.write()
            if not done:
                log(f"budget of {args.budget_s:.0f} s spent; stopping here ({n} entries)")
                break
    except KeyboardInterrupt:
        log("interrupted; writing what was measured")
    if not args.no_precompile:
        from mgd.reference.triton import precompile
        sweep.meta["precompiled_hits"] = precompile.hits()
    n = sweep.write()
    log(f"wrote {args.out} ({n} entries) and {csv_path(args)} ({len(sweep.rows)} rows) "
        f"in {time.perf_counter() - sweep.started:.1f} s")


if __name__ == "__main__":
    main()
