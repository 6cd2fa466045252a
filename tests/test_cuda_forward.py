"""The CUDA forward kernel (mgd.bindings.cuda.forward): o and lse against the float64
reference on a Hopper GPU, grad-of-grad through impl='cuda' on top of it, and the
switch that hands the forward back to the delegate backend."""
from __future__ import annotations

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import mgd
from mgd.bindings import cuda
from mgd.reference import float64 as f64
from tests.support import DTYPES, draw, hvp, reference_hvp, rel_l2, tolerance, upcast

# ----------------------------------------------------------------------------- CPU


def test_delegate_switch_is_read_at_call_time(monkeypatch):
    monkeypatch.setenv(cuda.DELEGATE_ENV, " forward, backward ")
    assert cuda.delegated_stages() == {"forward", "backward"}
    q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    assert cuda.DELEGATE_ENV in cuda.forward_kernel_reason(q, q, q, causal=True)
    monkeypatch.delenv(cuda.DELEGATE_ENV)
    assert cuda.delegated_stages() == set()


def test_forward_kernel_refuses_unsupported_inputs_with_reason():
    q = jnp.zeros((1, 8, 2, 32), jnp.bfloat16)
    assert "head_dim must be 64 or 128, got 32" in cuda.forward_kernel_reason(q, q, q, causal=True)
    q = jnp.zeros((1, 8, 2, 64), jnp.float32)
    assert "bfloat16 or float16" in cuda.forward_kernel_reason(q, q, q, causal=True)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU-only behaviour")
def test_forward_on_cpu_names_the_gpu_and_delegates():
    rng = np.random.default_rng(0)
    q, k, v = (draw(rng, (1, 9, 2, 64), jnp.bfloat16) for _ in range(3))
    assert "GPU" in cuda.forward_kernel_reason(q, k, v, causal=True)
    o, lse = cuda.forward(q, k, v, causal=True, scale=0.125)
    o_ref, lse_ref = f64.forward(*upcast(q, k, v), causal=True, scale=0.125)
    assert rel_l2(o, o_ref) < tolerance("bfloat16", 0)
    assert rel_l2(lse, lse_ref) < tolerance("float32", 0)


# ----------------------------------------------------------------------------- GPU

_LENGTHS = st.sampled_from([1, 7, 63, 64, 65, 127, 128, 129, 191, 192, 193, 200, 255, 257,
                            383, 384, 385, 1000])


@st.composite
def _cases(draw_):
    return dict(b=draw_(st.integers(1, 2)), t=draw_(_LENGTHS), h=draw_(st.integers(1, 3)),
                d=draw_(st.sampled_from([64, 128])), causal=draw_(st.booleans()),
                dtype=draw_(st.sampled_from(["bfloat16", "float16"])),
                seed=draw_(st.integers(0, 2**31 - 1)))


def _check_forward(b, t, h, d, causal, dtype, seed, scale=None):
    dt = DTYPES[dtype]
    rng = np.random.default_rng(seed)
    shape = (b, t, h, d)
    q, k, v = (draw(rng, shape, dt) for _ in range(3))
    scale = 1 / np.sqrt(d) if scale is None else scale
    assert cuda.forward_kernel_reason(q, k, v, causal=True) is None
    o, lse = jax.jit(lambda *a: cuda.kernel_forward(*a, causal=causal, scale=scale))(q, k, v)
    o_ref, lse_ref = f64.forward(*upcast(q, k, v), causal=causal, scale=scale)
    case = dict(b=b, t=t, h=h, d=d, causal=causal, dtype=dtype)
    assert o.dtype == dt and o.shape == shape, case
    assert lse.dtype == jnp.float32 and lse.shape == (b, h, t), case
    assert rel_l2(o, o_ref) < tolerance(dtype, 0), (rel_l2(o, o_ref), case)
    assert rel_l2(lse, lse_ref) < tolerance("float32", 0), (rel_l2(lse, lse_ref), case)


