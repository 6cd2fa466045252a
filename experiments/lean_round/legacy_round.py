"""Time one metagradient round in the code of commit 831e564 (before the lean round), with
the same protocol as `bench/round_timing.py`: compile, one warm-up round, the median of
--repeats timed rounds, peak device memory; `--impl standin` replaces attention by
`v + 1e-6 (q + k)`. Prints one JSON line.

Run it against an export of that commit laid out as the installed package would be
(`mgd/`, with `pipeline/`, `reference/`, `bindings/` inside it), e.g. through
`experiments/lean_round/run_device.sh`:

    PYTHONPATH=/tmp/old831 python experiments/lean_round/legacy_round.py --shape e2e:16384 --impl pallas

The shapes repeat `mgd.pipeline.round_shapes.SHAPES` (e2e, gpt2s), which that commit lacks.
"""
import argparse
import json
import statistics
import sys
import time

# An editable install of the current package puts its import finder first on sys.meta_path,
# which would shadow the exported commit on PYTHONPATH.
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "ScikitBuildRedirectingFinder"]

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = {  # (vocab, layers, heads, width, k, target rows, inner steps, loss chunk, micro-batch)
    "e2e": (8192, 4, 8, 512, 4, 4, 2, 1024, None),
    "gpt2s": (50257, 12, 12, 768, 4, 4, 2, 512, 1),
    "toy": (256, 2, 2, 32, 2, 2, 2, 64, 1),  # seconds on a CPU, for checking the wiring
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", required=True, help="name:seq_len, e.g. e2e:16384")
    ap.add_argument("--impl", required=True, help="pallas, cuda, xla, triton or standin")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import mgd
    from mgd.pipeline import model, oracle

    name, _, length = args.shape.partition(":")
    vocab, layers, heads, width, k, rows, steps, chunk, micro = SHAPES[name]
    seq_len = int(length)
    impl = args.impl
    if impl == "standin":
        mgd.attention = lambda q, k, v, causal=True, impl=None, **_: v + 1e-6 * (q + k)
        impl = "xla"
    cfg = model.GPTConfig(vocab_size=vocab, seq_len=seq_len, n_layer=layers, n_head=heads,
                          d_model=width, attention_impl=impl, loss_chunk=chunk)
    out = {"commit": "831e564", "shape": name, "seq_len": seq_len, "impl": args.impl,
           "plan": "831e564", "micro_batch": micro, "device": jax.devices()[0].device_kind}

    def round_fn(params, train, target):
        return oracle.metagradient_round(params, cfg, train, target, steps, 1e-4,
                                         micro_batch=micro, target_micro_batch=micro)
    try:
        params = model.init_params(cfg, jax.random.PRNGKey(0))
        rng = np.random.default_rng(0)
        train = jnp.asarray(rng.integers(0, vocab, (k, seq_len + 1)), jnp.int32)
        target = jnp.asarray(rng.integers(0, vocab, (rows, seq_len + 1)), jnp.int32)
        t0 = time.perf_counter()
        compiled = jax.jit(round_fn).lower(params, train, target).compile()
        out["compile_s"] = time.perf_counter() - t0
        jax.block_until_ready(compiled(params, train, target))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(params, train, target))
            times.append(time.perf_counter() - t0)
    except Exception as err:  # noqa: BLE001 - an out-of-memory is a result too
        text = f"{type(err).__name__}: {err}"
        out.update(status="oom" if "RESOURCE_EXHAUSTED" in text else "error", error=text[:400])
        print("RESULT " + json.dumps(out), flush=True)
        return
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    out.update(status="ok", median_s=statistics.median(times), min_s=min(times),
               repeats=args.repeats, peak_gib=None if peak is None else peak / 2**30)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
