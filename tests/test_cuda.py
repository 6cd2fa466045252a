"""The CUDA backend (mgd.bindings.cuda): equivalence with the float64 reference on a
Hopper GPU, and honest unavailability everywhere else."""
from __future__ import annotations

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import mgd
from mgd import backends
from mgd.bindings import cuda
from tests.support import (
    DTYPES,
    check_long_causal,
    draw,
    error_vs_reference,
    hvp,
    reference_all,
    reference_hvp,
    rel_l2,
    tolerance,
)


def _qkv(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [draw(rng, shape, dtype) for _ in range(3)]


# ----------------------------------------------------------------------------- CPU

def test_reports_unsupported_dtype():
    q, k, v = _qkv((1, 8, 2, 64), jnp.float32)
    assert "bfloat16 or float16" in cuda.unavailable_reason(q, k, v, causal=True)


def test_reports_unsupported_head_dim():
    q, k, v = _qkv((1, 8, 2, 32), jnp.bfloat16)
    assert "head_dim must be 64 or 128, got 32" in cuda.unavailable_reason(q, k, v, causal=True)


def test_reports_cross_attention():
    q, _, _ = _qkv((1, 8, 2, 64), jnp.bfloat16)
    k, v, _ = _qkv((1, 16, 2, 64), jnp.bfloat16)
    assert "lengths must be equal" in cuda.unavailable_reason(q, k, v, causal=False)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU-only behaviour")
def test_unavailable_on_cpu_names_the_gpu():
    q, k, v = _qkv((1, 8, 2, 64), jnp.bfloat16)
    reason = cuda.unavailable_reason(q, k, v, causal=True)
    assert reason is not None and "GPU" in reason


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU-only behaviour")
def test_explicit_impl_raises_with_reason_and_auto_falls_back():
    q, k, v = _qkv((1, 8, 2, 64), jnp.bfloat16)
    with pytest.raises(mgd.BackendUnavailable, match="impl='cuda'.*GPU"):
        mgd.attention(q, k, v, impl="cuda")
    assert "cuda" not in mgd.available(q, k, v)
    out = mgd.attention(q, k, v, impl="auto")
    assert out.shape == q.shape and np.all(np.isfinite(np.asarray(out, np.float32)))


def test_missing_library_reason_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setenv("MGD_CUDA_LIBRARY", str(tmp_path / "nowhere.so"))
    monkeypatch.setattr(cuda, "_library_candidates", lambda: iter([str(tmp_path / "x.so")]))
    cuda._load.cache_clear()
    try:
        lib, reason = cuda._load()
        assert lib is None and "not built" in reason and "nvcc" in reason
    finally:
        cuda._load.cache_clear()


def test_forward_and_backward_are_delegated_to_a_backend_that_serves():
    q, k, v = _qkv((1, 8, 2, 64), jnp.bfloat16)
    module = cuda._delegate_for(q, k, v, True)
    assert module.NAME != "cuda" and module.unavailable_reason(q, k, v, causal=True) is None
    o, lse = cuda.forward(q, k, v, causal=True, scale=0.125)
    o_ref, lse_ref = mgd.attention_forward(q, k, v, scale=0.125, impl="xla")
    assert rel_l2(o, o_ref) < tolerance("bfloat16", 0)
    assert rel_l2(lse, lse_ref) < tolerance("float32", 0)


def _lowered_for_cuda(monkeypatch, fn, *shapes, split):
    """StableHLO text of `fn` lowered for a CUDA device, on any machine: the library is
    stood in for by its workspace-size function (lowering launches nothing)."""
    import re
    import types

    fake = types.SimpleNamespace(
        MgdDoubleBackwardWorkspaceBytes=lambda b, t, h: b * h * ((t + 127) // 128 * 128) * 16,
        MgdBackwardWorkspaceBytes=lambda b, t, h, d, det: b * h * ((t + 127) // 128 * 128) * 8)
    monkeypatch.setattr(cuda, "_require", lambda: fake)
    monkeypatch.setenv("MGD_CUDA_SPLIT_CALLS", "1" if split else "0")
    text = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    return text, re.findall(r"mgd_attention_[a-z_]+", text)


_ROW = jax.ShapeDtypeStruct((2, 256, 3, 64), jnp.bfloat16)
_LSE = jax.ShapeDtypeStruct((2, 3, 256), jnp.float32)


def _double_backward_part(index):
    def fn(q, k, v, o, lse, do, ddq, ddk, ddv):
        return cuda.double_backward(q, k, v, o, lse, do, ddq, ddk, ddv, causal=True,
                                    scale=0.125)[index]
    return fn


@pytest.mark.parametrize("index, wanted", [
    (0, {"mgd_attention_double_backward_rows", "mgd_attention_double_backward_q"}),   # gq
    (1, {"mgd_attention_double_backward_rows", "mgd_attention_double_backward_kv"}),  # gk
    (3, {"mgd_attention_double_backward_rows"}),                                      # gdo
])
def test_split_double_backward_keeps_only_the_parts_an_output_needs(monkeypatch, index, wanted):
    shapes = (_ROW, _ROW, _ROW, _ROW, _LSE, _ROW, _ROW, _ROW, _ROW)
    _, targets = _lowered_for_cuda(monkeypatch, _double_backward_part(index), *shapes, split=True)
    assert set(targets) == wanted
    _, whole = _lowered_for_cuda(monkeypatch, _double_backward_part(index), *shapes, split=False)
    assert set(whole) == {"mgd_attention_double_backward"}


def test_split_calls_fence_the_forward_outputs(monkeypatch):
    def forward():  # a new function each time: jit caches traces by function
        return lambda q, k, v: cuda.kernel_forward(q, k, v, causal=True, scale=0.125)

    fenced, targets = _lowered_for_cuda(monkeypatch, forward(), _ROW, _ROW, _ROW, split=True)
    plain, _ = _lowered_for_cuda(monkeypatch, forward(), _ROW, _ROW, _ROW, split=False)
    assert targets == ["mgd_attention_forward"]
    assert "optimization_barrier" in fenced and "optimization_barrier" not in plain


def test_split_calls_are_the_default(monkeypatch):
    monkeypatch.delenv("MGD_CUDA_SPLIT_CALLS", raising=False)
    assert cuda.split_calls()
    monkeypatch.setenv("MGD_CUDA_SPLIT_CALLS", "0")
    assert not cuda.split_calls()


def test_registered_in_backends():
    assert backends.MODULES["cuda"] == "mgd.bindings.cuda"
    assert cuda.NAME == "cuda"


# ----------------------------------------------------------------------------- GPU

_LENGTHS = st.sampled_from([1, 7, 63, 64, 65, 127, 128, 129, 200, 255, 257, 385])


@st.composite
def _cases(draw_):
    return dict(b=draw_(st.integers(1, 2)), t=draw_(_LENGTHS), h=draw_(st.integers(1, 3)),
                d=draw_(st.sampled_from([64, 128])), causal=draw_(st.booleans()),
                dtype=draw_(st.sampled_from(["bfloat16", "float16"])),
                seed=draw_(st.integers(0, 2**31 - 1)))


def _check_double_backward(b, t, h, d, causal, dtype, seed):
    dt = DTYPES[dtype]
    rng = np.random.default_rng(seed)
    shape = (b, t, h, d)
    q, k, v, do, ddq, ddk, ddv = (draw(rng, shape, dt) for _ in range(7))
    (o, lse), _, expected = reference_all(q, k, v, do, ddq, ddk, ddv, causal=causal)
    o = jnp.asarray(o, jnp.float32).astype(dt)
    lse = jnp.asarray(lse, jnp.float32)
    got = jax.jit(lambda *a: cuda.double_backward(*a, causal=causal, scale=1 / np.sqrt(d)))(
        q, k, v, o, lse, do, ddq, ddk, ddv)
    for name, x, ref in zip(("gq", "gk", "gv", "gdo"), got, expected):
        assert x.dtype == dt and x.shape == shape
        err = error_vs_reference(x, ref, nonvanishing=expected[3])
        assert err < tolerance(dtype, 2), (name, err, dict(b=b, t=t, h=h, d=d, causal=causal))


@pytest.mark.gpu
@given(_cases())
def test_double_backward_matches_float64(case):
    _check_double_backward(**case)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1000, 2048])
@pytest.mark.parametrize("d", [64, 128])
def test_double_backward_long_causal(t, d):
    _check_double_backward(1, t, 2, d, True, "bfloat16", seed=t + d)


@pytest.mark.gpu
def test_long_causal_sequence_in_linear_memory():
    """T=32768, H=16, D=128: the kernel's own length, rows spot-checked in float64
    (tests/support.py); forward and backward are the delegates the op uses."""
    kw = dict(causal=True, scale=128 ** -0.5)
    check_long_causal(jax.jit(lambda *a: cuda.forward(*a, **kw)),
                      jax.jit(lambda *a: cuda.backward(*a, **kw)),
                      jax.jit(lambda *a: cuda.double_backward(*a, **kw)))


@pytest.mark.gpu
def test_vmap_folds_into_batch():
    rng = np.random.default_rng(3)
    shape = (3, 2, 70, 2, 64)
    q, k, v, do, ddq, ddk, ddv = (draw(rng, shape, jnp.bfloat16) for _ in range(7))
    o, lse = jax.vmap(lambda q, k, v: mgd.attention_forward(q, k, v, impl="xla"))(q, k, v)
    f = lambda *a: cuda.double_backward(*a, causal=True, scale=0.125)  # noqa: E731
    batched = jax.vmap(f)(q, k, v, o, lse, do, ddq, ddk, ddv)
    for i in range(shape[0]):
        single = f(q[i], k[i], v[i], o[i], lse[i], do[i], ddq[i], ddk[i], ddv[i])
        for x, y in zip(batched, single):
            np.testing.assert_array_equal(np.asarray(x[i], np.float32), np.asarray(y, np.float32))


@pytest.mark.gpu
@given(_cases())
def test_grad_of_grad_through_attention(case):
    """Reverse-over-reverse HVP of a loss nonlinear in O, through impl='cuda'."""
    dt = DTYPES[case["dtype"]]
    rng = np.random.default_rng(case["seed"])
    shape = (case["b"], case["t"], case["h"], case["d"])
    q, k, v, uq, uk, uv = (draw(rng, shape, dt) for _ in range(6))
    c = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    attn = lambda q, k, v: mgd.attention(q, k, v, causal=case["causal"], impl="cuda")  # noqa: E731
    got = hvp(attn, q, k, v, c, uq.astype(jnp.float32), uk.astype(jnp.float32),
              uv.astype(jnp.float32))
    expected = reference_hvp(q, k, v, c, uq, uk, uv, causal=case["causal"])
    # The product chains a forward, a backward, the double backward and a second
    # backward through dO = cos(O) * c: twice the double backward's rounding budget.
    for name, x, ref in zip(("q", "k", "v"), got, expected):
        if case["t"] == 1 and name in ("q", "k"):
            # One key per row: O = V whatever q and k are, so these parts are exactly
            # zero; bound the rounding noise by the part that does not vanish.
            err = float(np.linalg.norm(np.asarray(x, np.float64)) / np.linalg.norm(expected[2]))
        else:
            err = rel_l2(x, ref)
        assert err < 2 * tolerance(case["dtype"], 2), (name, err, case)
