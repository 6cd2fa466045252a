"""What every equivalence test shares: input draws, the error measure, tolerances."""
from __future__ import annotations

import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np

from mgd.reference import float64 as f64

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Relative L2 error allowed against the float64 reference, computed on the same
# rounded inputs (so input rounding is not counted). Unit roundoff u is 6e-8
# (float32), 4.9e-4 (float16) and 3.9e-3 (bfloat16). Low-precision backends round
# P (and dS, dP' in the backward passes) to the input dtype before the second
# product of each chain, and round each output once: a handful of roundings of
# size u, growing slowly with the depth of the chain, so forward ~2u,
# backward ~4u, double backward ~6u. The float32 bound covers TF32 products on
# GPUs (u = 4.9e-4 for the 10-bit TF32 mantissa) where a kernel uses them.
TOLERANCE = {
    # dtype:      (forward, backward, double backward)
    "float32": (2e-3, 3e-3, 5e-3),
    "bfloat16": (1.5e-2, 3e-2, 5e-2),
    "float16": (3e-3, 6e-3, 1e-2),
}


def tolerance(dtype_name, order):
    """order: 0 forward, 1 backward, 2 double backward."""
    return TOLERANCE[dtype_name][order]


# Inputs are standard normal, so outputs have RMS of order 0.1 to 1. Some outputs
# are exactly zero in exact arithmetic (dq when every query sees one key, T = 1),
# where a relative error is meaningless: the denominator never drops below an
# RMS of RMS_FLOOR, which turns the check into an absolute one there.
RMS_FLOOR = 1e-2


def rel_l2(x, ref):
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert x.shape == ref.shape, (x.shape, ref.shape)
    assert np.all(np.isfinite(x)), "non-finite values in the output"
    floor = RMS_FLOOR * np.sqrt(max(ref.size, 1))
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), floor))


def error_vs_reference(x, ref, nonvanishing):
    """rel_l2(x, ref), except where ref is zero in exact arithmetic (dq, gq, gk when
    every row sees one key: the softmax is constant in q and k; the float64
    reference then holds zeros or 1e-16-sized leftovers). There only rounding noise
    is left, and it scales with the other outputs rather than with RMS_FLOOR: it is
    measured against `nonvanishing`, an output of the same derivative order that
    does not vanish (dv, gdo)."""
    scale = np.linalg.norm(np.asarray(nonvanishing, np.float64))
    if np.linalg.norm(np.asarray(ref, np.float64)) > 1e-12 * scale:
        return rel_l2(x, ref)
    x = np.asarray(x, dtype=np.float64)
    assert np.all(np.isfinite(x)), "non-finite values in the output"
    return float(np.linalg.norm(x) / scale)


def draw(rng, shape, dtype):
    """Fresh standard-normal input in `dtype` (never zeros)."""
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


def upcast(*xs):
    """Exact float64 copies (bf16/fp16 widen through float32, which holds them exactly)."""
    wide = lambda x: x if np.dtype(x.dtype) == np.float64 else jnp.asarray(x, jnp.float32)  # noqa: E731
    return [np.asarray(wide(x), dtype=np.float64) for x in xs]


@st.composite
def attention_shapes(draw_, max_t=80, head_dims=(16, 32, 64, 128), max_b=2, max_h=3):
    """(B, T, H, D): T includes 1, primes and lengths that are not tile multiples."""
    t = draw_(st.one_of(st.sampled_from([1, 2, 7, 13, 31, 61, 64, 65, 79]),
                        st.integers(1, max_t)))
    t = min(t, max_t)
    return (draw_(st.integers(1, max_b)), t, draw_(st.integers(1, max_h)),
            draw_(st.sampled_from(head_dims)))


def reference_all(q, k, v, do, ddq, ddk, ddv, *, causal, scale=None):
    """Float64 forward, backward and double backward on upcast inputs."""
    q, k, v, do, ddq, ddk, ddv = upcast(q, k, v, do, ddq, ddk, ddv)
    o, lse = f64.forward(q, k, v, causal=causal, scale=scale)
    grads = f64.backward(q, k, v, do, causal=causal, scale=scale)
    second = f64.double_backward(q, k, v, do, ddq, ddk, ddv, causal=causal, scale=scale)
    return (o, lse), grads, second


def reference_hvp(q, k, v, c, uq, uk, uv, *, causal, scale=None):
    """Float64 reverse-over-reverse product for L = sum(sin(O) * c):
    the gradient of <grad_{q,k,v} L, (uq, uk, uv)> with respect to (q, k, v).

    Composed from the closed-form primitives: the double backward gives the
    direct terms and the cotangent of dO, which flows back through
    dO = cos(O) * c and O(q, k, v) as one more first backward.
    """
    q, k, v, c, uq, uk, uv = upcast(q, k, v, c, uq, uk, uv)
    o, _ = f64.forward(q, k, v, causal=causal, scale=scale)
    do = np.cos(o) * c
    gq, gk, gv, gdo = f64.double_backward(q, k, v, do, uq, uk, uv, causal=causal, scale=scale)
    hq, hk, hv = f64.backward(q, k, v, -np.sin(o) * c * gdo, causal=causal, scale=scale)
    return gq + hq, gk + hk, gv + hv


