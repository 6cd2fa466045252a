"""When the autotuners call a candidate config's outputs the same as the default's.

Two configs of one kernel differ only in summation order and rounding points, so a
candidate must agree with the default config within the tests' bf16 tolerance of
the kernel's derivative order (tests/support.py, TOLERANCE["bfloat16"]).
"""
from __future__ import annotations

import math

import numpy as np

# forward, backward, double backward
BF16_TOLERANCE = (1.5e-2, 3e-2, 5e-2)


def rel_l2(x, ref):
    """Relative L2 error of x against ref; inf if x is not finite. The denominator
    never drops below an RMS of 1e-2, as in the tests, so outputs that are zero in
    exact arithmetic are held to an absolute bound."""
    x, ref = (np.asarray(np.asarray(a, np.float32), np.float64) for a in (x, ref))
    if not np.all(np.isfinite(x)):
        return math.inf
    floor = 1e-2 * math.sqrt(max(ref.size, 1))
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), floor))


def worst_rel_l2(outs, refs):
    """The largest rel_l2 over matching leaves of two pytrees of outputs."""
    import jax
    return max(rel_l2(x, r) for x, r in zip(jax.tree.leaves(outs), jax.tree.leaves(refs)))
