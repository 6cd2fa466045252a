"""A user's target: a file of documents (or one source of the on-target file) split by
document into the metagradient target set and a held-out evaluation set.

The documents are shuffled once (seeded) and divided in the ratio of the two sets' sizes
(`corpus.n_target` : `corpus.n_eval` sequences), so no document is in both. Each part's
documents, all of them, are packed into rows of L+1 tokens the way the corpus packs its
pools; where a part makes more rows than its set's size, that many rows are drawn from
all of them without replacement, so the set spans the part's documents rather than its
first few. A part that makes fewer rows than its size keeps all it makes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from mgd.errors import UsageError
from mgd.pipeline.corpus import pack_documents

log = logging.getLogger(__name__)

__all__ = ["TargetSplit", "TargetTooSmall", "split_documents", "MIN_DOCUMENTS"]

MIN_DOCUMENTS = 2      # one for each part


class TargetTooSmall(UsageError):
    """A target whose documents cannot fill one row in each part of the split."""


@dataclass(frozen=True)
class TargetSplit:
    """The two sets and which of the source's documents (by position) each holds."""
    target_tokens: np.ndarray      # [<= n_target, L+1] int32
    eval_tokens: np.ndarray        # [<= n_eval, L+1] int32
    target_docs: np.ndarray        # positions of the target part's documents in the source
    eval_docs: np.ndarray          # the same for the evaluation part
    target_rows_made: int          # rows the target part's documents make, before drawing
    eval_rows_made: int

    def summary(self, n_documents: int) -> dict:
        return {"documents": n_documents,
                "target_documents": int(len(self.target_docs)),
                "eval_documents": int(len(self.eval_docs)),
                "target_rows": int(self.target_tokens.shape[0]),
                "eval_rows": int(self.eval_tokens.shape[0]),
                "target_rows_made": self.target_rows_made,
                "eval_rows_made": self.eval_rows_made}


def _pack_all(encoded, docs, width: int, eot: int) -> np.ndarray:
    """Every full row the documents `docs` make, packed in that order."""
    n_rows = sum(len(encoded[d]) + 1 for d in docs) // width
    if n_rows == 0:
        return np.zeros((0, width), np.int32)
    rows, _, _ = pack_documents(((int(d), encoded[d]) for d in docs), n_rows, width, eot)
    return rows


def _draw(rows: np.ndarray, n: int, rng) -> np.ndarray:
    if rows.shape[0] <= n:
        return rows
    return rows[np.sort(rng.choice(rows.shape[0], size=n, replace=False))]


def split_documents(encoded, n_target: int, n_eval: int, width: int, eot: int, seed: int,
                    name: str = "--target") -> TargetSplit:
    """`encoded` (token ids of each document) split by document into a target set of up
    to `n_target` rows and an evaluation set of up to `n_eval` rows of `width` tokens.
    TargetTooSmall (naming `name` and the minimum) when either part makes no full row."""
    if n_target < 1 or n_eval < 1:
        raise ValueError(f"n_target and n_eval must be >= 1, got {n_target} and {n_eval}")
    encoded = [list(e) for e in encoded]
    n_docs = len(encoded)
    n_tokens = sum(len(e) + 1 for e in encoded)
    minimum = (f"a target needs at least {MIN_DOCUMENTS} documents, split by document in the "
               f"ratio {n_target}:{n_eval} (corpus.n_target : corpus.n_eval), with at least "
               f"one {width}-token row of text in each part")
    if n_docs < MIN_DOCUMENTS:
        raise TargetTooSmall(f"{name}: too small to split into a target set and a held-out "
                             f"evaluation set: {n_docs} document(s); {minimum}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_docs)
    n_target_docs = int(np.clip(round(n_docs * n_target / (n_target + n_eval)), 1, n_docs - 1))
    target_docs, eval_docs = np.sort(order[:n_target_docs]), np.sort(order[n_target_docs:])
    target_all = _pack_all(encoded, order[:n_target_docs], width, eot)
    eval_all = _pack_all(encoded, order[n_target_docs:], width, eot)
    if target_all.shape[0] == 0 or eval_all.shape[0] == 0:
        raise TargetTooSmall(
            f"{name}: too small to split into a target set and a held-out evaluation set: "
            f"{n_docs} documents of {n_tokens} tokens make {target_all.shape[0]} target and "
            f"{eval_all.shape[0]} evaluation rows; {minimum}")
    for part, made, size in (("target set", target_all.shape[0], n_target),
                             ("evaluation set", eval_all.shape[0], n_eval)):
        if made < size:
            log.warning(f"target: {name}'s {part} part makes {made} rows, fewer than the "
                        f"{size} asked for; using all {made}")
    return TargetSplit(target_tokens=_draw(target_all, n_target, rng),
                       eval_tokens=_draw(eval_all, n_eval, rng),
                       target_docs=target_docs.astype(np.int64),
                       eval_docs=eval_docs.astype(np.int64),
                       target_rows_made=int(target_all.shape[0]),
                       eval_rows_made=int(eval_all.shape[0]))