def hvp(attention_fn, q, k, v, c, uq, uk, uv):
    """The same product through JAX: grad of <grad L, u>, reverse over reverse."""
    import jax

    wide = jnp.promote_types(q.dtype, jnp.float32)  # float64 stays float64

    def loss(q, k, v):
        return jnp.sum(jnp.sin(attention_fn(q, k, v).astype(wide)) * c)

    def inner(q, k, v):
        g = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
        return sum(jnp.sum(a.astype(wide) * b) for a, b in zip(g, (uq, uk, uv)))

    return jax.jit(jax.grad(inner, argnums=(0, 1, 2)))(q, k, v)


# ------------------------------------------------------- long causal sequences

LONG_ROWS = (0, 1, 4095, 20000)  # and the last row; each spot-checked in float64


def long_causal_rows_reference(q, k, v, do, ddq, ddk, ddv, rows, scale, head=0):
    """Float64 O, dO' and Q' of a few query rows of one head (causal): each depends on
    its own row and the keys before it alone, so they are checkable at lengths where
    a T x T matrix is not (T=32768: 4 GiB per head in float32)."""
    f = lambda x: upcast(x[0, :, head])[0]  # noqa: E731
    q, k, v, do, ddq, ddk, ddv = map(f, (q, k, v, do, ddq, ddk, ddv))
    out = []
    for i in rows:
        s = scale * k[: i + 1] @ q[i]
        p = np.exp(s - s.max())
        p /= p.sum()
        o = p @ v[: i + 1]
        dp = v[: i + 1] @ do[i]
        delta = do[i] @ o
        dds = scale * (k[: i + 1] @ ddq[i] + ddk[: i + 1] @ q[i])
        dd = p @ dds
        dp_bar = ddv[: i + 1] @ do[i] - dp * dd - dds * delta + dp * dds
        ds = scale * p * (dp - delta)
        ds_bar = scale * p * (dp_bar - p @ dp_bar)
        gq = ds @ ddk[: i + 1] + ds_bar @ k[: i + 1]
        gdo = p @ ddv[: i + 1] + (p * (dds - dd)) @ v[: i + 1]
        out.append((o, gdo, gq))
    return out


def check_long_causal(forward, backward, double_backward, *, t=32768, h=16, d=128, seed=11):
    """B=1, H=16, D=128, T=32768, bf16, causal, scale 1/sqrt(D) (naive autodiff runs
    out of memory at half that length). The three callables take arrays only:
    forward(q, k, v) -> (o, lse), backward(q, k, v, o, lse, do) -> (dq, dk, dv),
    double_backward(q, k, v, o, lse, do, ddq, ddk, ddv) -> (gq, gk, gv, gdo).
    Every output must be finite, and rows LONG_ROWS + the last of the first and the
    last head must match float64. Every error is measured before anything is
    asserted, so a failure names all the rows and outputs that miss."""
    rng = np.random.default_rng(seed)
    q, do, ddq, k, v, ddk, ddv = (draw(rng, (1, t, h, d), jnp.bfloat16) for _ in range(7))
    scale = 1.0 / np.sqrt(d)
    o, lse = forward(q, k, v)
    grads = backward(q, k, v, o, lse, do)
    gq, gk, gv, gdo = double_backward(q, k, v, o, lse, do, ddq, ddk, ddv)
    outputs = dict(o=o, lse=lse, dq=grads[0], dk=grads[1], dv=grads[2], gq=gq, gk=gk, gv=gv,
                   gdo=gdo)
    bad = [n for n, x in outputs.items()
           if not bool(jnp.all(jnp.isfinite(jnp.asarray(x, jnp.float32))))]
    assert not bad, f"non-finite values in {bad} at T={t}"
    rows = [r for r in LONG_ROWS if r < t] + [t - 1]
    misses, report = [], []
    for head in (0, h - 1):
        refs = long_causal_rows_reference(q, k, v, do, ddq, ddk, ddv, rows, scale, head)
        for i, (o_r, gdo_r, gq_r) in zip(rows, refs):
            # Row 0 sees one key: its softmax is constant in q, so its gq is exactly
            # zero and a fused kernel returns bf16 rounding noise of terms that cancel
            # (H200, 2026-11-29: Triton and CUDA both 0.056 in norm, row 1's error
            # 0.02); error_vs_reference holds that noise against the row's gdo.
            for name, got, ref, order in (("o", o, o_r, 0), ("gdo", gdo, gdo_r, 2),
                                          ("gq", gq, gq_r, 2)):
                err = error_vs_reference(got[0, i, head], ref, nonvanishing=gdo_r)
                tol = tolerance("bfloat16", order)
                report.append(f"{name}[row {i}, head {head}] {err:.2e}")
                if err > tol:
                    misses.append(f"{name}[row {i}, head {head}]: {err:.2e} > {tol:.1e}")
    assert not misses, f"T={t}: " + "; ".join(misses) + "\nall: " + ", ".join(report)
