"""The CUDA attention backward (dq, dk, dv): equivalence with the float64 reference on a
Hopper GPU, with and without a cotangent of lse, in both modes; the switches that route
`cuda.backward` to the delegate; and honest unavailability everywhere else."""
from __future__ import annotations

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import mgd
from mgd.bindings import cuda
from reference import float64 as f64
from tests.support import DTYPES, draw, error_vs_reference, rel_l2, tolerance, upcast


def _lse_term(q, k, dlse, *, causal, scale):
    """Float64 (dq, dk) of <dlse, lse>: dlse_i enters dS_ij as s * dlse_i * P_ij."""
    q, k = (np.swapaxes(x, 1, 2) for x in upcast(q, k))
    s = scale * q @ np.swapaxes(k, -1, -2)
    if causal:
        t = s.shape[-1]
        s = np.where(np.tril(np.ones((t, t), dtype=bool)), s, -np.inf)
    p = np.exp(s - np.logaddexp.reduce(s, axis=-1)[..., None])
    ds = scale * p * np.asarray(dlse, np.float64)[..., None]
    return np.swapaxes(ds @ k, 1, 2), np.swapaxes(np.swapaxes(ds, -1, -2) @ q, 1, 2)


def reference_backward(q, k, v, do, dlse, *, causal, scale):
    """Float64 (dq, dk, dv) of the backward with cotangents (do, dlse) on (o, lse)."""
    wide = upcast(q, k, v, do)
    dq, dk, dv = f64.backward(*wide, causal=causal, scale=scale)
    if dlse is not None:
        eq, ek = _lse_term(q, k, dlse, causal=causal, scale=scale)
        dq, dk = dq + eq, dk + ek
    return dq, dk, dv


def _inputs(b, t, h, d, causal, dtype, seed, with_dlse):
    dt = DTYPES[dtype]
    rng = np.random.default_rng(seed)
    shape = (b, t, h, d)
    q, k, v, do = (draw(rng, shape, dt) for _ in range(4))
    o, lse = f64.forward(*upcast(q, k, v), causal=causal)
    o = jnp.asarray(o, jnp.float32).astype(dt)
    lse = jnp.asarray(lse, jnp.float32)
    dlse = jnp.asarray(rng.standard_normal((b, h, t)).astype(np.float32)) if with_dlse else None
    return q, k, v, o, lse, do, dlse


# ----------------------------------------------------------------------------- CPU

def test_delegate_switch_is_read_at_call_time(monkeypatch):
    q, k, v = (jnp.zeros((1, 8, 2, 64), jnp.bfloat16) for _ in range(3))
    monkeypatch.setenv("MGD_CUDA_DELEGATE", "forward, backward")
    assert cuda.delegated_stages() == {"forward", "backward"}
    assert "MGD_CUDA_DELEGATE" in cuda.backward_kernel_reason(q, k, v, causal=True)
    monkeypatch.setenv("MGD_CUDA_DELEGATE", "")
    assert cuda.delegated_stages() == set()


def test_deterministic_default_from_environment(monkeypatch):
    monkeypatch.delenv("MGD_CUDA_DETERMINISTIC", raising=False)
    assert cuda.deterministic_default() is True
    monkeypatch.setenv("MGD_CUDA_DETERMINISTIC", "0")
    assert cuda.deterministic_default() is False


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU-only behaviour")
def test_backward_delegates_on_cpu_and_matches_float64():
    q, k, v, o, lse, do, dlse = _inputs(1, 33, 2, 64, True, "float16", 5, True)
    assert "GPU" in cuda.backward_kernel_reason(q, k, v, causal=True)
    got = cuda.backward(q, k, v, o, lse, do, causal=True, scale=0.125, dlse=dlse)
    expected = reference_backward(q, k, v, do, dlse, causal=True, scale=0.125)
    for x, ref in zip(got, expected):
        assert rel_l2(x, ref) < tolerance("float16", 1)


def test_lse_term_matches_finite_differences_of_lse():
    """The float64 dlse term is the gradient of <dlse, lse>, checked by central
    differences on a tiny float64 case (an independent check of the helper)."""
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 1, 5, 1, 4))
    dlse = rng.standard_normal((1, 1, 5))
    eq, ek = _lse_term(q, k, dlse, causal=True, scale=0.5)
    f = lambda q, k: float(np.sum(dlse * f64.forward(q, k, k, causal=True, scale=0.5)[1]))  # noqa: E731
    eps = 1e-6
    for x, grad, which in ((q, eq, 0), (k, ek, 1)):
        for idx in [(0, 0, 0, 0), (0, 3, 0, 2), (0, 4, 0, 1)]:
            xp, xm = x.copy(), x.copy()
            xp[idx] += eps
            xm[idx] -= eps
            args_p = (xp, k) if which == 0 else (q, xp)
            args_m = (xm, k) if which == 0 else (q, xm)
            numeric = (f(*args_p) - f(*args_m)) / (2 * eps)
            assert abs(numeric - grad[idx]) < 1e-6, (which, idx, numeric, grad[idx])


# ----------------------------------------------------------------------------- GPU

_LENGTHS = st.sampled_from([1, 7, 63, 64, 65, 127, 128, 129, 200, 255, 257, 385])


