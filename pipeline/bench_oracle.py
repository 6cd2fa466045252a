"""Memory and time of one metagradient labeling round, per attention implementation.

    python -m mgd.pipeline.bench_oracle --out results.json

A GPT-2-small-shaped model (12 layers, width 768, 12 heads, vocab 50257) with
RANDOM parameters (the figures measure cost, not quality): one round of k=64
rows, T=16 inner Adam steps, first at L=128 for every implementation, then at
L=2048 with the fastest one. Each measurement runs in a fresh process, so
`peak_bytes_in_use` is that configuration's own peak. Results are written to
--out after every measurement, so a time-out still leaves what finished.

    python -m mgd.pipeline.bench_oracle --estimate --impls xla --out est.json

compiles only (no round is run; works on a CPU) and reports XLA's compile-time
memory analysis, temp + argument + output bytes, a proxy for the peak (see
docs/memory.md).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

IMPLS = ("xla", "pallas", "triton", "cuda")
SHAPES = {
    "gpt2-small": dict(vocab_size=50257, n_layer=12, n_head=12, d_model=768),
    # Only for checking this script's wiring on a CPU in seconds.
    "tiny": dict(vocab_size=256, n_layer=1, n_head=2, d_model=32),
}


def _log(msg):
    # stderr, which the children share with the parent: a cut run still shows how far
    # each measurement got. stdout carries only the children's RESULT lines.
    print(f"[bench_oracle {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed_calls(compiled, args, repeats, label):
    """(first call's seconds, seconds of each of `repeats` later calls, the last output):
    each call waited for on its first output."""
    def call():
        t0 = time.perf_counter()
        out = compiled(*args)
        out[0].block_until_ready()
        return time.perf_counter() - t0, out

    first, out = call()
    times = []
    for i in range(repeats):
        seconds, out = call()
        times.append(seconds)
        _log(f"{label}: call {i + 1}/{repeats} {seconds:.2f} s")
    return first, times, out


def measure(impl, seq_len, k, inner_steps, micro_batch, target_batch, segments, repeats,
            shape="gpt2-small", loss_chunk=512, estimate=False, plan="frugal"):
    """Run in the child process: one configuration, returns a JSON-able dict."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mgd import backends
    from mgd.pipeline import model, oracle

    cfg = model.GPTConfig(seq_len=seq_len, attention_impl=impl, loss_chunk=loss_chunk,
                          **SHAPES[shape])
    q = jnp.zeros((micro_batch, seq_len, cfg.n_head, cfg.head_dim), jnp.bfloat16)
    reason = backends.unavailable_reason(impl, q, q, q, causal=True)
    out = {"impl": impl, "seq_len": seq_len, "k": k, "inner_steps": inner_steps,
           "micro_batch": micro_batch, "target_batch": target_batch, "segments": segments,
           "shape": shape, **SHAPES[shape], "loss_chunk": loss_chunk, "plan": plan,
           "params": "random (cost measurement only)", "device": str(jax.devices()[0]),
           "jax": jax.__version__}
    if reason is not None:
        return {**out, "status": "skipped", "reason": reason}
    def init():
        return model.init_params(cfg, jax.random.key(0))

    # Estimating needs shapes only: no 0.5 GB of parameters on the host.
    params = jax.eval_shape(init) if estimate else init()
    out["n_params"] = model.param_count(params)
    rng = np.random.default_rng(0)
    train = jnp.asarray(rng.integers(0, cfg.vocab_size, (k, seq_len + 1)), jnp.int32)
    target = jnp.asarray(rng.integers(0, cfg.vocab_size, (target_batch, seq_len + 1)), jnp.int32)
    oc = oracle.OracleConfig(k=k, inner_steps=inner_steps, inner_lr=1e-4, micro_batch=micro_batch,
                             segments=segments, target_batch=target_batch, remat=plan)
    fn = oracle.make_round_fn(cfg, oc, target_micro_batch=micro_batch)
    _log(f"{impl} L={seq_len}: compiling")
    t0 = time.perf_counter()
    compiled = fn.lower(params, train, target).compile()
    out["compile_s"] = time.perf_counter() - t0
    try:
        ma = compiled.memory_analysis()
        out["compiled_temp_bytes"] = int(ma.temp_size_in_bytes)
        out["compiled_argument_bytes"] = int(ma.argument_size_in_bytes)
        out["compiled_output_bytes"] = int(ma.output_size_in_bytes)
        out["compiled_total_bytes"] = int(ma.temp_size_in_bytes + ma.argument_size_in_bytes
                                          + ma.output_size_in_bytes - ma.alias_size_in_bytes)
    except Exception as err:  # not every backend reports it
        out["memory_analysis_error"] = repr(err)
    if estimate:
        _log(f"{impl} L={seq_len}: compiled in {out['compile_s']:.1f} s, "
             f"estimated {out.get('compiled_total_bytes', 0) / 1e9:.2f} GB")
        return {**out, "status": "estimated"}
    _log(f"{impl} L={seq_len}: compiled in {out['compile_s']:.1f} s; first round")
    out["first_round_s"], times, (tau, phi) = timed_calls(
        compiled, (params, train, target), repeats, f"{impl} L={seq_len}")
    tau = np.asarray(tau, np.float64)
    out.update(status="ok", round_s=min(times) if times else out["first_round_s"],
               round_s_all=times, phi=float(phi), tau_finite=bool(np.all(np.isfinite(tau))),
               tau_abs_mean=float(np.abs(tau).mean()))
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
        out["peak_gib"] = stats["peak_bytes_in_use"] / 2**30
    return out


def _child(args):
    try:
        res = measure(args.one, args.seq_len, args.k, args.inner_steps, args.micro_batch,
                      args.target_batch, args.segments, args.repeats, args.shape,
                      args.loss_chunk, args.estimate, args.plan)
    except Exception as err:  # report, do not crash the sweep
        res = {"impl": args.one, "seq_len": args.seq_len, "status": "error",
               "error": f"{type(err).__name__}: {str(err)[:2000]}"}
    print("RESULT " + json.dumps(res), flush=True)


def run_child(cmd, timeout, ident, log=_log):
    """Run one measurement in a fresh process; its RESULT line as a dict (with `ident`'s
    keys on a time-out or crash). The child's other stdout lines go to stderr."""
    log("running: " + " ".join(cmd[1:]))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**ident, "status": "timeout", "timeout_s": timeout}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
            res["wall_s"] = time.perf_counter() - t0
            return res
        print(line, file=sys.stderr, flush=True)
    return {**ident, "status": "crashed", "returncode": proc.returncode,
            "see": "the log (the child's stderr)"}


