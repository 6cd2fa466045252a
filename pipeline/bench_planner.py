"""Time per labeled round of the seed-sized round under the memory planner, beside fixed plans.

    python -m mgd.pipeline.bench_planner --out planner.json
    python -m mgd.pipeline.bench_planner --programs auto,auto:16GB,frugal:2,frugal:64 --out p.json

The round is the seed's labeling round (GPT-2-small shape, k=64 rows of L=128, 16 inner
Adam steps, target batch 64) with RANDOM parameters: the figures measure cost, not
quality. Each program runs in a fresh process, so `peak_bytes_in_use` is its own:

- `auto` / `auto:BUDGET`: the planner's choice for the device's memory or for BUDGET
  (e.g. 16GB), with `--rounds-to-label` rounds to label (it may batch several per device);
- `PLAN:MB`: a fixed program, remat plan PLAN (`oracle.PLANS`: lean, frugal, keep_all)
  at gradient micro-batch MB (a divisor of k; `PLAN:all` for all k rows at once).

The figure to compare is `round_s`: seconds per round, the program's time for its rounds
at once divided by their number. Results are written to --out after every program.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from mgd.pipeline.bench_oracle import SHAPES, run_child, timed_calls

DEFAULT_PROGRAMS = "auto,auto:16GB,frugal:2,frugal:64"


def _log(msg):
    print(f"[bench_planner {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_program(text: str) -> tuple[str, str | None, int | None]:
    """'auto' | 'auto:16GB' | 'PLAN:MB' | 'PLAN:all' -> (kind, budget or plan, micro-batch)."""
    from mgd.pipeline import oracle
    from mgd.pipeline.units import parse_bytes

    head, _, tail = text.partition(":")
    if head == "auto":
        if tail:
            parse_bytes(tail)  # raises ValueError naming the unit
        return "auto", tail or None, None
    if head not in oracle.PLANS:
        raise ValueError(f"program {text!r}: expected auto[:BUDGET] or PLAN:MB with PLAN one of "
                         f"{', '.join(sorted(oracle.PLANS))}")
    if tail == "all":
        return "fixed", head, None
    if not tail.isdigit() or int(tail) < 1:
        raise ValueError(f"program {text!r}: the micro-batch after ':' must be a positive "
                         "integer or 'all'")
    return "fixed", head, int(tail)


def measure(program: str, k: int, seq_len: int, inner_steps: int, target_batch: int,
            rounds_to_label: int, repeats: int, impl: str, shape: str,
            compute_dtype: str = "bfloat16", layer_loop: str = "scan") -> dict:
    """In the child process: plan (or take) the program, compile, run, time."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mgd.pipeline import model, oracle
    from mgd.pipeline.planner import Planner, analysed_bytes

    kind, arg, micro = parse_program(program)
    cfg = model.GPTConfig(seq_len=seq_len, attention_impl=impl, compute_dtype=compute_dtype,
                          scan_layers=layer_loop == "scan", **SHAPES[shape])
    oc = oracle.OracleConfig(k=k, inner_steps=inner_steps, inner_lr=1e-4,
                             target_batch=target_batch, warm_start=False)
    out = {"program": program, "impl": impl, "shape": shape, "k": k, "seq_len": seq_len,
           "inner_steps": inner_steps, "target_batch": target_batch,
           "compute_dtype": compute_dtype, "layer_loop": layer_loop,
           "params": "random (cost measurement only)",
           "device": str(jax.devices()[0]), "jax": jax.__version__}
    t0 = time.perf_counter()
    if kind == "auto":
        oc = dataclasses.replace(oc, auto_plan=True, memory_budget=arg)
        planner = Planner.for_device(cfg, oc, target_batch, rounds_to_label)
        if planner.budget is None:
            return {**out, "status": "skipped",
                    "reason": "no memory limit known on this device: give auto:BUDGET"}
        run_oc = planner.plan()
        out["plan"] = planner.metadata()
    else:
        target_micro = micro if micro and target_batch % micro == 0 else None
        run_oc = dataclasses.replace(oc, remat=oracle.PLANS[arg], micro_batch=micro,
                                     target_micro_batch=target_micro)
    out["planning_s"] = time.perf_counter() - t0
    rounds = run_oc.rounds_per_device
    out.update(remat=str(run_oc.remat), micro_batch=run_oc.micro_batch, rounds_at_once=rounds)
    params = model.init_params(cfg, jax.random.key(0))
    # Round r's rows depend on r alone, so programs of different batching see the same round 0.
    rngs = [np.random.default_rng([0, r]) for r in range(rounds)]
    train = jnp.asarray(np.stack([g.integers(0, cfg.vocab_size, (k, seq_len + 1)) for g in rngs]),
                        jnp.int32)
    target = jnp.asarray(np.stack([g.integers(0, cfg.vocab_size, (target_batch, seq_len + 1))
                                   for g in rngs]), jnp.int32)
    _log(f"{program}: compiling ({rounds} round(s) at once, micro-batch {run_oc.micro_batch})")
    t0 = time.perf_counter()
    compiled = oracle.make_rounds_fn(cfg, run_oc).lower(params, train, target).compile()
    out["compile_s"] = time.perf_counter() - t0
    est = analysed_bytes(compiled)
    if est is not None:   # XLA's estimate beside the measured peak: how good a proxy it is
        out["estimate_gb"] = est["bytes"] / 1e9
    out["first_call_s"], calls, (tau, _) = timed_calls(
        compiled, (params, train, target), repeats, f"{program} ({rounds} round(s))")
    times = [seconds / rounds for seconds in calls]
    tau = np.asarray(tau, np.float64)
    out.update(status="ok", round_s=float(np.median(times)) if times else out["first_call_s"] / rounds,
               round_s_all=times, tau_finite=bool(np.all(np.isfinite(tau))),
               tau_round0=[float(x) for x in tau[0]])
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
        out["peak_gb"] = stats["peak_bytes_in_use"] / 1e9
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="JSON results file (rewritten after each program)")
    ap.add_argument("--programs", default=DEFAULT_PROGRAMS)
    ap.add_argument("--impl", default="cuda", help="attention implementation")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--inner-steps", type=int, default=16)
    ap.add_argument("--target-batch", type=int, default=64)
    ap.add_argument("--rounds-to-label", type=int, default=64,
                    help="rounds the planner may batch per device (up to its ceiling)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls after the first")
    ap.add_argument("--child-timeout", type=int, default=400)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-small")
    ap.add_argument("--compute-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--layer-loop", default="scan", choices=("scan", "unrolled"),
                    help="the model's layers as a scan or a Python loop (GPTConfig.scan_layers)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child mode: one program here
    args = ap.parse_args(argv)
    for p in [p for p in (args.one or args.programs).split(",") if p]:
        try:
            micro = parse_program(p)[2]
        except ValueError as err:
            ap.error(f"--programs: {err}")
        if micro is not None and args.k % micro:
            ap.error(f"--programs: {p!r}: the micro-batch must divide --k ({args.k})")
    common = dict(k=args.k, seq_len=args.seq_len, inner_steps=args.inner_steps,
                  target_batch=args.target_batch, rounds_to_label=args.rounds_to_label,
                  repeats=args.repeats, impl=args.impl, shape=args.shape,
                  compute_dtype=args.compute_dtype, layer_loop=args.layer_loop)
    if args.one:
        try:
            res = measure(args.one, **common)
        except Exception as err:  # report, do not crash the sweep
            res = {"program": args.one, "status": "error", "error": f"{type(err).__name__}: {err}"[:2000]}
        print("RESULT " + json.dumps(res), flush=True)
        return
    if args.out is None:
        ap.error("--out is required")
    results = {"note": f"random {args.shape}-shaped parameters: cost figures only",
               "bar": "auto <= 1.5 s per round on one H100; auto:16GB <= 4 s at <= 16 GB peak",
               "runs": []}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, args.out)

    for program in [p for p in args.programs.split(",") if p]:
        cmd = [sys.executable, "-m", "mgd.pipeline.bench_planner", "--one", program]
        for name, value in common.items():
            cmd += [f"--{name.replace('_', '-')}", str(value)]
        res = run_child(cmd, args.child_timeout, {"program": program}, _log)
        results["runs"].append(res)
        save()
        _log(f"{program}: {res.get('status')} round_s={res.get('round_s')} "
             f"peak_gb={res.get('peak_gb')} {res.get('reason') or res.get('error') or ''}")
    _log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
