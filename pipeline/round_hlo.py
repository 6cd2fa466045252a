"""What the compiled stand-in round does outside attention: a census of its optimized HLO.

    python -m mgd.pipeline.round_hlo --shape e2e:512 --shape toy:64 [--time]

compiles the round with attention replaced by the stand-in (`model.STANDIN`) on this
machine's backend, parses the optimized HLO text and counts, per round (instructions in
loop bodies multiplied by the loops' known trip counts, fusion bodies by their fusion's):
layout copies and transposes (top-level, and fusions whose root is one), float
converts (inside fusions too, float32 <-> bfloat16 and all of them, those of at least
1 MiB apart) and the bytes each writes; beside them the round's dense forward-equivalents
(`round_budget`) and, with --time, the median wall time of a few rounds. The counts are
the CPU compiler's fusion decisions, a guide to the GPU program, not a profile of it.
"""
from __future__ import annotations

import argparse
import logging
import re
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Census", "census", "round_hlo_text", "main"]

log = logging.getLogger(__name__)

_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
          "s8": 1, "u8": 1, "pred": 1, "s64": 8, "u64": 8}
_HEADER = re.compile(r"^(ENTRY )?%(\S+) .*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT )?%(\S+) = (\(.*?\)|\w+\[[\d,]*\](?:\{[^}]*\})?) (\w[\w-]*)\((.*)$")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_LARGE = 1 << 20
_IGNORED = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while",
            "conditional", "call", "after-all", "opt-barrier"}


def _array_bytes(type_text: str) -> int:
    """Bytes of an array type (0 for tuples and unknown element types)."""
    if type_text.startswith("("):
        return 0
    m = _ARRAY.match(type_text)
    if not m or m.group(1) not in _BYTES:
        return 0
    dims = [int(d) for d in m.group(2).split(",") if d]
    return _BYTES[m.group(1)] * int(np.prod(dims, dtype=np.int64))


def _dtype(type_text: str) -> str:
    m = _ARRAY.match(type_text)
    return m.group(1) if m else ""


@dataclass
class _Instr:
    name: str
    type: str
    op: str
    rest: str
    root: bool


@dataclass
class Census:
    """Per round, multiplied by trip counts; bytes are what the instructions write."""
    copies: int = 0
    copy_bytes: int = 0
    transposes: int = 0                 # top-level transposes and fusions rooted in one
    transpose_bytes: int = 0
    converts: int = 0                   # every float convert, in fusions or not
    convert_bytes: int = 0
    # Of at least 1 MiB. The CPU compiler upcasts bfloat16 matmul operands and elementwise
    # math to float32 itself, so upcasts say little about a GPU; downcasts are the program's.
    downcasts: int = 0                  # float32 -> bfloat16
    downcast_bytes: int = 0
    upcasts: int = 0                    # bfloat16 -> float32
    upcast_bytes: int = 0
    top_level_bytes: int = 0            # everything the top-level instructions write
    unknown_trip_counts: int = 0


