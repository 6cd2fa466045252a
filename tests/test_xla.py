"""The naive XLA backend in float32/bf16/fp16 against the float64 reference."""
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mgd
from tests.support import DTYPES, attention_shapes, draw, hvp, reference_all, reference_hvp, rel_l2, tolerance


@given(attention_shapes(max_t=64), st.sampled_from(sorted(DTYPES)), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_primitives_match_float64(shape, dtype_name, causal, seed):
    rng = np.random.default_rng(seed)
    dtype = DTYPES[dtype_name]
    q, k, v, do, ddq, ddk, ddv = (draw(rng, shape, dtype) for _ in range(7))
    (o_ref, lse_ref), grads_ref, second_ref = reference_all(q, k, v, do, ddq, ddk, ddv,
                                                            causal=causal)
    o, lse = mgd.attention_forward(q, k, v, causal=causal, impl="xla")
    assert o.dtype == dtype and lse.dtype == np.float32 and lse.shape == (shape[0], shape[2], shape[1])
    assert rel_l2(o, o_ref) < tolerance(dtype_name, 0)
    assert rel_l2(lse, lse_ref) < tolerance(dtype_name, 0)

    grads = mgd.attention_backward(q, k, v, o, lse, do, causal=causal, impl="xla")
    for g, ref in zip(grads, grads_ref):
        assert g.dtype == dtype
        assert rel_l2(g, ref) < tolerance(dtype_name, 1)

    second = mgd.attention_double_backward(q, k, v, o, lse, do, ddq, ddk, ddv, causal=causal,
                                           impl="xla")
    for g, ref in zip(second, second_ref):
        assert rel_l2(g, ref) < tolerance(dtype_name, 2)


@settings(max_examples=6)
@given(attention_shapes(max_t=48, head_dims=(16, 32)), st.sampled_from(["float32", "bfloat16"]),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_hessian_vector_product_through_attention(shape, dtype_name, causal, seed):
    rng = np.random.default_rng(seed)
    dtype = DTYPES[dtype_name]
    q, k, v = (draw(rng, shape, dtype) for _ in range(3))
    c, uq, uk, uv = (draw(rng, shape, np.float32) for _ in range(4))
    got = hvp(lambda q, k, v: mgd.attention(q, k, v, causal=causal, impl="xla"),
              q, k, v, c, uq, uk, uv)
    want = reference_hvp(q, k, v, c, uq, uk, uv, causal=causal)
    for g, ref in zip(got, want):
        assert rel_l2(g, ref) < tolerance(dtype_name, 2)


def test_primitive_outputs_are_consistent_with_op_under_jit_and_vmap():
    rng = np.random.default_rng(3)
    q, k, v = (draw(rng, (3, 2, 17, 2, 16), np.float32) for _ in range(3))
    batched = jax.jit(jax.vmap(lambda q, k, v: mgd.attention(q, k, v, impl="xla")))(q, k, v)
    for i in range(3):
        single = mgd.attention_forward(q[i], k[i], v[i], impl="xla")[0]
        np.testing.assert_allclose(batched[i], single, rtol=2e-5, atol=2e-5)


@pytest.mark.gpu
@settings(max_examples=10)
@given(st.sampled_from([(1, 512, 4, 64), (2, 1000, 2, 128), (1, 257, 3, 64)]),
       st.sampled_from(["bfloat16", "float16"]), st.booleans(), st.integers(0, 2**31 - 1))
def test_primitives_match_float64_on_gpu(shape, dtype_name, causal, seed):
    test_primitives_match_float64.hypothesis.inner_test(shape, dtype_name, causal, seed)
