"""The Pallas backend against the float64 closed-form reference.

On a CPU the kernels run under the Pallas interpreter, so these tests execute the
real kernel code (tiling, causal block skipping, tail masking); shapes stay small
because interpretation is slow. The `gpu` tests run the Triton lowering at sizes
where every kernel spans many blocks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mgd
from mgd.reference import pallas
from mgd.reference import xla as xla_backend
from mgd.reference.pallas import configs as pallas_configs
from tests.support import (
    DTYPES,
    attention_shapes,
    check_long_causal,
    draw,
    hvp,
    reference_all,
    reference_hvp,
    rel_l2,
    tolerance,
)

ORDER_NAMES = ("forward", "backward", "double backward")


def _inputs(rng, b, tq, tk, h, d, dtype):
    q, do, ddq = (draw(rng, (b, tq, h, d), dtype) for _ in range(3))
    k, v, ddk, ddv = (draw(rng, (b, tk, h, d), dtype) for _ in range(4))
    return q, k, v, do, ddq, ddk, ddv


def _check_all_primitives(rng, b, tq, tk, h, d, dtype_name, causal, scale=None, configs=None):
    dtype = DTYPES[dtype_name]
    q, k, v, do, ddq, ddk, ddv = _inputs(rng, b, tq, tk, h, d, dtype)
    s = 1.0 / np.sqrt(d) if scale is None else scale
    o, lse = pallas.forward(q, k, v, causal=causal, scale=s, configs=configs)
    grads = pallas.backward(q, k, v, o, lse, do, causal=causal, scale=s, configs=configs)
    second = pallas.double_backward(q, k, v, o, lse, do, ddq, ddk, ddv, causal=causal, scale=s,
                                    configs=configs)
    assert o.dtype == dtype and lse.dtype == jnp.float32 and lse.shape == (b, h, tq)
    assert all(g.dtype == dtype for g in (*grads, *second))
    (ref_o, ref_lse), ref_grads, ref_second = reference_all(
        q, k, v, do, ddq, ddk, ddv, causal=causal, scale=s)
    # lse is float32 arithmetic on the same rounded scores for every dtype.
    assert rel_l2(lse, ref_lse) < tolerance("float32", 0)
    checks = [(0, "o", o, ref_o)]
    checks += [(1, name, g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)]
    checks += [(2, name, g, r) for name, g, r in zip(("gq", "gk", "gv", "gdo"), second, ref_second)]
    for order, name, got, want in checks:
        err = rel_l2(got, want)
        assert err < tolerance(dtype_name, order), (
            f"{ORDER_NAMES[order]} {name}: rel L2 {err:.3g} >= {tolerance(dtype_name, order)} "
            f"(B={b} Tq={tq} Tk={tk} H={h} D={d} {dtype_name} causal={causal})")


@st.composite
def _cases(draw_):
    b, tq, h, d = draw_(attention_shapes(max_t=80, head_dims=(16, 32, 64), max_h=2))
    tk = draw_(st.one_of(st.just(tq), st.integers(1, 80)))
    return dict(
        b=b, tq=tq, tk=tk, h=h, d=d,
        dtype_name=draw_(st.sampled_from(("float32", "bfloat16", "float16"))),
        causal=draw_(st.booleans()),
        # Unequal query and key tiles exercise the causal loop bounds of every kernel.
        configs={kernel: {"block_q": draw_(st.sampled_from((16, 32))),
                          "block_k": draw_(st.sampled_from((16, 32)))}
                 for kernel in pallas_configs.KERNELS},
        seed=draw_(st.integers(0, 2**31 - 1)))


@settings(max_examples=10)
@given(_cases())
def test_primitives_match_float64_reference(case):
    rng = np.random.default_rng(case.pop("seed"))
    _check_all_primitives(rng, **case)


def test_scale_and_padded_head_dim():
    # D = 48 is zero-padded to 64 inside the wrapper; an explicit scale must survive it.
    _check_all_primitives(np.random.default_rng(1), 1, 37, 37, 2, 48, "float32", True, scale=0.3)


def test_backward_with_lse_cotangent():
    rng = np.random.default_rng(2)
    q, k, v, do, *_ = _inputs(rng, 1, 29, 29, 2, 16, jnp.float32)
    dlse = draw(rng, (1, 2, 29), jnp.float32)
    s = 0.25
    o, lse = pallas.forward(q, k, v, causal=True, scale=s)
    got = pallas.backward(q, k, v, o, lse, do, causal=True, scale=s, dlse=dlse)
    as64 = [jnp.asarray(x, jnp.float64) for x in (q, k, v, do, dlse)]
    want = xla_backend.backward(*as64[:3], None, None, as64[3], causal=True, scale=s,
                                dlse=as64[4])
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert rel_l2(g, w) < tolerance("float32", 1), name


def _hvp(impl, q, k, v, c, tangents, causal):
    def loss(q, k, v):  # nonlinear in O, so the dO = L'(O) path is exercised
        return jnp.sum(jnp.sin(mgd.attention(q, k, v, causal=causal, impl=impl)) * c)

    def directional(q, k, v):
        g = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
        return sum(jnp.sum(gi * ti) for gi, ti in zip(g, tangents))

    return jax.grad(directional, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("causal,tq", [(True, 23), (False, 18)])
def test_grad_of_grad_through_public_op(causal, tq):
    rng = np.random.default_rng(3)
    q, k, v = (draw(rng, (1, tq, 2, 16), jnp.float32) for _ in range(3))
    c, *tangents = (draw(rng, (1, tq, 2, 16), jnp.float32) for _ in range(4))
    got = jax.jit(lambda *a: _hvp("pallas", *a, tangents, causal))(q, k, v, c)
    as64 = lambda xs: [jnp.asarray(x, jnp.float64) for x in xs]  # noqa: E731
    want = _hvp("xla", *as64((q, k, v, c)), as64(tangents), causal)
    for name, g, w in zip(("q", "k", "v"), got, want):
        assert rel_l2(g, w) < tolerance("float32", 2), name


def test_unavailable_reason():
    x = jnp.zeros((1, 8, 1, 64), jnp.bfloat16)
    assert pallas.unavailable_reason(x, x, x, causal=True) is None
    wide = jnp.zeros((1, 8, 1, 512), jnp.float32)
    assert "head dim" in pallas.unavailable_reason(wide, wide, wide, causal=True)
    ints = jnp.zeros((1, 8, 1, 64), jnp.int32)
    assert "dtype" in pallas.unavailable_reason(ints, ints, ints, causal=False)


def test_config_lookup_falls_back_and_overrides():
    default = pallas_configs.lookup("forward", 96, True, 100_000, interpret=False)
    assert {"block_q", "block_k", "num_warps", "num_stages"} <= set(default)
    picked = pallas_configs.lookup("backward_dq", 64, False, 512, interpret=True,
                                   overrides={"backward_dq": {"block_k": 32}})
    assert picked["block_k"] == 32
    assert pallas_configs.fit_blocks({"block_q": 128, "block_k": 128}, 5, 40) == {
        "block_q": 16, "block_k": 64}
    with pytest.raises(ValueError, match="kernel"):
        pallas_configs.lookup("nope", 64, True, 1, interpret=True)


# ----------------------------------------------------------------------------- GPU

GPU_CASES = [
    # b, tq, tk, h, d, dtype, causal
    (1, 4096, 4096, 2, 128, "bfloat16", True),
    (1, 4096, 4096, 2, 64, "float16", False),
    (1, 2048, 2048, 2, 128, "float16", True),
    (2, 1000, 1000, 3, 64, "bfloat16", True),
    (1, 777, 1500, 2, 128, "float16", False),
    (1, 1500, 777, 2, 64, "bfloat16", True),
    (1, 513, 513, 2, 80, "bfloat16", True),
    (1, 1024, 1024, 2, 64, "float32", True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("b,tq,tk,h,d,dtype_name,causal", GPU_CASES)
def test_gpu_primitives_match_float64_reference(b, tq, tk, h, d, dtype_name, causal):
    _check_all_primitives(np.random.default_rng(tq + d), b, tq, tk, h, d, dtype_name, causal)


@pytest.mark.gpu
def test_gpu_grad_of_grad_through_public_op():
    rng = np.random.default_rng(4)
    shape = (1, 512, 2, 64)
    q, k, v, c, *tangents = (draw(rng, shape, jnp.float32) for _ in range(7))
    got = jax.jit(lambda *a: _hvp("pallas", *a, tangents, True))(q, k, v, c)
    want = jax.jit(lambda *a: _hvp("xla", *a, tangents, True))(q, k, v, c)
    for name, g, w in zip(("q", "k", "v"), got, want):
        assert rel_l2(g, w) < tolerance("float32", 2), name


@pytest.mark.gpu
def test_gpu_long_sequence_runs_in_linear_memory():
    """T=32768 in O(T) memory (naive autodiff needs ~88 GiB at T=16384, docs), rows
    spot-checked in float64 (tests/support.py)."""
    kw = dict(causal=True, scale=128 ** -0.5)
    check_long_causal(jax.jit(lambda *a: pallas.forward(*a, **kw)),
                      jax.jit(lambda *a: pallas.backward(*a, **kw)),
                      jax.jit(lambda *a: pallas.double_backward(*a, **kw)))


# Hypothesis sweeps on the GPU, bounded under every profile (the device one
# included). Each new shape compiles every Pallas kernel again (Triton, inside
# XLA), so the shapes come from GPU_CASES, which the test above compiles
# anyway; what varies per example is the inputs (fresh draws), and for the
# second derivative the mask and dtype at one small shape.
GPU_SWEEP_CASES = (GPU_CASES[3], GPU_CASES[4], GPU_CASES[5])
GPU_SWEEP_EXAMPLES = min(settings().max_examples, 6)


@pytest.mark.gpu
@settings(max_examples=GPU_SWEEP_EXAMPLES)
@given(st.sampled_from(GPU_SWEEP_CASES), st.integers(0, 2**31 - 1))
def test_gpu_primitives_sweep_match_float64_reference(case, seed):
    _check_all_primitives(np.random.default_rng(seed), *case)


@pytest.mark.gpu
@settings(max_examples=GPU_SWEEP_EXAMPLES)
@given(st.booleans(), st.integers(0, 2**31 - 1))
def test_gpu_grad_of_grad_sweep_matches_float64_hvp(causal, seed):
    """Reverse-over-reverse HVP through mgd.attention(impl="pallas") with a loss
    nonlinear in O, against the closed-form float64 product (bf16: the
    benchmark's dtype; one compile per mask)."""
    dtype_name = "bfloat16"
    rng = np.random.default_rng(seed)
    dtype = DTYPES[dtype_name]
    shape = (1, 200, 2, 64)
    q, k, v, uq, uk, uv = (draw(rng, shape, dtype) for _ in range(6))
    c = draw(rng, shape, jnp.float32)
    attention = lambda q, k, v: mgd.attention(q, k, v, causal=causal, impl="pallas")  # noqa: E731
    got = hvp(attention, q, k, v, c, uq, uk, uv)
    want = reference_hvp(q, k, v, c, uq, uk, uv, causal=causal)
    for name, g, w in zip(("q", "k", "v"), got, want):
        assert g.dtype == dtype
        err = rel_l2(g, w)
        assert err < tolerance(dtype_name, 2), f"hvp_{name}: rel L2 {err:.3g} ({dtype_name}, causal={causal})"
