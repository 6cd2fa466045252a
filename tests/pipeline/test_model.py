"""The transformer: chunked loss against full logits, causality, rotary, dtypes, routing."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mgd
from mgd.pipeline import model

F64 = model.GPTConfig(vocab_size=97, seq_len=24, n_layer=2, n_head=2, d_model=16,
                      attention_impl="xla", compute_dtype="float64", param_dtype="float64",
                      loss_chunk=13)


def _rows(n, cfg, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (n, cfg.seq_len + 1)).astype(np.int32)


def _perturbed(params, seed=1, scale=0.3):
    """Away from init (norm scales 1, small weights) so the checks are not degenerate."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def _naive_losses(params, seqs, cfg):
    """Independent reference: the full [N, L, V] logits and log-softmax."""
    h = model.forward(params, seqs[:, :-1], cfg)
    logits = jnp.einsum("ntd,vd->ntv", h, params["embed"].astype(h.dtype))
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, seqs[:, 1:, None], axis=-1)[..., 0]
    return nll.mean(axis=1)


@pytest.mark.parametrize("chunk", [13, 4096])
def test_chunked_loss_and_gradient_match_full_logits(chunk):
    cfg = dataclasses.replace(F64, loss_chunk=chunk)
    params = _perturbed(model.init_params(cfg, jax.random.key(0)))
    seqs = _rows(3, cfg)                       # 72 target tokens: a chunk of 13 does not divide it
    w = jnp.asarray([0.3, -1.2, 2.0])

    @jax.jit
    def both(params):
        g = jax.grad(lambda p: jnp.sum(w * model.per_example_loss(p, seqs, cfg)))(params)
        g_ref = jax.grad(lambda p: jnp.sum(w * _naive_losses(p, seqs, cfg)))(params)
        return (model.per_example_loss(params, seqs, cfg), _naive_losses(params, seqs, cfg),
                g, g_ref)

    got, ref, g, g_ref = both(params)
    assert got.shape == (3,)
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_forward_is_causal():
    params = _perturbed(model.init_params(F64, jax.random.key(0)))
    x = _rows(2, F64)[:, :-1]
    y = x.copy()
    y[:, 15] = (y[:, 15] + 1) % F64.vocab_size
    hx, hy = model.forward(params, x, F64), model.forward(params, y, F64)
    np.testing.assert_array_equal(hx[:, :15], hy[:, :15])
    assert np.abs(np.asarray(hx[:, 15:] - hy[:, 15:])).max() > 1e-3