@pytest.mark.gpu
@given(_cases())
def test_forward_matches_float64(case):
    _check_forward(**case)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_forward_long_and_scaled(d, causal):
    """Several key blocks per row, a tail, and a scale other than 1/sqrt(D)."""
    _check_forward(1, 2100, 2, d, causal, "bfloat16", seed=d + causal, scale=0.3)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [191, 193, 385])
@pytest.mark.parametrize("causal", [True, False])
def test_forward_d64_tile_tails(t, causal):
    """D=64 tiles are 192 rows (three consumer warpgroups): tails on either side of them."""
    _check_forward(2, t, 3, 64, causal, "bfloat16", seed=t + causal)


@pytest.mark.gpu
def test_forward_vmap_folds_into_batch():
    rng = np.random.default_rng(5)
    shape = (3, 2, 70, 2, 64)
    q, k, v = (draw(rng, shape, jnp.bfloat16) for _ in range(3))
    f = lambda q, k, v: cuda.kernel_forward(q, k, v, causal=True, scale=0.125)  # noqa: E731
    o, lse = jax.vmap(f)(q, k, v)
    for i in range(shape[0]):
        oi, lsei = f(q[i], k[i], v[i])
        np.testing.assert_array_equal(np.asarray(o[i], np.float32), np.asarray(oi, np.float32))
        np.testing.assert_array_equal(np.asarray(lse[i]), np.asarray(lsei))


@pytest.mark.gpu
def test_delegate_switch_runs_the_reference_backend(monkeypatch):
    rng = np.random.default_rng(9)
    q, k, v = (draw(rng, (1, 300, 2, 128), jnp.bfloat16) for _ in range(3))
    o_ref, lse_ref = f64.forward(*upcast(q, k, v), causal=True, scale=0.1)
    monkeypatch.setenv(cuda.DELEGATE_ENV, "forward")
    assert cuda.forward_kernel_reason(q, k, v, causal=True) is not None
    o_del, lse_del = cuda.forward(q, k, v, causal=True, scale=0.1)
    monkeypatch.delenv(cuda.DELEGATE_ENV)
    o_own, lse_own = cuda.forward(q, k, v, causal=True, scale=0.1)
    for o, lse in ((o_del, lse_del), (o_own, lse_own)):
        assert rel_l2(o, o_ref) < tolerance("bfloat16", 0)
        assert rel_l2(lse, lse_ref) < tolerance("float32", 0)


@pytest.mark.gpu
@given(_cases())
def test_grad_of_grad_on_our_forward(case):
    """Reverse-over-reverse HVP through impl='cuda': the backward and the double
    backward consume the (o, lse) our forward writes."""
    dt = DTYPES[case["dtype"]]
    rng = np.random.default_rng(case["seed"])
    shape = (case["b"], case["t"], case["h"], case["d"])
    q, k, v, uq, uk, uv = (draw(rng, shape, dt) for _ in range(6))
    assert cuda.forward_kernel_reason(q, k, v, causal=True) is None
    c = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    attn = lambda q, k, v: mgd.attention(q, k, v, causal=case["causal"], impl="cuda")  # noqa: E731
    got = hvp(attn, q, k, v, c, uq.astype(jnp.float32), uk.astype(jnp.float32),
              uv.astype(jnp.float32))
    expected = reference_hvp(q, k, v, c, uq, uk, uv, causal=case["causal"])
    for name, x, ref in zip(("q", "k", "v"), got, expected):
        if case["t"] == 1 and name in ("q", "k"):
            # One key per row: these parts vanish exactly; bound the noise by the v part.
            err = float(np.linalg.norm(np.asarray(x, np.float64)) / np.linalg.norm(expected[2]))
        else:
            err = rel_l2(x, ref)
        assert err < 2 * tolerance(case["dtype"], 2), (name, err, case)
