"""Compile the kernels for Hopper without a GPU and report what each config costs.

    python -m mgd.reference.triton.compile_stats --head-dims 64 128 [--all-candidates] [--check]

A config that spills registers pays local-memory traffic in its inner loop,
and one whose products miss Hopper's wgmma runs them at mma.sync's lower
rate; both are visible at compile time, since Triton builds sm_90a code on any
machine (it ships its own ptxas). For each (kernel, head dim, config) this
prints registers per thread, spill instructions and stack frame (from the
cubin), the shared memory Triton reserves, and the wgmma / mma.sync
instruction counts of the PTX. Pointer arguments are declared 16-byte
aligned, as the buffers jax-triton passes are.

Needs the `triton` package (3.6, as on the GPU machine) and TRITON_INTERPRET unset.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from mgd.reference.triton import configs
from mgd.reference.triton.configs import Config

# Pointer arguments that hold float32 row statistics; all other pointers hold
# the input dtype. Scalars are named explicitly.
_STAT_POINTERS = {"LSE", "DELTA", "DD", "BSTAT", "DLSE"}
_INT_SCALARS = {"Tq", "Tk", "H"}
_FLOAT_SCALARS = {"sm_scale"}
KERNEL_FUNCTIONS = {
    "fwd": "attention_fwd",
    "bwd_dkdv": "attention_bwd_dkdv",
    "bwd_dq": "attention_bwd_dq",
    "dbwd_rows": "attention_dbwd_rows",
    "dbwd_dq": "attention_dbwd_dq",
    "dbwd_dkdv": "attention_dbwd_dkdv",
}
# The register file allows 255 per thread; ptxas reports spills beyond it.
MAX_REGS = 255
# Hopper: 227 KiB of shared memory per block.
MAX_SHARED = 227 * 1024


@dataclass(frozen=True)
class Stats:
    kernel: str
    head_dim: int
    config: Config
    regs: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    wgmma: int
    mma_sync: int
    error: str = ""

    @property
    def fits(self):
        """Compiles, does not spill, and its shared memory fits one block."""
        return (not self.error and self.spill_stores == 0 and self.spill_loads == 0
                and self.shared <= MAX_SHARED)

    @property
    def verdict(self):
        if self.error:
            return "error"
        if not self.fits:
            return "spills" if self.spill_stores or self.spill_loads else "shared-memory"
        # mma.sync (Ampere's instruction) runs on Hopper too, below wgmma's rate.
        return "mma.sync" if self.mma_sync else "wgmma"

    def row(self):
        c = self.config
        head = f"{self.kernel},{self.head_dim},{c.block_m},{c.block_n},{c.num_warps},{c.num_stages}"
        if self.error:
            return f"{head},,,,,,,,error: {self.error}"
        return (f"{head},{self.regs},{self.spill_stores},{self.spill_loads},{self.stack},"
                f"{self.shared},{self.wgmma},{self.mma_sync},{self.verdict}")


HEADER = ("kernel,head_dim,block_m,block_n,num_warps,num_stages,regs,spill_stores,spill_loads,"
          "stack,shared,wgmma,mma_sync,verdict")
# verdict: wgmma (fits, all products on wgmma), mma.sync (fits, some products
# on mma.sync), spills, shared-memory (over MAX_SHARED), error.


def _signature(fn, head_dim, cfg, dtype, causal):
    constexprs = {"HEAD_DIM": head_dim, "BLOCK_M": cfg.block_m, "CAUSAL": causal}
    if "BLOCK_N" in fn.arg_names:
        constexprs["BLOCK_N"] = cfg.block_n
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        elif name in _INT_SCALARS:
            signature[name] = "i32"
        else:
            signature[name] = "*fp32" if name in _STAT_POINTERS else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _cubin_usage(cubin, tools_dir):
    """(registers, spill stores, spill loads, stack bytes) of a cubin.

    Registers and the stack frame come from `cuobjdump -res-usage`; spills are
    counted as local-memory store / load instructions (STL / LDL) in the SASS,
    which is what a spill becomes (these kernels have no local arrays). Reading
    the cubin Triton already built avoids a second ptxas run per config.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        tool = os.path.join(tools_dir, "cuobjdump")
        usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    return regs, len(re.findall(r"\bSTL\b", sass)), len(re.findall(r"\bLDL\b", sass)), stack


def compile_one(kernel, head_dim, cfg, dtype="bf16", causal=True, capability=90):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mgd.reference.triton import kernels

    fn = getattr(kernels, KERNEL_FUNCTIONS[kernel])
    signature, constexprs, attrs = _signature(fn, head_dim, cfg, dtype, causal)
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", capability, 32),
                                  options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        ptx = compiled.asm["ptx"]
        tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        regs, st, ld, stack = _cubin_usage(compiled.asm["cubin"], tools)
    except Exception as err:  # noqa: BLE001 - an uncompilable config is a result
        return Stats(kernel, head_dim, cfg, 0, 0, 0, 0, 0, 0, 0,
                     error=f"{type(err).__name__}: {str(err).splitlines()[0][:120]}")
    return Stats(kernel, head_dim, cfg, regs, st, ld, stack, compiled.metadata.shared,
                 len(re.findall(r"wgmma\.mma_async", ptx)), len(re.findall(r"\bmma\.sync", ptx)))


def _compile_job(job):
    return compile_one(*job)


def collect(jobs_list, jobs=1):
    """Stats for [(kernel, head_dim, Config), ...], yielded in order; `jobs` processes."""
    if jobs <= 1:
        yield from map(_compile_job, jobs_list)
        return
    with ProcessPoolExecutor(jobs) as pool:
        yield from pool.map(_compile_job, jobs_list)


def grid(kernels, head_dims, block_ms, block_ns, warps, stages):
    # 128 x 128 tiles are left out to keep the grid short: the double-backward
    # steps hold several float32 [128, 128] tiles (64 KiB each) at once, and
    # already 64 x 128 spills in all three of those kernels at head dim 128.
    return [(k, d, Config(m, n, w, s)) for k in kernels for d in head_dims
            for m in block_ms for n in block_ns for w in warps for s in stages
            if m * n < 128 * 128]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", nargs="+", default=list(configs.KERNELS), choices=configs.KERNELS)
    parser.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--all-candidates", action="store_true",
                        help="the autotuner's candidates (default: only the configs the table would pick)")
    parser.add_argument("--grid", action="store_true",
                        help="block_m, block_n in {32,64,128} x warps {4,8} x stages {2}")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compiling processes")
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 if any config spills or overflows shared memory")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("compile_stats needs TRITON_INTERPRET unset (it compiles for a GPU target)")

    if args.grid:
        work = grid(args.kernels, args.head_dims, (32, 64, 128), (32, 64, 128), (4, 8), (2,))
    elif args.all_candidates:
        from mgd.reference.triton import autotune
        work = [(k, d, c) for k in args.kernels for d in args.head_dims
                for c in autotune.candidates(k, d)]
    else:
        work = [(k, d, configs.default(k, d)) for k in args.kernels for d in args.head_dims]
    print(HEADER, flush=True)
    bad = 0
    for s in collect(work, args.jobs):
        print(s.row(), flush=True)
        bad += not s.fits
    if args.check and bad:
        sys.exit(f"{bad} of {len(work)} configs spill, overflow shared memory or fail to compile")


if __name__ == "__main__":
    main()
