"""What is benchmarked: the shape grid (from environment variables) and the work
each stage does (FLOPs by the project's counting convention).

GPU grid knobs (comma-separated lists; the grid is their cross product):

    MGD_BENCH_IMPLS   xla,pallas,triton,cuda
    MGD_BENCH_B       1
    MGD_BENCH_T       1024,4096,16384
    MGD_BENCH_H       16
    MGD_BENCH_D       128
    MGD_BENCH_CAUSAL  1            (1 causal, 0 full)
    MGD_BENCH_DTYPE   bfloat16     (bfloat16, float16, float32)
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

IMPLS = ("xla", "pallas", "triton", "cuda")
DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}

# Matrix products of size Tq x Tk x D per head, by stage (docs/attention-math.md).
# The backward recomputes S, then dP, dQ, dK, dV. The HVP (grad of <grad L, u>
# through `mgd.attention`) runs forward 2 + backward 5 in the inner gradient,
# then double backward 12 plus one more backward 5 for the cotangent that flows
# through dO = L'(O) back into O(q, k, v).
PRODUCTS = {"forward": 2, "backward": 5, "double_backward": 12, "hvp": 24}


@dataclass(frozen=True)
class Shape:
    b: int
    t: int
    h: int
    d: int
    causal: bool
    dtype: str

    @property
    def id(self):
        mask = "causal" if self.causal else "full"
        return f"b{self.b}-t{self.t}-h{self.h}-d{self.d}-{mask}-{DTYPE_SHORT.get(self.dtype, self.dtype)}"

    def as_dict(self):
        return {"B": self.b, "T": self.t, "H": self.h, "D": self.d, "causal": self.causal,
                "dtype": self.dtype}


def flops(stage, shape):
    """Effective FLOPs: n_products * 2 * B * H * Tq * Tk * D, halved for causal."""
    if stage not in PRODUCTS:
        raise ValueError(f"stage must be one of {sorted(PRODUCTS)}, got {stage!r}")
    total = PRODUCTS[stage] * 2 * shape.b * shape.h * shape.t * shape.t * shape.d
    return total / 2 if shape.causal else total


def env_list(name, default, convert):
    raw = os.environ.get(name, default)
    items = [item.strip() for item in raw.split(",") if item.strip()]
    if not items:
        raise ValueError(f"{name} must list at least one value, got {raw!r}")
    try:
        return [convert(item) for item in items]
    except ValueError as err:
        raise ValueError(f"{name}={raw!r} is not a comma-separated list: {err}") from None


def _bool(text):
    if text.lower() in ("1", "true", "causal", "yes"):
        return True
    if text.lower() in ("0", "false", "full", "no"):
        return False
    raise ValueError(f"expected 1/0, got {text!r}")


def _dtype(text):
    if text not in DTYPE_SHORT:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_SHORT)}, got {text!r}")
    return text


def impl_name(text):
    if text not in IMPLS:
        raise ValueError(f"impl must be one of {list(IMPLS)}, got {text!r}")
    return text


def gpu_impls():
    return env_list("MGD_BENCH_IMPLS", ",".join(IMPLS), impl_name)


def gpu_shapes():
    axes = (
        env_list("MGD_BENCH_B", "1", int),
        env_list("MGD_BENCH_T", "1024,4096,16384", int),
        env_list("MGD_BENCH_H", "16", int),
        env_list("MGD_BENCH_D", "128", int),
        env_list("MGD_BENCH_CAUSAL", "1", _bool),
        env_list("MGD_BENCH_DTYPE", "bfloat16", _dtype),
    )
    return [Shape(*combo) for combo in itertools.product(*axes)]


# The CI smoke subset, (impl, shape) pairs: small enough that the interpreted
# Pallas kernels (slow: every grid step runs in Python) finish in seconds on a
# CI core; the xla baseline also runs the full (non-causal) mask.
CPU_CASES = (
    ("xla", Shape(1, 96, 2, 32, True, "float32")),
    ("xla", Shape(1, 96, 2, 32, False, "float32")),
    ("pallas", Shape(1, 64, 2, 32, True, "float32")),
)
