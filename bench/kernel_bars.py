"""The kernel bars, side by side in one process: forward, backward and the full HVP of
every implementation at the bar shapes, with cuDNN's fused attention
(`jax.nn.dot_product_attention(implementation="cudnn")`) as the industrial anchor.

    python -m bench.kernel_bars --out DIR [--lengths 4096 8192 ...] [--heads-dims 16:128 12:64]
                                [--stages forward backward hvp] [--budget-s 300]

bf16, causal, B=1. Each cell: compile and warm up outside the timed region, then the
median time per call over batches of calls dispatched back to back (only a batch's last
call is waited on, so host dispatch overlaps GPU work as inside a jitted program), two
input sets rotated. Effective TFLOP/s count the contract's products (forward 2, backward 5, HVP 24:
forward, backward, double backward and the backward of the forward's path), each
2 * B * H * T^2 * D FLOP, halved for causal. Appends to DIR/bars.jsonl (a row per cell, as
it is measured) and writes DIR/bars.md from every row of this commit there (tables,
ratios and the bars of issue 19), so calls for several stages share one report.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import mgd
from bench import harness

PRODUCTS = {"forward": 2, "backward": 5, "hvp": 24}
IMPLS = {
    "forward": ("cuda", "pallas", "triton", "cudnn"),
    "backward": ("cuda", "cuda-fused", "pallas", "triton", "cudnn"),
    "hvp": ("cuda", "pallas", "triton"),
}
REFERENCES = ("pallas", "triton")
# Issue 19's bars: effective TFLOP/s at T >= 8192 by head dim, and the HVP's ratio.
TFLOPS_BARS = {"forward": {128: 550, 64: 400}, "backward": {128: 450, 64: 350}}
HVP_BAR = 1.45
BAR_FROM_T = 8192


@dataclass(frozen=True)
class Cell:
    stage: str
    impl: str
    h: int
    d: int
    t: int
    ms: float | None
    tflops: float | None
    error: str | None = None


def _flop(stage, h, d, t):
    return PRODUCTS[stage] * 2 * h * t * t * d / 2


def _median_ms(fn, arg_sets, batch_s=0.02, batches=7):
    """Median milliseconds per call. Calls are dispatched back to back and only the last
    of a batch is waited on, so host dispatch overlaps the GPU work, as it does inside a
    jitted program; a batch lasts about `batch_s`."""
    for args in arg_sets:  # compile and warm up outside the timed region
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[0]))
    n = max(2, min(200, round(batch_s / max(time.perf_counter() - t0, 1e-6))))
    per_call = []
    for _ in range(batches + 1):  # the first batch ramps the clocks and is dropped
        t0 = time.perf_counter()
        for i in range(n):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t0) / n)
    return float(np.median(per_call[1:])) * 1e3


def _cudnn(q, k, v, scale):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale, implementation="cudnn")


def _function_and_args(stage, impl, sets, saved, scale):
    """The jitted function of one cell and its rotated argument sets; `saved` holds each
    set's forward (o, lse) for the backward."""
    if stage == "forward":
        if impl == "cudnn":
            return jax.jit(partial(_cudnn, scale=scale)), [s[:3] for s in sets]
        return jax.jit(partial(mgd.attention_forward, causal=True, impl=impl)), [s[:3] for s in sets]
    if stage == "backward":
        if impl == "cudnn":
            vjps = [(jax.vjp(partial(_cudnn, scale=scale), *s[:3])[1], s[3]) for s in sets]
            return jax.jit(lambda g, do: g(do)), vjps
        args = [(q, k, v, o, lse, do) for (q, k, v, do, *_), (o, lse) in zip(sets, saved)]
        if impl.startswith("cuda"):
            from mgd.bindings import cuda
            fn = partial(cuda.kernel_backward, causal=True, scale=scale,
                         deterministic=impl == "cuda")
            return jax.jit(fn), args
        return jax.jit(partial(mgd.attention_backward, causal=True, impl=impl)), args
    return (jax.jit(harness.hvp_function(impl, causal=True)),
            [(q, k, v, *rest) for q, k, v, _do, *rest in sets])


def _input_sets(h, d, t, n_sets=2):
    rng = np.random.default_rng(1000 * t + d)
    sets = []
    for _ in range(n_sets):
        q, k, v, do = (jnp.asarray(rng.standard_normal((1, t, h, d)), jnp.bfloat16) for _ in range(4))
        c, uq, uk, uv = (jnp.asarray(rng.standard_normal((1, t, h, d)), jnp.float32) for _ in range(4))
        sets.append((q, k, v, do, c, uq, uk, uv))
    return sets


