"""The two-sweep double backward's tile algebra (reference/two_sweep.py) against the
closed-form float64 double backward: tails, several heads and batches, causal or not,
both head dims the kernels serve, and 15 tile products per visited tile pair."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mgd.reference import float64, two_sweep


def _inputs(seed, shape):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for _ in range(7)]


@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 2), t=st.integers(1, 150), h=st.integers(1, 2),
       d=st.sampled_from([16, 64]), causal=st.booleans(),
       blocks=st.sampled_from([(64, 64), (32, 64), (64, 128), (16, 16)]),
       seed=st.integers(0, 2**31 - 1))
def test_two_sweeps_match_the_closed_form(b, t, h, d, causal, blocks, seed):
    q, k, v, do, ddq, ddk, ddv = _inputs(seed, (b, t, h, d))
    scale = 0.7 / np.sqrt(d)
    want = float64.double_backward(q, k, v, do, ddq, ddk, ddv, causal=causal, scale=scale)
    counter = two_sweep.TileCounter()
    got = two_sweep.double_backward(q, k, v, do, ddq, ddk, ddv, causal=causal, scale=scale,
                                    block_q=blocks[0], block_k=blocks[1], counter=counter)
    for name, g, w in zip(("Q'", "K'", "V'", "dO'"), got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-9 * max(1.0, np.abs(w).max()),
                                   err_msg=name)
    # 5 tile products per pair in sweep A and 10 in sweep B: the 15-product floor.
    assert counter.products["A"] == 5 * counter.pairs["A"]
    assert counter.products["B"] == 10 * counter.pairs["B"]
    assert counter.pairs["A"] == counter.pairs["B"]


def test_causal_tiles_past_the_diagonal_are_skipped():
    """Under causal, a sweep visits only tile pairs with an unmasked entry: for 4 tiles a
    side, 10 of 16."""
    x = _inputs(0, (1, 256, 1, 64))
    counter = two_sweep.TileCounter()
    two_sweep.double_backward(*x, causal=True, counter=counter)
    assert counter.pairs == {"A": 10, "B": 10}


def test_cross_attention_is_refused():
    q = np.zeros((1, 8, 1, 16))
    k = np.zeros((1, 9, 1, 16))
    with pytest.raises(ValueError, match="Tq == Tk"):
        two_sweep.double_backward(q, k, k, q, q, k, k)


@pytest.mark.parametrize("blocks", [(0, 64), (64, -1)])
def test_tile_sizes_below_one_are_refused(blocks):
    x = _inputs(0, (1, 8, 1, 16))
    with pytest.raises(ValueError, match="block_q and block_k"):
        two_sweep.double_backward(*x, block_q=blocks[0], block_k=blocks[1])
