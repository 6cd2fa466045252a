"""A small decoder-only transformer in JAX, readable in one sitting.

Pre-norm blocks (RMSNorm), rotary positions, a GELU MLP, tied input/output
embeddings, no biases. Parameters are float32 (or whatever `param_dtype` says);
matrix products run in `compute_dtype` (bf16 by default) with float32
accumulation, their derivatives too (`matmul_2d`), and the residual stream, norms and
softmax statistics stay in float32. Attention goes through `mgd.attention`, so `attention_impl` picks the
kernel whose backward and double backward the metagradient runs through.

The layers are stacked along a leading axis and run with `lax.scan`: one
compiled block regardless of depth.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import mgd
from mgd.op import RESIDUAL_NAMES

__all__ = ["GPTConfig", "init_params", "forward", "per_example_loss", "token_losses",
           "features", "bits_per_byte", "param_count"]


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    seq_len: int
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    d_ff: int | None = None            # 4 * d_model when None
    # "xla", "pallas", "triton", "cuda" or "auto"; STANDIN (benchmarks and tests only)
    # replaces attention by a near-free function of the same shapes.
    attention_impl: str = "auto"
    compute_dtype: str = "bfloat16"
    param_dtype: str = "float32"
    rope_base: float = 10_000.0
    loss_chunk: int = 1024             # tokens per cross-entropy chunk
    remat_blocks: bool = True          # recompute each block's activations in the backward
    # With remat_blocks: keep attention's output and row log-sum-exp across the block's
    # recompute, so the backward recomputes the block's matmuls and elementwise work but
    # never the attention forward (the kernel that dominates a long sequence).
    remat_keeps_attention: bool = False
    # False: a Python loop over the layers. A scan stacks each layer's residuals into
    # [n_layer, ...] buffers, which a GPU fills and reads by copies; the loop keeps them
    # apart at the price of a longer compile.
    scan_layers: bool = True
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model", "loss_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"GPTConfig.d_model ({self.d_model}) must be divisible by "
                             f"n_head ({self.n_head})")
        if (self.d_model // self.n_head) % 2:
            raise ValueError("GPTConfig: head dim d_model // n_head must be even for rotary")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ff(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def cdtype(self):
        return jnp.dtype(self.compute_dtype)

    @property
    def acc_dtype(self):
        # float32 for bf16/fp16/fp32 compute; float64 stays float64 (the gradient checks).
        return jnp.promote_types(self.cdtype, jnp.float32)


def init_params(cfg: GPTConfig, key) -> dict:
    """Normal(0, init_std) weights; output projections scaled by 1/sqrt(2 n_layer)
    so the residual stream's variance does not grow with depth; norm scales 1."""
    d, n, ff = cfg.d_model, cfg.n_layer, cfg.ff
    pdt = jnp.dtype(cfg.param_dtype)
    k = jax.random.split(key, 5)
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * n)

    def normal(key, shape, s):
        return (s * jax.random.normal(key, shape, jnp.float32)).astype(pdt)

    return {
        "embed": normal(k[0], (cfg.vocab_size, d), std),
        "blocks": {
            "norm1": jnp.ones((n, d), pdt),
            "wqkv": normal(k[1], (n, d, 3 * d), std),
            "wo": normal(k[2], (n, d, d), out_std),
            "norm2": jnp.ones((n, d), pdt),
            "w_up": normal(k[3], (n, d, ff), std),
            "w_down": normal(k[4], (n, ff, d), out_std),
        },
        "norm_f": jnp.ones((d,), pdt),
    }