def _parse(text: str) -> tuple[dict[str, list[_Instr]], str]:
    comps: dict[str, list[_Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        h = _HEADER.match(line)
        if h and not line.startswith(" "):
            current = h.group(2)
            comps[current] = []
            if h.group(1):
                entry = current
            continue
        if current is None:
            continue
        m = _INSTR.match(line)
        if m:
            comps[current].append(_Instr(m.group(2), m.group(3), m.group(4), m.group(5),
                                         bool(m.group(1))))
    return comps, entry


def _called(instr: _Instr) -> list[tuple[str, int | None]]:
    """(computation, times per call) that `instr` runs: loop bodies with their trip count
    (None when unknown), branches and calls once. Reducers and loop conditions are left out."""
    if instr.op == "while":
        body = re.search(r"body=%([^\s,]+)", instr.rest).group(1)
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.rest)
        return [(body, int(trips.group(1)) if trips else None)]
    if instr.op == "conditional":
        branches = re.search(r"branch_computations=\{([^}]*)\}", instr.rest)
        names = re.findall(r"%([^\s,]+)", branches.group(1)) if branches else []
        names += re.findall(r"(?:true|false)_computation=%([^\s,]+)", instr.rest)
        return [(n, 1) for n in names]
    if instr.op == "call":
        return [(re.search(r"to_apply=%([^\s,]+)", instr.rest).group(1), 1)]
    return []


def _fusion_callee(instr: _Instr) -> str:
    return re.search(r"calls=%([^\s,]+)", instr.rest).group(1)


def _convert_types(instr: _Instr, types: dict[str, str]) -> tuple[str, str]:
    operand = re.match(r"\s*%([^\s,)]+)", instr.rest)
    return _dtype(types.get(operand.group(1), "")) if operand else "", _dtype(instr.type)


def census(text: str) -> Census:
    """Census of an optimized HLO module's text (`compiled.as_text()`)."""
    comps, entry = _parse(text)
    types = {x.name: x.type for instrs in comps.values() for x in instrs}
    out = Census()
    times: dict[str, int] = defaultdict(int)

    def visit(comp: str, n: int) -> None:
        times[comp] += n
        for instr in comps.get(comp, []):
            for callee, trips in _called(instr):
                if trips is None:
                    out.unknown_trip_counts += 1
                visit(callee, n * (trips or 1))

    def converts(comp: str, n: int) -> None:
        for instr in comps.get(comp, []):
            if instr.op == "fusion":
                converts(_fusion_callee(instr), n)
            if instr.op != "convert":
                continue
            src, dst = _convert_types(instr, types)
            if not (src.startswith(("f", "bf")) and dst.startswith(("f", "bf"))):
                continue
            b = _array_bytes(instr.type)
            out.converts += n
            out.convert_bytes += n * b
            if (src, dst) == ("f32", "bf16") and b >= _LARGE:
                out.downcasts += n
                out.downcast_bytes += n * b
            elif (src, dst) == ("bf16", "f32") and b >= _LARGE:
                out.upcasts += n
                out.upcast_bytes += n * b

    visit(entry, 1)
    for comp, n in times.items():
        converts(comp, n)
        for instr in comps[comp]:
            b = _array_bytes(instr.type)
            if instr.op not in _IGNORED:
                out.top_level_bytes += n * b
            root_op = instr.op
            if instr.op == "fusion":
                roots = [x for x in comps.get(_fusion_callee(instr), []) if x.root]
                root_op = roots[0].op if roots else ""
                if root_op == "copy":   # a fused layout change counts with the transposes
                    root_op = "transpose"
            if root_op == "copy":
                out.copies += n
                out.copy_bytes += n * b
            elif root_op == "transpose":
                out.transposes += n
                out.transpose_bytes += n * b
    return out


def round_hlo_text(shape_spec: str, plan: str = "lean", inner_steps: int | None = None):
    """(optimized HLO text of the stand-in round, the compiled round, its inputs)."""
    import jax

    from mgd.pipeline import model, oracle
    from mgd.pipeline.round_shapes import parse_shape

    shape, seq_len = parse_shape(shape_spec)
    cfg = shape.model_config(seq_len, model.STANDIN)
    fn = oracle.make_round_fn(cfg, shape.oracle_config(oracle.RematPlan.named(plan), inner_steps))
    params = model.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    train = rng.integers(0, cfg.vocab_size, (shape.k, seq_len + 1)).astype(np.int32)
    target = rng.integers(0, cfg.vocab_size, (shape.target_rows, seq_len + 1)).astype(np.int32)
    compiled = fn.lower(params, train, target).compile()
    return compiled.as_text(), compiled, (params, train, target)


def _wall_time(compiled, inputs, repeats: int) -> float:
    import jax

    jax.block_until_ready(compiled(*inputs))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _row(spec: str, c: Census, jc, fwd_eq: float, wall: float | None) -> str:
    def n(count, nbytes):
        return f"{count} ({nbytes * 1e-6:.0f} MB)"

    return (f"| {spec} | {n(c.copies, c.copy_bytes)} | {n(c.transposes, c.transpose_bytes)} | "
            f"{n(jc.casts, jc.cast_bytes)} | {n(c.downcasts, c.downcast_bytes)} | "
            f"{n(c.upcasts, c.upcast_bytes)} | {c.top_level_bytes * 1e-6:.0f} MB | {fwd_eq:.2f} | "
            + ("" if wall is None else f"{wall:.3f} s") + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", action="append", default=None,
                    help="name:seq_len (round_shapes.SHAPES); repeatable (default e2e:512, toy:64)")
    ap.add_argument("--plan", default="lean", help="remat plan name")
    ap.add_argument("--inner-steps", type=int, default=None, help="default: the shape's")
    ap.add_argument("--time", type=int, default=0, metavar="N",
                    help="also time N rounds (median, after a warm-up)")
    ap.add_argument("--dump", default=None, help="write each shape's HLO text to DUMP.<shape>.hlo")
    args = ap.parse_args(argv)
    from mgd.pipeline import model, oracle, round_budget
    from mgd.pipeline.round_shapes import parse_shape

    specs = args.shape or ["e2e:512", "toy:64"]
    try:
        plan = oracle.RematPlan.named(args.plan)
        shapes = [parse_shape(s) for s in specs]
    except ValueError as err:
        ap.error(str(err))
    if args.inner_steps is not None and args.inner_steps < 1:
        ap.error(f"--inner-steps must be >= 1, got {args.inner_steps}")
    if args.time < 0:
        ap.error(f"--time must be >= 0, got {args.time}")
    print("| shape | copies | transposes | casts in the jaxpr | HLO downcasts | HLO upcasts | "
          "top-level bytes | dense fwd-eq. | CPU wall |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec, (shape, seq_len) in zip(specs, shapes):
        text, compiled, inputs = round_hlo_text(spec, args.plan, args.inner_steps)
        if args.dump:
            with open(f"{args.dump}.{spec.replace(':', '_')}.hlo", "w") as f:
                f.write(text)
        c = census(text)
        if c.unknown_trip_counts:
            log.warning("%s: %d loops without a known trip count, counted once", spec,
                        c.unknown_trip_counts)
        jc = round_budget.round_counts(shape, seq_len, plan, model.STANDIN, args.inner_steps)
        fwd_eq = jc.dense_flops / round_budget.forward_flops(shape, seq_len, model.STANDIN)
        wall = _wall_time(compiled, inputs, args.time) if args.time else None
        print(_row(spec, c, jc, fwd_eq, wall), flush=True)
        log.info("%s: %s", spec, asdict(c))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
