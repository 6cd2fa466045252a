"""The public op: argument checking, backend selection, and the custom_vjp nesting."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mgd
from mgd import backends, op
from tests.support import attention_shapes, draw, hvp, reference_hvp, rel_l2


def _qkv(shape=(1, 8, 2, 16), dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(draw(rng, shape, dtype) for _ in range(3))


@given(attention_shapes(max_t=24, head_dims=(8, 16)), st.booleans(), st.integers(0, 2**31 - 1))
def test_custom_rules_give_exact_second_derivatives(shape, causal, seed):
    """The nesting the kernel backends use (custom_vjp around forward, backward and
    double backward), driven by the naive primitives in float64, must reproduce the
    closed-form Hessian-vector product to rounding: this checks the rules themselves,
    separately from any kernel, with a loss nonlinear in O."""
    rng = np.random.default_rng(seed)
    q, k, v, c, uq, uk, uv = (jnp.asarray(rng.standard_normal(shape)) for _ in range(7))
    scale = 1 / np.sqrt(shape[-1])
    got = hvp(lambda q, k, v: op._attention(q, k, v, causal, scale, "xla"), q, k, v, c, uq, uk, uv)
    want = reference_hvp(q, k, v, c, uq, uk, uv, causal=causal)
    for g, ref in zip(got, want):
        assert rel_l2(g, ref) < 1e-10


def test_custom_rules_handle_a_cotangent_on_lse():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 6, 1, 8))) for _ in range(3))
    w = jnp.asarray(rng.standard_normal((1, 1, 6)))

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.tanh(fn(q, k, v)[0])) + jnp.sum(w * fn(q, k, v)[1])

    naive = jax.grad(loss(lambda q, k, v: mgd.reference.xla.forward_with_lse(
        q, k, v, causal=True, scale=0.5)), argnums=(0, 1, 2))(q, k, v)
    custom = jax.grad(loss(lambda q, k, v: op._forward_pair(q, k, v, True, 0.5, "xla")),
                      argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(naive, custom):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_auto_picks_xla_on_cpu_and_works_under_jit_grad():
    q, k, v = _qkv()
    if jax.default_backend() == "cpu":
        assert backends.resolve("auto", q, k, v, causal=True).NAME == "xla"
    f = jax.jit(jax.grad(lambda q: jnp.sum(jnp.sin(mgd.attention(q, k, v)))))
    g = f(q)
    assert g.shape == q.shape and bool(jnp.all(jnp.isfinite(g)))


def test_unknown_impl_is_rejected_by_name():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="impl must be one of"):
        mgd.attention(q, k, v, impl="flash")
    with pytest.raises(TypeError, match="impl must be a string"):
        mgd.attention(q, k, v, impl=3)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU-only refusal")
@pytest.mark.parametrize("impl", ["cuda", "triton"])
def test_gpu_only_backends_refuse_on_cpu_with_a_reason(impl):
    q, k, v = _qkv(dtype=jnp.bfloat16, shape=(1, 8, 2, 64))
    with pytest.raises(mgd.BackendUnavailable, match=impl):
        mgd.attention(q, k, v, impl=impl)


@pytest.mark.parametrize("bad, message", [
    (dict(q=np.zeros((8, 2, 16), np.float32)), "q must have rank 4"),
    (dict(k=np.zeros((1, 8, 3, 16), np.float32)), "k must be"),
    (dict(v=np.zeros((1, 9, 2, 16), np.float32)), "k and v must have the same shape"),
    (dict(q=np.zeros((1, 8, 2, 16), np.int32)), "q must be float32"),
    (dict(k=np.zeros((1, 8, 2, 16), np.float16)), "q, k and v must share one dtype"),
    (dict(q=np.zeros((1, 0, 2, 16), np.float32)), "sequence lengths must be positive"),
    (dict(q=[[1.0]]), "q must be an array"),
])
def test_bad_inputs_name_the_argument(bad, message):
    args = dict(zip("qkv", _qkv()))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=message):
        mgd.attention(args["q"], args["k"], args["v"])


@pytest.mark.parametrize("scale, error", [(0.0, ValueError), (-1.0, ValueError),
                                          (float("nan"), ValueError), ("big", TypeError)])
def test_bad_scale(scale, error):
    with pytest.raises(error, match="scale"):
        mgd.attention(*_qkv(), scale=scale)


def test_bad_causal():
    with pytest.raises(TypeError, match="causal"):
        mgd.attention(*_qkv(), causal="yes")


def test_primitive_arguments_are_checked():
    q, k, v = _qkv()
    o, lse = mgd.attention_forward(q, k, v)
    with pytest.raises(ValueError, match="lse must have shape"):
        mgd.attention_backward(q, k, v, o, lse[:, :, :4], o)
    with pytest.raises(TypeError, match="do must have dtype"):
        mgd.attention_backward(q, k, v, o, lse, o.astype(jnp.float16))
    with pytest.raises(ValueError, match="ddk must have shape"):
        mgd.attention_double_backward(q, k, v, o, lse, o, q, k[:, :3], v)


def test_available_lists_xla_everywhere():
    assert "xla" in mgd.available(*_qkv())