def _run_child(impl, seq_len, micro_batch, args, repeats):
    cmd = [sys.executable, "-m", "mgd.pipeline.bench_oracle", "--one", impl,
           "--seq-len", str(seq_len), "--k", str(args.k), "--inner-steps", str(args.inner_steps),
           "--micro-batch", str(micro_batch), "--target-batch", str(args.target_batch),
           "--repeats", str(repeats), "--shape", args.shape,
           "--loss-chunk", str(args.loss_chunk), "--plan", args.plan]
    if args.segments:
        cmd += ["--segments", str(args.segments)]
    if args.estimate:
        cmd += ["--estimate"]
    return run_child(cmd, args.child_timeout, {"impl": impl, "seq_len": seq_len})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="JSON results file (rewritten after each run)")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--short", type=int, default=128, help="L of the per-implementation sweep")
    ap.add_argument("--long", type=int, default=2048, help="L of the run with the fastest impl (0: skip)")
    ap.add_argument("--long-impl", default=None, help="force the implementation of the long run")
    ap.add_argument("--long-first", action="store_true",
                    help="run the long length first (needs --long-impl), so a time cap "
                         "cuts the per-implementation sweep rather than the long run")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--inner-steps", type=int, default=16)
    # 2, not 4: with 4 the L=128 round is estimated at 16.5 GB, over the 16 GB bar
    # (docs/memory.md).
    ap.add_argument("--micro-batch-short", type=int, default=2,
                    help="rows per gradient micro-batch at the short length")
    ap.add_argument("--micro-batch-long", type=int, default=1)
    ap.add_argument("--loss-chunk", type=int, default=512, help="tokens per cross-entropy chunk")
    ap.add_argument("--target-batch", type=int, default=64)
    ap.add_argument("--segments", type=int, default=0, help="outer remat segments (0: ~sqrt(T))")
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds after the first")
    ap.add_argument("--repeats-long", type=int, default=1)
    ap.add_argument("--child-timeout", type=int, default=420)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-small")
    # frugal: the plan the 16 GB bar of docs/memory.md is measured with.
    ap.add_argument("--plan", choices=("lean", "frugal"), default="frugal",
                    help="the round's remat plan (oracle.PLANS)")
    ap.add_argument("--estimate", action="store_true",
                    help="compile only and report XLA's memory analysis (no run, no long L)")
    # Child mode: one measurement in this process.
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--micro-batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        args.segments = args.segments or None
        return _child(args)
    if args.out is None:
        ap.error("--out is required")
    if args.long_first and not args.long_impl:
        ap.error("--long-first needs --long-impl")

    results = {"note": f"random {args.shape}-shaped parameters: cost figures only",
               "bar": "L=128 round <= 16 GB; L=2048 must fit one H200", "runs": []}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, args.out)

    save()

    def run_long(impl):
        res = _run_child(impl, args.long, args.micro_batch_long, args, args.repeats_long)
        results["runs"].append(res)
        save()
        _log(f"{impl} L={args.long}: {res.get('status')} round_s={res.get('round_s')} "
             f"peak_gib={res.get('peak_gib')} {res.get('error') or ''}")

    long_wanted = bool(args.long) and not args.estimate
    if long_wanted and args.long_first:
        run_long(args.long_impl)
    for impl in [s for s in args.impls.split(",") if s]:
        res = _run_child(impl, args.short, args.micro_batch_short, args, args.repeats)
        results["runs"].append(res)
        save()
        _log(f"{impl} L={args.short}: {res.get('status')} round_s={res.get('round_s')} "
             f"peak_gib={res.get('peak_gib')} {res.get('reason') or res.get('error') or ''}")
    if long_wanted and not args.long_first:
        ok = [r for r in results["runs"] if r.get("status") == "ok"]
        impl = args.long_impl or (min(ok, key=lambda r: r["round_s"])["impl"] if ok else None)
        if impl is None:
            _log("no implementation succeeded at the short length; skipping the long run")
        else:
            run_long(impl)
    _log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
