"""Byte-level BPE, trained locally with Hugging Face `tokenizers` and cached.

The end-of-text token is the first special token, so it has id 0 in every
tokenizer trained here (`EOT`). A tokenizer loaded from a file may place it
elsewhere: use `eot_id(tokenizer)`.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = ["EOT", "EOT_TOKEN", "train_tokenizer", "load_tokenizer", "eot_id", "content_hash"]

EOT_TOKEN = "<|endoftext|>"
EOT = 0

# Bump when the training recipe changes, so stale caches are not reused.
_RECIPE = "bytelevel-bpe-v1"


def content_hash(texts, vocab_size: int) -> str:
    h = hashlib.sha256(f"{_RECIPE}|{vocab_size}|{len(texts)}|".encode())
    for t in texts:
        b = t.encode("utf-8")
        # Length-prefixed so ["ab", "c"] and ["a", "bc"] hash differently.
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:20]


def _new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts, vocab_size: int, cache_dir) -> Tokenizer:
    """Train (or reuse from `cache_dir`) a byte-level BPE with `vocab_size` entries.

    The cache key is a hash of the texts and the vocabulary size, so the same
    inputs give the same tokenizer file without retraining.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer needs at least one text")
    # 256 byte symbols + EOT is the smallest vocabulary a byte-level BPE can have.
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 for byte-level BPE, got {vocab_size}")
    cache_dir = Path(cache_dir)
    path = cache_dir / f"bpe-{vocab_size}-{content_hash(texts, vocab_size)}.json"
    if path.exists():
        return load_tokenizer(path)
    tok = _new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if tok.token_to_id(EOT_TOKEN) != EOT:
        raise AssertionError("EOT must be the first special token (id 0)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".bpe.", suffix=".json", dir=cache_dir)
    os.close(fd)
    tok.save(tmp)
    os.replace(tmp, path)
    return tok


def load_tokenizer(path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return Tokenizer.from_file(str(path))


def eot_id(tokenizer: Tokenizer) -> int:
    i = tokenizer.token_to_id(EOT_TOKEN)
    if i is None:
        raise ValueError(f"tokenizer has no {EOT_TOKEN!r} token; add it as a special token")
    return i