def param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def _rms_norm(x, scale, out_dtype):
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    return (y * scale.astype(y.dtype)).astype(out_dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul_2d(a, b, transpose_a: bool = False, transpose_b: bool = False):
    """op(a) @ op(b) for 2-D `a`, `b` of one dtype, accumulated and returned in float32 (or
    wider). Its derivatives, of every order, cast the incoming cotangent to the operands'
    dtype first, so that the backward's products run at the compute dtype's tensor rate
    instead of as float32 products against a bf16 operand."""
    return _plain_matmul_2d(a, b, transpose_a, transpose_b)


def _plain_matmul_2d(a, b, transpose_a, transpose_b):
    if a.dtype != b.dtype:
        raise ValueError(f"matmul_2d operands must share a dtype, got {a.dtype} and {b.dtype}")
    acc = jnp.promote_types(a.dtype, jnp.float32)
    return jax.lax.dot_general(a, b, (((0 if transpose_a else 1,), (1 if transpose_b else 0,)),
                                      ((), ())), preferred_element_type=acc)


def _matmul_2d_fwd(a, b, transpose_a, transpose_b):
    # The primal through matmul_2d itself, so that differentiating a derivative keeps the rule.
    return matmul_2d(a, b, transpose_a, transpose_b), (a, b)


def _matmul_2d_bwd(transpose_a, transpose_b, res, g):
    a, b = res
    g = g.astype(a.dtype)
    # C = op(a) op(b): d op(a) = G op(b)^T and d op(b) = op(a)^T G, written back as matmuls.
    if transpose_a:
        da = matmul_2d(b, g, transpose_b, True)
    else:
        da = matmul_2d(g, b, False, not transpose_b)
    if transpose_b:
        db = matmul_2d(g, a, True, transpose_a)
    else:
        db = matmul_2d(a, g, not transpose_a, False)
    return da.astype(a.dtype), db.astype(b.dtype)


matmul_2d.defvjp(_matmul_2d_fwd, _matmul_2d_bwd)


def _narrow(cfg: GPTConfig) -> bool:
    """Compute dtype narrower than float32: the products need matmul_2d's cotangent cast
    (at float32 or wider autodiff's own products already run at the compute dtype)."""
    return cfg.cdtype.itemsize < 4


def _matmul(x, w, cfg):
    """x [..., i] @ w [i, o] in compute dtype, accumulated in float32: [..., o]."""
    x, w = x.astype(cfg.cdtype), w.astype(cfg.cdtype)
    if not _narrow(cfg):
        return jnp.einsum("...i,io->...o", x, w, preferred_element_type=cfg.acc_dtype)
    out = matmul_2d(x.reshape(-1, x.shape[-1]), w)
    return out.reshape(x.shape[:-1] + (w.shape[-1],))


def _rotary(x, base):
    """Rotate channel pairs (i, i + D/2) of [B, T, H, D] by position-dependent angles."""
    t, dh = x.shape[1], x.shape[-1]
    inv_freq = base ** (-np.arange(0, dh // 2, dtype=np.float64) * 2 / dh)
    angles = np.arange(t, dtype=np.float64)[:, None] * inv_freq[None, :]      # [T, D/2]
    acc = jnp.promote_types(x.dtype, jnp.float32)
    cos = jnp.asarray(np.cos(angles), acc)[None, :, None, :]
    sin = jnp.asarray(np.sin(angles), acc)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(acc), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(x.dtype)


# Not an attention backend: what the round costs outside attention is the round with this.
STANDIN = "standin"


def _standin_attention(q, k, v):
    """Same shapes and dependence on q, k, v as attention, almost no work: v + 1e-6 (q + k)."""
    return v + jnp.asarray(1e-6, v.dtype) * (q + k)


def _attention(q, k, v, cfg: GPTConfig):
    if cfg.attention_impl == STANDIN:
        return _standin_attention(q, k, v)
    return mgd.attention(q, k, v, causal=True, impl=cfg.attention_impl)


def _block_remat(body, cfg: GPTConfig):
    """`body` rematerialized as the config says: not at all, fully, or all but attention."""
    if not cfg.remat_blocks:
        return body
    if cfg.remat_keeps_attention:
        # The naive XLA attention names no outputs: under this policy it is recomputed whole.
        return jax.checkpoint(body, policy=jax.checkpoint_policies.save_only_these_names(
            *RESIDUAL_NAMES))
    return jax.checkpoint(body)


def _block(x, p, cfg: GPTConfig):
    return _block_with_mlp_activation(x, p, cfg)[0]


def _block_with_mlp_activation(x, p, cfg: GPTConfig):
    """(block output, the MLP's activation: the input of w_down)."""
    b, t, d = x.shape
    h = _rms_norm(x, p["norm1"], cfg.cdtype)
    qkv = _matmul(h, p["wqkv"], cfg).astype(cfg.cdtype).reshape(b, t, 3, cfg.n_head, cfg.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q, k = _rotary(q, cfg.rope_base), _rotary(k, cfg.rope_base)
    o = _attention(q, k, v, cfg)
    x = x + _matmul(o.reshape(b, t, d), p["wo"], cfg)
    h = _rms_norm(x, p["norm2"], cfg.cdtype)
    # Cast before the nonlinearity: its input is what the backward keeps, and the
    # widest activation of the block is better kept in compute dtype.
    up = jax.nn.gelu(_matmul(h, p["w_up"], cfg).astype(cfg.cdtype))
    return x + _matmul(up, p["w_down"], cfg), up


def _embed(params, tokens, cfg: GPTConfig):
    """Input embeddings [N, T, d] of int tokens [N, T], in the accumulation dtype."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    if tokens.shape[1] > cfg.seq_len:
        raise ValueError(f"tokens have {tokens.shape[1]} positions, more than "
                         f"GPTConfig.seq_len={cfg.seq_len}")
    x = params["embed"][tokens].astype(cfg.acc_dtype)
    return x


def map_token_chunks(fn, arrays, chunk: int):
    """fn over the leading (token) axis of `arrays` in chunks of `chunk` rows, the last
    one padded, results trimmed and concatenated: what keeps [tokens, vocab]
    intermediates to `chunk` rows at a time."""
    m = arrays[0].shape[0]
    if m <= chunk:
        return fn(*arrays)
    n_chunks = -(-m // chunk)
    pad = n_chunks * chunk - m
    padded = [jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1))
              .reshape((n_chunks, chunk) + a.shape[1:]) for a in arrays]
    out = jax.lax.map(lambda args: fn(*args), padded)
    return out.reshape((n_chunks * chunk,) + out.shape[2:])[:m]


# The blocks' matrices (the rest are norm scales, used in float32).
MATRICES = ("wqkv", "wo", "w_up", "w_down")


def _compute_blocks(blocks, cfg: GPTConfig):
    """The stacked blocks with their matrices in compute dtype: cast once per forward, before
    the layer scan, not on every use (each recompute and backward would cast again)."""
    return {name: w.astype(cfg.cdtype) if name in MATRICES else w for name, w in blocks.items()}


def forward(params, tokens, cfg: GPTConfig):
    """Final hidden states [N, T, d] (after the last norm, in compute dtype) for
    int tokens [N, T]."""
    x = _embed(params, tokens, cfg)

    def body(x, p):
        return _block(x, p, cfg), None

    x = _run_layers(_block_remat(body, cfg), x, _compute_blocks(params["blocks"], cfg), cfg)
    return _rms_norm(x, params["norm_f"], cfg.cdtype)


def _run_layers(body, x, blocks, cfg: GPTConfig):
    """x through the stacked `blocks` by `body(x, p) -> (x, None)`: scanned or unrolled."""
    if cfg.scan_layers:
        return jax.lax.scan(body, x, blocks)[0]
    for i in range(jax.tree_util.tree_leaves(blocks)[0].shape[0]):
        x = body(x, jax.tree_util.tree_map(lambda a, i=i: a[i], blocks))[0]
    return x


def forward_with_last_layer(params, tokens, cfg: GPTConfig):
    """(final hidden states [N, T, d] as `forward` returns them, the residual stream
    before the final norm [N, T, d], the last block's MLP activation [N, T, ff]): what
    the last layer's gradients need besides the output layer (scorer.last_layer_alignment)."""
    x = _embed(params, tokens, cfg)
    blocks = _compute_blocks(params["blocks"], cfg)
    first = jax.tree_util.tree_map(lambda a: a[:-1], blocks)
    last = jax.tree_util.tree_map(lambda a: a[-1], blocks)
    x = _run_layers(lambda x, p: (_block(x, p, cfg), None), x, first, cfg)
    x, up = _block_with_mlp_activation(x, last, cfg)
    return _rms_norm(x, params["norm_f"], cfg.cdtype), x, up


def token_losses(params, hidden, targets, cfg: GPTConfig):
    """Cross-entropy (nats) of each target token under the tied output layer.

    hidden [..., d], targets [...]. Logits are formed `loss_chunk` tokens at a
    time, and each chunk is recomputed in the backward pass, so neither pass holds
    the full [tokens, vocab] matrix.
    """
    lead = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).astype(jnp.int32)
    embed = params["embed"].astype(cfg.cdtype)

    @jax.checkpoint
    def chunk(hc, tc):
        if _narrow(cfg):
            logits = matmul_2d(hc.astype(cfg.cdtype), embed, False, True)
        else:
            logits = jnp.einsum("cd,vd->cv", hc, embed, preferred_element_type=cfg.acc_dtype)
        picked = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
        return jax.nn.logsumexp(logits, axis=-1) - picked

    return map_token_chunks(chunk, (h, t), cfg.loss_chunk).reshape(lead)


def per_example_loss(params, seqs, cfg: GPTConfig):
    """Mean next-token cross-entropy (nats) of each [L+1] row: [N], float32 or wider."""
    seqs = jnp.asarray(seqs)
    if seqs.ndim != 2 or seqs.shape[1] < 2:
        raise ValueError(f"seqs must be [N, L+1] with L >= 1, got shape {seqs.shape}")
    hidden = forward(params, seqs[:, :-1], cfg)
    return jnp.mean(token_losses(params, hidden, seqs[:, 1:], cfg), axis=-1)


def features(params, seqs, cfg: GPTConfig):
    """Mean-pooled final hidden state of each row's inputs: [N, d] float32."""
    seqs = jnp.asarray(seqs)
    hidden = forward(params, seqs[:, :-1], cfg)
    return jnp.mean(hidden.astype(jnp.float32), axis=1)


def bits_per_byte(loss_nats_per_token, bytes_per_token):
    """Convert a mean token loss to bits per UTF-8 byte (tokenizer-independent)."""
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token must be positive, got {bytes_per_token}")
    return loss_nats_per_token / math.log(2) / bytes_per_token
