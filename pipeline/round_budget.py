"""How many attention kernel calls and dense matmul FLOPs one metagradient round asks for.

    python -m mgd.pipeline.round_budget --shape e2e:16384 --plan lean --inner-steps 1

traces the jitted round (nothing is compiled or run), counts its attention kernel
calls by kind and its dense matmul FLOPs (`jaxpr_count`), and prints them per layer
beside the floor derived in docs/round.md. Counted with the Pallas kernels, which run
interpreted on a CPU, so the counts are the GPU program's.

A dense forward-equivalent is the matmul FLOPs of one forward pass of the model (blocks
and output layer) over the round's k training rows.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from mgd.pipeline import jaxpr_count, model, oracle
from mgd.pipeline.round_shapes import RoundShape, parse_shape

__all__ = ["Budget", "floor", "round_budget", "round_counts", "forward_flops", "abstract_inputs",
           "counts_of_round", "forward_flops_of", "forward_equivalents", "main"]


@dataclass(frozen=True)
class Budget:
    """Per layer attention calls by kind, and dense work in forward-equivalents, of one round."""
    forward: float
    backward: float
    double_backward: float
    dense_forward_equivalents: float
    # of those, products with a float32 (or wider) operand: 0 when the round runs its
    # products in the compute dtype
    wide_forward_equivalents: float = 0.0

    def within(self, limit: Budget) -> bool:
        return all(getattr(self, f) <= getattr(limit, f) + 1e-9 for f in
                   ("forward", "backward", "double_backward", "dense_forward_equivalents",
                    "wide_forward_equivalents"))


def floor(inner_steps: int, k: int, target_rows: int) -> Budget:
    """The work the math needs with memory to spare (docs/round.md): per layer and inner
    step, trajectory 1 forward + 1 backward and reverse step 1 forward + 2 backwards + 1
    double backward; the target 1 forward + 1 backward. Dense: 3 + 9 per step, 3 m/k."""
    t = inner_steps
    return Budget(forward=2 * t + 1, backward=3 * t + 1, double_backward=t,
                  dense_forward_equivalents=12 * t + 3 * target_rows / k)


def abstract_inputs(cfg: model.GPTConfig, oc: oracle.OracleConfig, target_rows: int,
                    rounds: int | None = None):
    """Shapes of a round's inputs (params, train rows, target rows, the inner Adam's warm
    start or None), train and target with a leading axis of `rounds` when given (the
    inputs of `oracle.make_rounds_fn`)."""
    params = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    lead = () if rounds is None else (rounds,)
    train = jax.ShapeDtypeStruct(lead + (oc.k, cfg.seq_len + 1), jnp.int32)
    target = jax.ShapeDtypeStruct(lead + (target_rows, cfg.seq_len + 1), jnp.int32)
    adam = (params, params, jax.ShapeDtypeStruct((), jnp.int32)) if oc.warm_start else None
    return params, train, target, adam


def counts_of_round(cfg: model.GPTConfig, oc: oracle.OracleConfig,
                    target_rows: int) -> jaxpr_count.Counts:
    """Counts of one round of `oc` as `make_round_fn` builds it (traced, not compiled)."""
    fn = oracle.make_round_fn(cfg, oc)
    return jaxpr_count.count(jax.make_jaxpr(fn)(*abstract_inputs(cfg, oc, target_rows)))


def forward_flops_of(cfg: model.GPTConfig, k: int) -> float:
    """Dense matmul FLOPs of one forward pass over `k` rows."""
    params = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    rows = jax.ShapeDtypeStruct((k, cfg.seq_len + 1), jnp.int32)
    closed = jax.make_jaxpr(lambda p, x: model.per_example_loss(p, x, cfg))(params, rows)
    return jaxpr_count.count(closed).dense_flops


def forward_equivalents(cfg: model.GPTConfig, oc: oracle.OracleConfig, target_rows: int) -> float:
    """Dense matmul FLOPs of one round of `oc` over those of one forward pass on its k rows."""
    return counts_of_round(cfg, oc, target_rows).dense_flops / max(forward_flops_of(cfg, oc.k), 1.0)


def round_counts(shape: RoundShape, seq_len: int, plan: oracle.RematPlan, impl: str = "pallas",
                 inner_steps: int | None = None) -> jaxpr_count.Counts:
    """Counts of the whole round at `shape` as `make_round_fn` builds it."""
    return counts_of_round(shape.model_config(seq_len, impl),
                           shape.oracle_config(plan, inner_steps), shape.target_rows)


def forward_flops(shape: RoundShape, seq_len: int, impl: str = "pallas") -> float:
    """Dense matmul FLOPs of one forward pass over the round's k training rows."""
    return forward_flops_of(shape.model_config(seq_len, impl), shape.k)


def round_budget(shape: RoundShape, seq_len: int, plan: oracle.RematPlan, impl: str = "pallas",
                 inner_steps: int | None = None) -> Budget:
    c = round_counts(shape, seq_len, plan, impl, inner_steps)
    if c.unknown_loops:
        raise RuntimeError(f"{c.unknown_loops} loops of the round have trip counts the counter "
                           "could not find; the counts would be wrong")
    n, fwd = shape.n_layer, forward_flops(shape, seq_len, impl)
    return Budget(forward=c.attention["forward"] / n, backward=c.attention["backward"] / n,
                  double_backward=c.attention["double_backward"] / n,
                  dense_forward_equivalents=c.dense_flops / fwd,
                  wide_forward_equivalents=c.wide_flops / fwd)


def _table(rows) -> str:
    head = ("plan", "attention fwd / layer", "bwd / layer", "double bwd / layer", "dense fwd-equiv.",
            "of which float32")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, b in rows:
        lines.append(f"| {name} | {b.forward:g} | {b.backward:g} | {b.double_backward:g} | "
                     f"{b.dense_forward_equivalents:.2f} | {b.wide_forward_equivalents:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="e2e:16384", help="name:seq_len (round_shapes.SHAPES)")
    ap.add_argument("--plan", default="lean,frugal", help="comma-separated plan names")
    ap.add_argument("--inner-steps", type=int, default=None, help="default: the shape's")
    ap.add_argument("--impl", default="pallas", choices=("pallas", model.STANDIN),
                    help="attention the round is traced with (pallas: interpreted on a CPU)")
    args = ap.parse_args(argv)
    try:
        shape, seq_len = parse_shape(args.shape)
        plans = [(name, oracle.RematPlan.named(name)) for name in args.plan.split(",") if name]
    except ValueError as err:
        ap.error(str(err))
    if args.inner_steps is not None and args.inner_steps < 1:
        ap.error(f"--inner-steps must be >= 1, got {args.inner_steps}")
    steps = args.inner_steps or shape.inner_steps
    rows = [(name, round_budget(shape, seq_len, plan, args.impl, steps)) for name, plan in plans]
    rows.append(("floor (docs/round.md)", floor(steps, shape.k, shape.target_rows)))
    print(f"{shape.name} L={seq_len}, {shape.n_layer} layers, k={shape.k}, "
          f"{shape.target_rows} target rows, {steps} inner steps, attention {args.impl}")
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