@st.composite
def _cases(draw_):
    return dict(b=draw_(st.integers(1, 2)), t=draw_(_LENGTHS), h=draw_(st.integers(1, 3)),
                d=draw_(st.sampled_from([64, 128])), causal=draw_(st.booleans()),
                dtype=draw_(st.sampled_from(["bfloat16", "float16"])),
                seed=draw_(st.integers(0, 2**31 - 1)), with_dlse=draw_(st.booleans()),
                deterministic=draw_(st.booleans()))


def _check_backward(b, t, h, d, causal, dtype, seed, with_dlse, deterministic):
    q, k, v, o, lse, do, dlse = _inputs(b, t, h, d, causal, dtype, seed, with_dlse)
    assert cuda.backward_kernel_reason(q, k, v, causal=causal) is None
    scale = 1 / np.sqrt(d)
    fn = jax.jit(lambda *a: cuda.kernel_backward(*a[:6], causal=causal, scale=scale,
                                                 dlse=a[6] if with_dlse else None,
                                                 deterministic=deterministic))
    got = fn(q, k, v, o, lse, do, dlse if with_dlse else lse)
    expected = reference_backward(q, k, v, do, dlse, causal=causal, scale=scale)
    case = dict(b=b, t=t, h=h, d=d, causal=causal, dlse=with_dlse, deterministic=deterministic)
    for name, x, ref in zip(("dq", "dk", "dv"), got, expected):
        assert x.dtype == DTYPES[dtype] and x.shape == q.shape
        err = error_vs_reference(x, ref, nonvanishing=expected[2])
        assert err < tolerance(dtype, 1), (name, err, case)
    return got


@pytest.mark.gpu
@given(_cases())
def test_backward_matches_float64(case):
    _check_backward(**case)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("t", [1000, 2048])
@pytest.mark.parametrize("d", [64, 128])
def test_backward_long_causal(t, d, deterministic):
    _check_backward(1, t, 2, d, True, "bfloat16", seed=t + d, with_dlse=True,
                    deterministic=deterministic)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_modes_agree(d):
    """The fused mode (dQ reduced in fp32 across key blocks) and the split agree to
    rounding; dk, dv come from the same products in both modes."""
    q, k, v, o, lse, do, dlse = _inputs(2, 777, 3, d, False, "float16", 17, True)
    kw = dict(causal=False, scale=d ** -0.5, dlse=dlse)
    split = cuda.kernel_backward(q, k, v, o, lse, do, deterministic=True, **kw)
    fused = cuda.kernel_backward(q, k, v, o, lse, do, deterministic=False, **kw)
    assert rel_l2(fused[0], np.asarray(split[0], np.float64)) < tolerance("float16", 1)
    for x, y in zip(split[1:], fused[1:]):
        assert rel_l2(y, np.asarray(x, np.float64)) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_deterministic_mode_is_bitwise_repeatable(d):
    q, k, v, o, lse, do, _ = _inputs(2, 1000, 3, d, False, "bfloat16", 9, False)
    fn = jax.jit(lambda *a: cuda.kernel_backward(*a, causal=False, scale=d ** -0.5,
                                                 deterministic=True))
    first, second = fn(q, k, v, o, lse, do), fn(q, k, v, o, lse, do)
    for x, y in zip(first, second):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.mark.gpu
def test_op_gradient_with_lse_cotangent_uses_the_kernel():
    """jax.grad through mgd.attention_forward(impl='cuda') of a loss of both o and lse:
    the backward receives dlse from JAX and must match float64."""
    rng = np.random.default_rng(21)
    shape = (2, 150, 2, 64)
    q, k, v = (draw(rng, shape, jnp.float16) for _ in range(3))
    c = rng.standard_normal(shape)
    c2 = rng.standard_normal((2, 2, 150))

    def loss(q, k, v):
        o, lse = mgd.attention_forward(q, k, v, causal=True, impl="cuda")
        return jnp.sum(o.astype(jnp.float32) * c) + jnp.sum(lse * c2)

    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    # The cotangent reaching the kernel is c rounded to o's dtype.
    do = jnp.asarray(c, jnp.float32).astype(jnp.float16)
    expected = reference_backward(q, k, v, do, c2, causal=True, scale=0.125)
    for name, x, ref in zip(("dq", "dk", "dv"), got, expected):
        assert rel_l2(x, ref) < tolerance("float16", 1), name


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_kernel_and_delegate_agree(monkeypatch, d):
    q, k, v, o, lse, do, dlse = _inputs(1, 300, 2, d, True, "bfloat16", 4, True)
    kw = dict(causal=True, scale=d ** -0.5, dlse=dlse)
    ours = cuda.backward(q, k, v, o, lse, do, **kw)
    monkeypatch.setenv("MGD_CUDA_DELEGATE", "backward")
    theirs = cuda.backward(q, k, v, o, lse, do, **kw)
    expected = reference_backward(q, k, v, do, dlse, causal=True, scale=d ** -0.5)
    for x, y, ref in zip(ours, theirs, expected):
        assert rel_l2(x, ref) < tolerance("bfloat16", 1)
        assert rel_l2(x, y) < 2 * tolerance("bfloat16", 1)
