"""Time one metagradient round per shape, attention implementation and remat plan, side by side.

    python -m bench.round_timing --impls pallas,cuda,standin --plans lean,frugal \\
        --shape e2e:16384 --shape e2e:32768 --shape gpt2s:8192 --shape gpt2s:16384 --out DIR

Each configuration runs in a fresh process (so its peak memory is its own): compile,
one warm-up round, then the median of --repeats timed rounds; peak memory from
`device.memory_stats()`. `standin` replaces attention by `v + 1e-6 (q + k)`, so its
round is what the round costs outside attention. Out of memory is recorded, not fatal.
Writes DIR/round_timing.csv and DIR/round_timing.md after every configuration. The
shapes are `mgd.pipeline.round_shapes.SHAPES`. An implementation may carry switches of
its backend after a "+" (`cuda+split`, `cuda+fused`, `cuda+bwd64`; see VARIANTS), set in its process.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("round_timing")

# Backend switches an implementation name may carry after "+" (bindings/cuda.py says what
# each does): the same kernels, issued or reduced another way.
VARIANTS = {
    "split": {"MGD_CUDA_SPLIT_CALLS": "1"},
    "onecall": {"MGD_CUDA_SPLIT_CALLS": "0"},
    "fused": {"MGD_CUDA_DETERMINISTIC": "0"},
    # 64-row blocks in the bf16 D=64 backward (needs a build with MGD_BWD_D64_VARIANTS).
    "bwd64": {"MGD_BWD_D64_BLOCKS": "64x64"},
}


def parse_impl(name: str) -> tuple[str, dict]:
    """"cuda+split" -> ("cuda", {"MGD_CUDA_SPLIT_CALLS": "1"}); ValueError naming an unknown part."""
    base, *variants = name.split("+")
    env = {}
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r} in {name!r} (one of {', '.join(VARIANTS)})")
        env.update(VARIANTS[v])
    return base, env

FIELDS = ("shape", "seq_len", "impl", "plan", "status", "median_s", "min_s", "repeats",
          "compile_s", "peak_gib", "compiled_temp_gib", "attention_share", "device", "error")


def build_round(shape_spec: str, impl: str, plan: str):
    """The jitted round of one configuration and its inputs (params, train rows, target rows).
    A variant's backend switches are read when the round traces: lower it inside
    `switches(impl)`."""
    import jax
    import numpy as np

    from mgd.pipeline import model, oracle
    from mgd.pipeline.round_shapes import parse_shape

    shape, seq_len = parse_shape(shape_spec)
    impl = parse_impl(impl)[0]
    cfg = shape.model_config(seq_len, impl)
    fn = oracle.make_round_fn(cfg, shape.oracle_config(oracle.RematPlan.named(plan)))
    params = model.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    train = rng.integers(0, cfg.vocab_size, (shape.k, seq_len + 1)).astype(np.int32)
    target = rng.integers(0, cfg.vocab_size, (shape.target_rows, seq_len + 1)).astype(np.int32)
    return fn, (params, train, target)


@contextmanager
def switches(impl: str):
    """The variant's backend switches set for the block, the environment restored after."""
    env = parse_impl(impl)[1]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def measure(shape_spec: str, impl: str, plan: str, repeats: int) -> dict:
    """One configuration, in this process (its backend switches set only while it runs)."""
    with switches(impl):
        return _measure(shape_spec, impl, plan, repeats)


def _measure(shape_spec: str, impl: str, plan: str, repeats: int) -> dict:
    import jax

    from mgd.pipeline.round_shapes import parse_shape

    shape, seq_len = parse_shape(shape_spec)
    out = {"shape": shape.name, "seq_len": seq_len, "impl": impl, "plan": plan,
           "device": str(jax.devices()[0].device_kind)}
    try:
        fn, (params, train, target) = build_round(shape_spec, impl, plan)
        t0 = time.perf_counter()
        compiled = fn.lower(params, train, target).compile()
        out["compile_s"] = time.perf_counter() - t0
        analysis = compiled.memory_analysis()
        if analysis is not None:
            out["compiled_temp_gib"] = analysis.temp_size_in_bytes / 2**30
        jax.block_until_ready(compiled(params, train, target))   # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(params, train, target))
            times.append(time.perf_counter() - t0)
    except Exception as err:  # noqa: BLE001 - out of memory is a result; the rest is too, labeled
        text = f"{type(err).__name__}: {err}"
        oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
        return {**out, "status": "oom" if oom else "error", "error": text[:500]}
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {**out, "status": "ok", "median_s": statistics.median(times), "min_s": min(times),
            "repeats": repeats, "peak_gib": None if peak is None else peak / 2**30}