def test_rotary_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(0)
    q0, k0 = rng.standard_normal(8), rng.standard_normal(8)
    t = 12
    q = model._rotary(jnp.asarray(np.tile(q0, (1, t, 1, 1))), 10_000.0)[0, :, 0]
    k = model._rotary(jnp.asarray(np.tile(k0, (1, t, 1, 1))), 10_000.0)[0, :, 0]
    s = np.asarray(q @ k.T)
    for off in range(-3, 4):
        d = np.diagonal(s, off)
        np.testing.assert_allclose(d, d[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s[0, 0], q0 @ k0, rtol=1e-5)   # position 0: no rotation


def test_default_dtypes_and_initial_loss():
    cfg = model.GPTConfig(vocab_size=211, seq_len=16, n_layer=2, n_head=2, d_model=32)
    params = model.init_params(cfg, jax.random.key(3))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    assert model.param_count(params) == 211 * 32 + 2 * (2 * 32 + 32 * 96 + 32 * 32 + 2 * 32 * 128) + 32
    seqs = _rows(4, cfg)
    h = model.forward(params, seqs[:, :-1], cfg)
    assert h.dtype == jnp.bfloat16 and h.shape == (4, 16, 32)
    losses = model.per_example_loss(params, seqs, cfg)
    assert losses.dtype == jnp.float32
    # Small init: predictions near uniform.
    np.testing.assert_allclose(losses, math.log(211), rtol=0.05)
    feats = model.features(params, seqs, cfg)
    assert feats.shape == (4, 32) and feats.dtype == jnp.float32
    np.testing.assert_allclose(feats, np.asarray(h, np.float32).mean(1), rtol=1e-6, atol=1e-6)


def test_attention_goes_through_mgd_attention(monkeypatch):
    seen = []
    real = mgd.attention

    def spy(q, k, v, *, causal=True, scale=None, impl="auto"):
        seen.append((q.shape, q.dtype, causal, impl))
        return real(q, k, v, causal=causal, scale=scale, impl=impl)

    monkeypatch.setattr(mgd, "attention", spy)
    cfg = model.GPTConfig(vocab_size=64, seq_len=8, n_layer=3, n_head=2, d_model=16,
                          attention_impl="xla", remat_blocks=False)
    params = model.init_params(cfg, jax.random.key(0))
    model.forward(params, _rows(5, cfg)[:, :-1], cfg)
    # One traced call: the layers run under lax.scan.
    assert seen == [((5, 8, 2, 8), jnp.bfloat16, True, "xla")]


def test_bits_per_byte_and_config_errors():
    assert model.bits_per_byte(math.log(2) * 3.0, 1.5) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="bytes_per_token"):
        model.bits_per_byte(1.0, 0)
    with pytest.raises(ValueError, match="divisible by n_head"):
        model.GPTConfig(vocab_size=10, seq_len=4, d_model=30, n_head=4)
    with pytest.raises(ValueError, match="n_layer"):
        model.GPTConfig(vocab_size=10, seq_len=4, n_layer=0)
    params = model.init_params(F64, jax.random.key(0))
    with pytest.raises(ValueError, match="seq_len=24"):
        model.forward(params, np.zeros((1, 30), np.int32), F64)
    with pytest.raises(ValueError, match=r"\[N, L\+1\]"):
        model.per_example_loss(params, np.zeros((3,), np.int32), F64)


def _grad_jaxpr(cfg, params, seqs):
    return jax.make_jaxpr(jax.grad(lambda p: jnp.sum(model.per_example_loss(p, seqs, cfg))))(params)


@pytest.mark.parametrize("remat, keep, forwards", [(False, False, 1), (True, False, 2), (True, True, 1)])
def test_block_remat_keeps_attention_outputs_and_the_gradient(remat, keep, forwards):
    """Full block remat reruns the attention forward in the backward; keeping attention's
    outputs does not; the gradient is the unrematerialized one either way (Pallas
    kernels, interpreted)."""
    from mgd.pipeline import jaxpr_count

    base = model.GPTConfig(vocab_size=53, seq_len=16, n_layer=2, n_head=2, d_model=32,
                           attention_impl="pallas", compute_dtype="float32", remat_blocks=False)
    cfg = dataclasses.replace(base, remat_blocks=remat, remat_keeps_attention=keep)
    params = _perturbed(model.init_params(base, jax.random.key(0)), scale=0.05)
    seqs = _rows(3, base, seed=2)
    counts = jaxpr_count.count(_grad_jaxpr(cfg, params, seqs))
    assert counts.attention == {"forward": forwards * base.n_layer,
                                "backward": base.n_layer, "double_backward": 0}
    def grad(c):
        return jax.jit(jax.grad(lambda p: jnp.sum(model.per_example_loss(p, seqs, c))))(params)

    for a, b in zip(jax.tree_util.tree_leaves(grad(cfg)), jax.tree_util.tree_leaves(grad(base))):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)


def test_standin_attention_is_not_attention(monkeypatch):
    """The stand-in (benchmarks only) never reaches mgd.attention and computes v + 1e-6 (q + k)."""
    monkeypatch.setattr(mgd, "attention", lambda *a, **k: pytest.fail("mgd.attention called"))
    cfg = model.GPTConfig(vocab_size=64, seq_len=8, n_layer=1, n_head=2, d_model=16,
                          attention_impl=model.STANDIN, compute_dtype="float32")
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 8, 2, 8)), jnp.float32) for _ in range(3))
    np.testing.assert_allclose(model._attention(q, k, v, cfg), v + 1e-6 * (q + k), rtol=1e-7)
    params = model.init_params(cfg, jax.random.key(0))
    assert np.all(np.isfinite(model.per_example_loss(params, _rows(2, cfg), cfg)))


