"""What several baselines share: batched per-sequence losses under a model."""
from __future__ import annotations

import numpy as np


def batched_losses(params, seqs, model_cfg, *, batch_size: int = 256, progress: bool = False,
                   desc: str = "losses", loss_fn=None) -> np.ndarray:
    """[N] mean next-token cross-entropy (nats) of each [L+1] sequence, in fixed-size
    batches (the last one padded) so one compiled program serves every batch."""
    import jax
    if loss_fn is None:
        from mgd.pipeline import model as model_lib
        loss_fn = model_lib.per_example_loss
    seqs = np.asarray(seqs)
    if seqs.ndim != 2 or seqs.shape[0] == 0:
        raise ValueError(f"seqs must be a non-empty [N, L+1] array, got shape {seqs.shape}")
    batch_size = min(batch_size, seqs.shape[0])
    fn = jax.jit(lambda p, x: loss_fn(p, x, model_cfg))
    starts = range(0, seqs.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc=desc, unit="batch", leave=False)
    out = []
    for s in starts:
        chunk = seqs[s:s + batch_size]
        n = chunk.shape[0]
        if n < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
        out.append(np.asarray(fn(params, chunk), dtype=np.float64)[:n])
    return np.concatenate(out)


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for, for a byte-level BPE tokenizer.

    The byte-level alphabet maps every byte to one printable character, so a token's
    string length is its byte count; special tokens (end of text) stand for no bytes.
    """
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    lengths = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    for tok, i in vocab.items():
        lengths[i] = 0 if tok in special else len(tok)
    return lengths


def bytes_per_sequence(seqs, byte_lengths) -> np.ndarray:
    """[N] UTF-8 bytes covered by the predicted tokens (targets = seqs[:, 1:])."""
    return np.asarray(byte_lengths)[np.asarray(seqs)[:, 1:]].sum(axis=1)
