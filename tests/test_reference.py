"""The closed-form float64 reference against JAX's own autodiff of the naive
forward, in float64: two independent derivations of the same math. Also the
float64 row spot check that the GPU tests apply at T=32768, checked here on the
naive backend at a length the CPU holds."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mgd.reference import float64 as f64
from mgd.reference import xla
from tests.support import attention_shapes, check_long_causal


def _inputs(seed, shape, tk=None):
    rng = np.random.default_rng(seed)
    b, t, h, d = shape
    kv_shape = (b, tk or t, h, d)
    q = rng.standard_normal(shape)
    k, v = rng.standard_normal(kv_shape), rng.standard_normal(kv_shape)
    return rng, q, k, v


def _max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@given(attention_shapes(max_t=48), st.booleans(), st.integers(0, 2**31 - 1))
def test_closed_form_matches_autodiff_in_float64(shape, causal, seed):
    rng, q, k, v = _inputs(seed, shape)
    do, ddq, ddk, ddv = (rng.standard_normal(shape) for _ in range(4))
    scale = 1 / np.sqrt(shape[-1])
    o, lse = f64.forward(q, k, v, causal=causal)
    ox, lsex = xla.forward(*map(jnp.asarray, (q, k, v)), causal=causal, scale=scale)
    assert _max_abs(o, ox) < 1e-10 and _max_abs(lse, lsex) < 1e-10

    grads = f64.backward(q, k, v, do, causal=causal)
    grads_x = xla.backward(q, k, v, o, lse, do, causal=causal, scale=scale)
    for a, b in zip(grads, grads_x):
        assert _max_abs(a, b) < 1e-10

    second = f64.double_backward(q, k, v, do, ddq, ddk, ddv, causal=causal)
    second_x = xla.double_backward(q, k, v, o, lse, do, ddq, ddk, ddv, causal=causal, scale=scale)
    for a, b in zip(second, second_x):
        assert _max_abs(a, b) < 1e-10


@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**31 - 1), st.booleans())
def test_unequal_lengths_and_custom_scale(tq, tk, seed, causal):
    rng, q, k, v = _inputs(seed, (1, tq, 2, 16), tk=tk)
    do, ddq = rng.standard_normal(q.shape), rng.standard_normal(q.shape)
    ddk, ddv = rng.standard_normal(k.shape), rng.standard_normal(k.shape)
    scale = 0.37
    o, lse = f64.forward(q, k, v, causal=causal, scale=scale)
    second = f64.double_backward(q, k, v, do, ddq, ddk, ddv, causal=causal, scale=scale)
    second_x = xla.double_backward(q, k, v, o, lse, do, ddq, ddk, ddv, causal=causal, scale=scale)
    for a, b in zip(second, second_x):
        assert _max_abs(a, b) < 1e-10


def test_causal_first_row_sees_only_first_key():
    _, q, k, v = _inputs(0, (1, 5, 1, 8))
    o, lse = f64.forward(q, k, v, causal=True)
    np.testing.assert_allclose(o[0, 0, 0], v[0, 0, 0], rtol=1e-12)
    np.testing.assert_allclose(lse[0, 0, 0], np.dot(q[0, 0, 0], k[0, 0, 0]) / np.sqrt(8), rtol=1e-12)


def test_double_backward_matches_finite_differences_of_backward():
    # A third, derivation-free check: the double backward is the VJP of the backward,
    # so <dbwd(u), t> must equal <u, d/de bwd(x + e t)> by central differences.
    rng, q, k, v = _inputs(7, (1, 9, 2, 8))
    do = rng.standard_normal(q.shape)
    u = [rng.standard_normal(q.shape) for _ in range(3)]
    t = [rng.standard_normal(q.shape) for _ in range(4)]
    eps = 1e-5
    plus = f64.backward(*(x + eps * d for x, d in zip((q, k, v, do), t)), causal=True)
    minus = f64.backward(*(x - eps * d for x, d in zip((q, k, v, do), t)), causal=True)
    directional = sum(np.sum(ui * (p - m) / (2 * eps)) for ui, p, m in zip(u, plus, minus))
    second = f64.double_backward(q, k, v, do, *u, causal=True)
    assert abs(sum(np.sum(g * d) for g, d in zip(second, t)) - directional) < 1e-6 * max(1, abs(directional))


def test_autotuners_hold_candidates_to_the_tests_bf16_tolerance():
    from mgd.reference import agreement
    from tests.support import TOLERANCE
    assert agreement.BF16_TOLERANCE == TOLERANCE["bfloat16"]


def test_long_sequence_check_passes_a_correct_backend_and_catches_a_wrong_one():
    """The long-sequence spot check of the GPU tests (tests/support.py), run here on
    the naive XLA backend at a length the CPU can hold: it passes, and it fails, naming
    the output, when one row of Q' is off by a tenth."""
    kw = dict(causal=True, scale=128 ** -0.5)
    forward = jax.jit(lambda *a: xla.forward(*a, **kw))
    backward = jax.jit(lambda *a: xla.backward(*a, **kw))
    double_backward = jax.jit(lambda *a: xla.double_backward(*a, **kw))
    check_long_causal(forward, backward, double_backward, t=300, h=2)

    def wrong(*a):
        gq, gk, gv, gdo = double_backward(*a)
        return gq.at[0, 1, 0].multiply(1.1), gk, gv, gdo

    with pytest.raises(AssertionError, match=r"gq\[row 1, head 0\]"):
        check_long_causal(forward, backward, wrong, t=300, h=2)

    def wrong_first_row(*a):  # row 0's gq is exactly zero: noise passes, a value must not
        gq, gk, gv, gdo = double_backward(*a)
        return gq.at[0, 0, 1].set(gq[0, 1, 1]), gk, gv, gdo

    with pytest.raises(AssertionError, match=r"gq\[row 0, head 1\]"):
        check_long_causal(forward, backward, wrong_first_row, t=300, h=2)