def _reference_bf16_losses(params, seqs, cfg):
    """Independent reference: layer by layer in Python, each weight cast to the compute dtype
    where it is used, full [N, L, V] logits."""
    c, acc = cfg.cdtype, jnp.float32

    def norm(x, s):
        x = x.astype(acc)
        return (x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * s).astype(c)

    def mm(x, w):
        return jnp.einsum("...i,io->...o", x.astype(c), w.astype(c), preferred_element_type=acc)

    tokens = seqs[:, :-1]
    b, t = tokens.shape
    x = params["embed"][tokens].astype(acc)
    blocks = params["blocks"]
    for i in range(cfg.n_layer):
        h = norm(x, blocks["norm1"][i])
        qkv = mm(h, blocks["wqkv"][i]).astype(c).reshape(b, t, 3, cfg.n_head, cfg.head_dim)
        q, k = (model._rotary(qkv[:, :, j], cfg.rope_base) for j in (0, 1))
        o = mgd.attention(q, k, qkv[:, :, 2], causal=True, impl="xla")
        x = x + mm(o.reshape(b, t, -1), blocks["wo"][i])
        up = jax.nn.gelu(mm(norm(x, blocks["norm2"][i]), blocks["w_up"][i]).astype(c))
        x = x + mm(up, blocks["w_down"][i])
    h = norm(x, params["norm_f"])
    logits = jnp.einsum("ntd,vd->ntv", h, params["embed"].astype(c), preferred_element_type=acc)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, seqs[:, 1:, None], -1)[..., 0]
    return nll.mean(axis=1)


def _converts(jaxpr, out):
    """Output shapes of every float32 -> bfloat16 convert in a jaxpr and its sub-jaxprs."""
    for eqn in jaxpr.eqns:
        if (eqn.primitive.name == "convert_element_type" and eqn.invars[0].aval.dtype == jnp.float32
                and eqn.outvars[0].aval.dtype == jnp.bfloat16):
            out.append(tuple(eqn.outvars[0].aval.shape))
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                    _converts(item.jaxpr, out)
                elif hasattr(item, "eqns"):
                    _converts(item, out)
    return out


@pytest.mark.parametrize("remat", [False, True])
def test_bf16_weights_cast_once_per_forward_same_loss_and_gradient(remat):
    """In bf16 the blocks' matrices are cast once, before the layer scan (no per-layer
    weight cast inside it, recomputed or not), and the loss and gradient are those of
    casting each weight where it is used."""
    cfg = model.GPTConfig(vocab_size=61, seq_len=16, n_layer=2, n_head=2, d_model=32,
                          attention_impl="xla", remat_blocks=remat, loss_chunk=20)
    params = _perturbed(model.init_params(cfg, jax.random.key(4)), scale=0.05)
    seqs = _rows(3, cfg, seed=5)
    w = jnp.asarray([0.5, 1.0, -2.0])

    def loss(p):
        return jnp.sum(w * model.per_example_loss(p, seqs, cfg))

    per_layer = {params["blocks"][n].shape[1:] for n in model.MATRICES}
    stacked = {params["blocks"][n].shape for n in model.MATRICES}
    shapes = _converts(jax.make_jaxpr(loss)(params).jaxpr, [])
    assert not per_layer & set(shapes) and stacked <= set(shapes), shapes
    # In the gradient, a per-layer matrix-shaped cast is only the matmul transpose's rounding
    # of each weight's gradient to the weight's dtype: one per matrix, rematerialized or not.
    shapes = _converts(jax.make_jaxpr(jax.grad(loss))(params).jaxpr, [])
    assert sorted(s for s in shapes if s in per_layer) == sorted(per_layer), shapes

    got, g = jax.jit(jax.value_and_grad(lambda p: (loss(p), model.per_example_loss(p, seqs, cfg)),
                                        has_aux=True))(params)
    ref, g_ref = jax.jit(jax.value_and_grad(
        lambda p: (jnp.sum(w * _reference_bf16_losses(p, seqs, cfg)),
                   _reference_bf16_losses(p, seqs, cfg)), has_aux=True))(params)
    np.testing.assert_allclose(got[1], ref[1], rtol=2e-3)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-2 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_matmul_2d_derivatives_of_every_order_match_plain_products(transpose_a, transpose_b):
    """In float64 (where its cotangent cast is a no-op) matmul_2d's custom derivative rule
    gives autodiff's values: the product, its gradient, and gradients of gradients."""
    with jax.enable_x64():
        rng = np.random.default_rng(7)
        a = jnp.asarray(rng.standard_normal((7, 5) if transpose_a else (5, 7)))
        b = jnp.asarray(rng.standard_normal((3, 7) if transpose_b else (7, 3)))

        def plain(a, b):
            return (a.T if transpose_a else a) @ (b.T if transpose_b else b)

        def ours(a, b):
            return model.matmul_2d(a, b, transpose_a, transpose_b)

        def loss(mm):
            return lambda a, b: jnp.sum(jnp.sin(mm(a, b)))

        def second(mm):  # the gradient of a function of the gradient: a metagradient's shape
            g = jax.grad(loss(mm), argnums=(0, 1))
            return jax.grad(lambda a, b: jnp.sum(jnp.cos(g(a, b)[0])) + jnp.sum(g(a, b)[1] ** 2),
                            argnums=(0, 1))

        def third(mm):
            g2 = second(mm)
            return jax.grad(lambda a, b: jnp.sum(jnp.tanh(g2(a, b)[1])), argnums=(0, 1))

        np.testing.assert_allclose(ours(a, b), plain(a, b), rtol=1e-13)
        for order in (lambda mm: jax.grad(loss(mm), argnums=(0, 1)), second, third):
            for got, want in zip(order(ours)(a, b), order(plain)(a, b)):
                np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)