def measure(stages, heads_dims, lengths, out, budget_s):
    rows_path = out / "bars.jsonl"
    meta = {"gpu": harness.device_name(), "commit": harness.commit(), "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    cells = []
    deadline = time.perf_counter() + budget_s
    for h, d in heads_dims:
        for t in lengths:
            sets = _input_sets(h, d, t)
            scale = d ** -0.5
            # The backward's o and lse, once per shape for every implementation (the same
            # contract, so the Pallas forward's serve all of them).
            forward = jax.jit(partial(mgd.attention_forward, causal=True, impl="pallas"))
            saved = [forward(*s[:3]) for s in sets] if "backward" in stages else None
            for stage in stages:
                for impl in IMPLS[stage]:
                    if time.perf_counter() > deadline:
                        print(f"budget reached: stopping before {stage} {impl} H={h} D={d} T={t}", flush=True)
                        return cells, meta
                    try:
                        fn, args = _function_and_args(stage, impl, sets, saved, scale)
                        ms = _median_ms(fn, args)
                        cell = Cell(stage, impl, h, d, t, ms, _flop(stage, h, d, t) / ms / 1e9)
                    except Exception as err:  # noqa: BLE001 - one failed cell must not stop the table
                        why = f"{type(err).__name__}: {str(err)[:120]}"
                        cell = Cell(stage, impl, h, d, t, None, None, why)
                    cells.append(cell)
                    with rows_path.open("a") as f:
                        f.write(json.dumps({**asdict(cell), **meta}) + "\n")
                    shown = f"{cell.ms:.3f} ms {cell.tflops:.1f} TF/s" if cell.ms else cell.error
                    print(f"{stage:9s} {impl:11s} H={h:2d} D={d:3d} T={t:6d}: {shown}", flush=True)
    return cells, meta


def load_cells(path, commit):
    """The cells of `commit` in a bars.jsonl, the last measurement of each winning."""
    cells = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("commit") == commit:
            cell = Cell(**{f: row[f] for f in Cell.__dataclass_fields__})
            cells[(cell.stage, cell.impl, cell.h, cell.d, cell.t)] = cell
    return list(cells.values())


def report(cells, meta):
    """Markdown: per stage a table of TFLOP/s, cuda over the best reference and over cuDNN,
    then each bar of issue 19 met or missed."""
    by = {(c.stage, c.impl, c.h, c.d, c.t): c for c in cells}
    lines = [f"# Kernel bars: {meta['gpu']}, commit {meta['commit']}, jax {meta['jax']}, {meta['date']}",
             "", "bf16, causal, B=1; through JAX, median time per call of back-to-back calls; "
             "effective TFLOP/s "
             "(forward 2, backward 5, HVP 24 products, halved for causal).", ""]
    verdicts = []
    for stage in ("forward", "backward", "hvp"):
        impls = [i for i in IMPLS[stage] if any(c.stage == stage and c.impl == i for c in cells)]
        if not impls:
            continue
        lines += [f"## {stage}", "", "| (H, D) | T | " + " | ".join(f"{i} TF/s" for i in impls)
                  + " | cuda / best reference | cuda / cudnn |",
                  "|---|---|" + "---|" * (len(impls) + 2)]
        shapes = sorted({(c.h, c.d, c.t) for c in cells if c.stage == stage}, key=lambda s: (-s[1], s[2]))
        for h, d, t in shapes:
            row = [by.get((stage, i, h, d, t)) for i in impls]
            tf = [f"{c.tflops:.0f}" if c and c.tflops else "n/a" for c in row]
            ours = [by.get((stage, i, h, d, t)) for i in ("cuda", "cuda-fused")]
            ours_ms = min((c.ms for c in ours if c and c.ms), default=None)
            refs = [by.get((stage, i, h, d, t)) for i in REFERENCES]
            best_ref = min((c.ms for c in refs if c and c.ms), default=None)
            cudnn = by.get((stage, "cudnn", h, d, t))
            ratio = f"{best_ref / ours_ms:.2f}x" if ours_ms and best_ref else "n/a"
            vs_cudnn = f"{cudnn.ms / ours_ms:.2f}x" if ours_ms and cudnn and cudnn.ms else "n/a"
            lines.append(f"| ({h}, {d}) | {t} | " + " | ".join(tf) + f" | {ratio} | {vs_cudnn} |")
            if t < BAR_FROM_T or not ours_ms:
                continue
            name = f"{stage} ({h}, {d}) T={t}"
            if stage in TFLOPS_BARS:
                bar = TFLOPS_BARS[stage][d]
                got = _flop(stage, h, d, t) / ours_ms / 1e9
                verdicts.append(f"- {name}: {got:.0f} TF/s against {bar}: "
                                f"{'met' if got >= bar else 'missed'}")
                if cudnn and cudnn.ms:
                    verdicts.append(f"- {name}: {cudnn.ms / ours_ms:.2f}x cuDNN (bar 1.00x): "
                                    f"{'met' if ours_ms <= cudnn.ms else 'missed'}")
            elif best_ref:
                verdicts.append(f"- {name}: {best_ref / ours_ms:.2f}x the best reference against "
                                f"{HVP_BAR}x: {'met' if best_ref / ours_ms >= HVP_BAR else 'missed'}")
        lines.append("")
    errors = [c for c in cells if c.error]
    lines += ["## Bars (T >= 8192; backward: the faster of our two modes)", ""] + verdicts + [""]
    if errors:
        lines += ["## Cells that did not run", ""]
        lines += [f"- {c.stage} {c.impl} ({c.h}, {c.d}) T={c.t}: {c.error}" for c in errors]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 32768])
    parser.add_argument("--heads-dims", nargs="+", default=["16:128", "12:64"])
    parser.add_argument("--stages", nargs="+", default=["forward", "backward", "hvp"],
                        choices=sorted(PRODUCTS))
    parser.add_argument("--budget-s", type=float, default=600.0,
                        help="stop starting new cells after this many seconds")
    args = parser.parse_args(argv)
    heads_dims = []
    for hd in args.heads_dims:
        try:
            h, d = (int(x) for x in hd.split(":"))
        except ValueError:
            parser.error(f"--heads-dims wants H:D pairs such as 16:128, got {hd!r}")
        heads_dims.append((h, d))
    args.out.mkdir(parents=True, exist_ok=True)
    _, meta = measure(args.stages, heads_dims, args.lengths, args.out, args.budget_s)
    text = report(load_cells(args.out / "bars.jsonl", meta["commit"]), meta)
    (args.out / "bars.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