def _run_child(shape_spec, impl, plan, args) -> dict:
    cmd = [sys.executable, "-m", "bench.round_timing", "--one", "--shape", shape_spec,
           "--impls", impl, "--plans", plan, "--repeats", str(args.repeats)]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {"shape": shape_spec, "impl": impl, "plan": plan, "status": "timeout"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"shape": shape_spec, "impl": impl, "plan": plan, "status": "crashed",
            "error": f"exit {proc.returncode}, see the log"}


def _with_shares(rows):
    """Attention's share of each round: 1 - (stand-in round) / (this round), same shape and plan."""
    standin = {(r["shape"], r["seq_len"], r["plan"]): r.get("median_s") for r in rows
               if r.get("impl") == "standin" and r.get("status") == "ok"}
    for r in rows:
        base = standin.get((r.get("shape"), r.get("seq_len"), r.get("plan")))
        if base and r.get("status") == "ok" and r["impl"] != "standin":
            r["attention_share"] = 1.0 - base / r["median_s"]
    return rows


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write(rows, out: Path) -> None:
    rows = _with_shares(rows)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "round_timing.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    cols = ("shape", "seq_len", "impl", "plan", "status", "median_s", "peak_gib",
            "compiled_temp_gib", "attention_share", "compile_s")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    (out / "round_timing.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", action="append", help="name:seq_len, repeatable (e2e:16384)")
    ap.add_argument("--impls", default="pallas,cuda,standin")
    ap.add_argument("--plans", default="lean,frugal")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up")
    ap.add_argument("--out", type=Path, help="folder for round_timing.csv and .md")
    ap.add_argument("--child-timeout", type=int, default=900)
    ap.add_argument("--in-process", action="store_true",
                    help="measure in this process (peaks then accumulate; for a CPU check)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[round_timing %(asctime)s] %(message)s")

    from mgd.pipeline.model import STANDIN
    from mgd.pipeline.oracle import PLANS
    from mgd.pipeline.round_shapes import parse_shape

    impls = [s for s in args.impls.split(",") if s]
    plans = [s for s in args.plans.split(",") if s]
    known_impls = ("xla", "pallas", "triton", "cuda", STANDIN)
    for impl in impls:
        try:
            base, _ = parse_impl(impl)
        except ValueError as err:
            ap.error(f"--impls: {err}")
        if base not in known_impls:
            ap.error(f"--impls: unknown implementation {base!r} (one of {', '.join(known_impls)})")
    for plan in plans:
        if plan not in PLANS:
            ap.error(f"--plans: unknown plan {plan!r} (one of {', '.join(PLANS)})")
    if not args.shape:
        ap.error("--shape is required (name:seq_len, e.g. e2e:16384)")
    for spec in args.shape:
        try:
            parse_shape(spec)
        except ValueError as err:
            ap.error(str(err))
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.one:
        res = measure(args.shape[0], impls[0], plans[0], args.repeats)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    if args.out is None:
        ap.error("--out is required")
    rows = []
    for spec in args.shape:
        for impl in impls:
            for plan in plans:
                log.info("%s %s %s", spec, impl, plan)
                res = (measure(spec, impl, plan, args.repeats) if args.in_process
                       else _run_child(spec, impl, plan, args))
                log.info("-> %s median %s s, peak %s GiB %s", res.get("status"), res.get("median_s"),
                         res.get("peak_gib"), res.get("error") or "")
                rows.append(res)
                write(rows, args.out)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    sys.exit(main())