def test_bf16_products_take_bf16_cotangents():
    """At bf16 compute every product of a second-order gradient has bf16 operands (an f32
    cotangent against a bf16 weight would run as a float32 product)."""
    cfg = model.GPTConfig(vocab_size=61, seq_len=16, n_layer=2, n_head=2, d_model=32,
                          attention_impl=model.STANDIN, loss_chunk=20)
    params = model.init_params(cfg, jax.random.key(1))
    seqs = _rows(2, cfg, seed=2)

    def inner(p):
        return jnp.sum(model.per_example_loss(p, seqs, cfg))

    def outer(p):  # a function of the gradient, differentiated again
        g = jax.grad(inner)(p)
        return sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree_util.tree_leaves(g))

    from mgd.pipeline import jaxpr_count
    c = jaxpr_count.count(jax.make_jaxpr(jax.grad(outer))(params))
    assert c.dense_flops > 0 and c.wide_flops == 0


@pytest.mark.parametrize("remat", [False, True])
def test_unrolled_layers_match_the_scan_to_second_order(remat):
    """A Python loop over the layers computes what the layer scan does: loss, gradient and a
    Hessian-vector product in float64, and its program has no scan over the layers."""
    scan = dataclasses.replace(F64, n_layer=3, remat_blocks=remat, remat_keeps_attention=remat)
    loop = dataclasses.replace(scan, scan_layers=False)
    params = _perturbed(model.init_params(scan, jax.random.key(3)))
    seqs = _rows(2, scan, seed=4)
    tangent = _perturbed(jax.tree_util.tree_map(jnp.zeros_like, params), seed=5, scale=1.0)

    def loss_grad_hvp(cfg):
        def loss(p):
            return jnp.sum(model.per_example_loss(p, seqs, cfg))
        hvp = jax.jvp(jax.grad(loss), (params,), (tangent,))[1]
        return loss(params), jax.grad(loss)(params), hvp

    for a, b in zip(jax.tree_util.tree_leaves(jax.jit(lambda: loss_grad_hvp(loop))()),
                    jax.tree_util.tree_leaves(jax.jit(lambda: loss_grad_hvp(scan))())):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    def layer_scans(cfg):   # scans of n_layer steps (the loss's chunk map has 4)
        jaxpr = jax.make_jaxpr(lambda p: model.per_example_loss(p, seqs, cfg))(params)
        return str(jaxpr).count(f"length={scan.n_layer}")

    assert layer_scans(loop) == 0 and layer_scans(scan) == 1
