"""The experiment's corpus: three clusters of packed sequences and a held-out target.

    cluster 0  on-target   documents from the on-target source
    cluster 1  off-target  documents from the off-target source
    cluster 2  corrupt     on-target sequences with their token order shuffled

The on-target documents are shuffled once and cut into consecutive, disjoint
pools: metagradient target set, evaluation set, corrupt cluster, on-target
cluster. So no document contributes to two of them. Each pool is tokenized,
joined with an end-of-text separator and cut into rows of L+1 tokens
(inputs = row[:-1], targets = row[1:]). Training rows are shuffled so that a
row's position says nothing about its cluster.

Outputs in `run_dir/corpus/`: arrays.npz, stats.json, config.json, tokenizer.json.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from mgd.errors import UsageError
from mgd.pipeline import artifacts, sources
from mgd.pipeline import tokenizer as tok_mod

__all__ = ["CorpusConfig", "Corpus", "build_corpus", "pack_documents", "shuffle_tokens",
           "DocumentsRanOut", "CLUSTERS", "ONTARGET", "OFFTARGET", "CORRUPT"]

ONTARGET, OFFTARGET, CORRUPT = 0, 1, 2
CLUSTERS = {ONTARGET: "ontarget", OFFTARGET: "offtarget", CORRUPT: "corrupt"}


class DocumentsRanOut(UsageError, ValueError):
    """A source with too little text for the sequences asked of it."""


@dataclass(frozen=True)
class CorpusConfig:
    """What to build. Counts are in sequences of `seq_len + 1` tokens.

    Sources are file paths (.jsonl/.jsonl.gz, field `text`, or `path#field`) or
    hub specs `hf:<dataset>:<config>:<field>`, e.g. `hf:allenai/c4:en:text` and
    `hf:MedRAG/pubmed::contents` (see `sources.read_source`).
    """
    # With no files given, the sources of the seed experiment, streamed from the hub.
    # None: not chosen yet (a run config resolves it before the corpus is built).
    ontarget: str | None = "hf:MedRAG/pubmed::contents"
    offtarget: str | None = "hf:allenai/c4:en:text"
    n_ontarget: int = 3000
    n_offtarget: int = 3000
    n_corrupt: int = 1500
    n_target: int = 256
    n_eval: int = 512
    seq_len: int = 128
    vocab_size: int = 8192
    tokenizer_path: str | None = None   # a given tokenizer.json instead of training one
    tokenizer_train_docs: int = 3000    # documents per source the BPE is trained on
    max_docs: int | None = None         # read at most this many documents per source
    seed: int = 0
    # One value of the on-target file's `source` field: its documents become the target
    # (`target.py`) and stay out of the corpus, which keeps the other sources.
    target_source: str | None = None

    def __post_init__(self):
        for name in ("n_ontarget", "n_offtarget", "n_corrupt", "n_target", "n_eval"):
            if getattr(self, name) < 0:
                raise ValueError(f"CorpusConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"CorpusConfig.seq_len must be >= 2, got {self.seq_len}")
        if self.n_target < 1 or self.n_eval < 1:
            raise ValueError("CorpusConfig needs n_target >= 1 and n_eval >= 1")


def pack_documents(encoded_docs, n_seqs: int, width: int, eot: int):
    """Join documents, each followed by `eot`, and cut `n_seqs` rows of `width` tokens.

    `encoded_docs` yields (doc_id, token_ids). Returns (rows [n, width] int32,
    first_doc [n] int64: the document a row starts in, docs_used: ids consumed).
    The tail that does not fill a row is dropped. Raises if the documents run out.
    """
    rows = np.empty((n_seqs, width), np.int32)
    first_doc = np.empty(n_seqs, np.int64)
    buf: list[int] = []
    buf_doc: list[int] = []     # document of each buffered token
    used: list[int] = []
    filled = 0
    it = iter(encoded_docs)
    while filled < n_seqs:
        while len(buf) < width:
            try:
                doc, ids = next(it)
            except StopIteration:
                raise DocumentsRanOut(f"documents ran out after {filled} of {n_seqs} sequences of "
                                 f"{width} tokens; read more documents or ask for fewer") from None
            used.append(doc)
            buf.extend(ids)
            buf.append(eot)
            buf_doc.extend([doc] * (len(ids) + 1))
        rows[filled] = buf[:width]
        first_doc[filled] = buf_doc[0]
        del buf[:width], buf_doc[:width]
        filled += 1
    return rows, first_doc, used


def shuffle_tokens(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each row with its tokens in an independent random order (same multiset)."""
    keys = rng.random(rows.shape)
    return np.take_along_axis(rows, np.argsort(keys, axis=1), axis=1)


def _encoded(tokenizer, texts, order, batch=256):
    """(doc_id, ids) for the documents in `order`, tokenized in batches on demand."""
    for start in range(0, len(order), batch):
        ids = order[start:start + batch]
        encs = tokenizer.encode_batch([texts[i] for i in ids])
        for i, enc in zip(ids, encs):
            yield int(i), enc.ids


class _Pool:
    """Consecutive slices of one shuffled document order: each pool takes the next
    documents, so pools never share a document."""

    def __init__(self, tokenizer, texts, order, eot):
        self.tokenizer, self.texts, self.order, self.eot = tokenizer, texts, order, eot
        self.pos = 0

    def take(self, n_seqs, width):
        """(rows, first_doc, docs_used, tokens in those documents incl. separators)."""
        if n_seqs == 0:
            return np.zeros((0, width), np.int32), np.zeros(0, np.int64), [], 0
        lengths = {}

        def counted():
            for doc, ids in _encoded(self.tokenizer, self.texts, self.order[self.pos:]):
                lengths[doc] = len(ids) + 1
                yield doc, ids

        rows, first, used = pack_documents(counted(), n_seqs, width, self.eot)
        self.pos += len(used)
        return rows, first, used, sum(lengths[d] for d in used)


def _pool_stats(texts, rows, docs_used, doc_tokens, eot, vocab_size):
    n_tok = int(rows.size)
    doc_bytes = sum(len(texts[i].encode("utf-8")) for i in docs_used)
    doc_chars = sum(len(texts[i]) for i in docs_used)
    non_eot = int((rows != eot).sum())
    return {
        "sequences": int(rows.shape[0]),
        "tokens": n_tok,
        "documents": len(docs_used),
        "document_chars": doc_chars,
        "document_bytes": doc_bytes,
        "mean_document_chars": doc_chars / max(len(docs_used), 1),
        "eot_fraction": 1.0 - non_eot / max(n_tok, 1),
        # Over whole consumed documents (the last one's tail is cut off the rows);
        # separators count as tokens of zero bytes, as they do in the loss.
        "bytes_per_token": doc_bytes / max(doc_tokens, 1),
        "distinct_tokens": int(np.unique(rows).size),
        "vocab_coverage": int(np.unique(rows).size) / vocab_size,
    }


def build_corpus(cfg: CorpusConfig, run_dir) -> Corpus:
    """Build (or reuse, if `run_dir/corpus/DONE` exists) the corpus for `cfg`."""
    st = artifacts.stage(run_dir, "corpus")
    if st.done:
        saved = artifacts.read_json(st.path / "config.json")
        if saved != dataclasses.asdict(cfg):
            raise ValueError(f"{st.path} was built with a different CorpusConfig; use a new "
                             f"run_dir or delete it. saved={saved} asked={dataclasses.asdict(cfg)}")
        return Corpus.load(run_dir)

    if cfg.ontarget is None or cfg.offtarget is None:
        raise ValueError("CorpusConfig: ontarget and offtarget must be sources, not None")
    rng = np.random.default_rng(cfg.seed)
    on_texts = sources.read_source(cfg.ontarget, limit=cfg.max_docs, skip_source=cfg.target_source)
    off_texts = sources.read_source(cfg.offtarget, limit=cfg.max_docs)
    for label, texts in (("ontarget", on_texts), ("offtarget", off_texts)):
        if not texts:
            raise sources.MalformedSource(f"{getattr(cfg, label)}: no documents (the {label} source)")
    on_order = rng.permutation(len(on_texts))
    off_order = rng.permutation(len(off_texts))

    # The tokenizer learns from the far end of the on-target order (the training
    # pool is cut last, so the target and evaluation pools are at the front).
    n_tok_docs = cfg.tokenizer_train_docs
    tok_on = on_order[-n_tok_docs:] if n_tok_docs else on_order[:0]
    tok_texts = [on_texts[i] for i in tok_on] + [off_texts[i] for i in off_order[:n_tok_docs]]
    if cfg.tokenizer_path:
        tokenizer = tok_mod.load_tokenizer(cfg.tokenizer_path)
    else:
        tokenizer = tok_mod.train_tokenizer(tok_texts, cfg.vocab_size,
                                            Path(run_dir) / "tokenizer_cache")
    eot = tok_mod.eot_id(tokenizer)
    vocab = tokenizer.get_vocab_size()
    width = cfg.seq_len + 1

    on_pool = _Pool(tokenizer, on_texts, on_order, eot)
    target, target_doc, target_used, target_nt = on_pool.take(cfg.n_target, width)
    evals, eval_doc, eval_used, eval_nt = on_pool.take(cfg.n_eval, width)
    corrupt, corrupt_doc, corrupt_used, corrupt_nt = on_pool.take(cfg.n_corrupt, width)
    corrupt = shuffle_tokens(corrupt, rng)
    ontarget, on_doc, on_used, on_nt = on_pool.take(cfg.n_ontarget, width)
    offtarget, off_doc, off_used, off_nt = _Pool(tokenizer, off_texts, off_order, eot).take(
        cfg.n_offtarget, width)

    tokens = np.concatenate([ontarget, offtarget, corrupt])
    cluster = np.concatenate([np.full(len(ontarget), ONTARGET, np.int8),
                              np.full(len(offtarget), OFFTARGET, np.int8),
                              np.full(len(corrupt), CORRUPT, np.int8)])
    doc_id = np.concatenate([on_doc, off_doc, corrupt_doc])
    perm = rng.permutation(len(tokens))
    tokens, cluster, doc_id = tokens[perm], cluster[perm], doc_id[perm]

    held_out = set(target_used) | set(eval_used)
    stats = {
        "clusters": {
            "ontarget": _pool_stats(on_texts, ontarget, on_used, on_nt, eot, vocab),
            "offtarget": _pool_stats(off_texts, offtarget, off_used, off_nt, eot, vocab),
            "corrupt": _pool_stats(on_texts, corrupt, corrupt_used, corrupt_nt, eot, vocab),
        },
        "target": _pool_stats(on_texts, target, target_used, target_nt, eot, vocab),
        "eval": _pool_stats(on_texts, evals, eval_used, eval_nt, eot, vocab),
        "documents_read": {"ontarget": len(on_texts), "offtarget": len(off_texts)},
        "seq_len": cfg.seq_len,
        "vocab_size": vocab,
        "eot_id": eot,
        "tokenizer_saw_heldout_documents": bool(held_out & set(tok_on.tolist())),
        "doc_id_note": "clusters 0 and 2, target and eval index the on-target source; "
                       "cluster 1 indexes the off-target source; a row's id is the "
                       "document its first token comes from",
    }
    with st as tmp:
        artifacts.atomic_save_arrays(
            tmp / "arrays.npz", tokens=tokens, cluster=cluster, doc_id=doc_id,
            target_tokens=target, eval_tokens=evals,
            target_doc_id=target_doc, eval_doc_id=eval_doc)
        tokenizer.save(str(tmp / "tokenizer.json"))
        artifacts.atomic_write_json(tmp / "stats.json", stats)
        artifacts.atomic_write_json(tmp / "config.json", dataclasses.asdict(cfg))
    return Corpus.load(run_dir)


@dataclass
class Corpus:
    """A built corpus. `tokens[i]` is one [L+1] row of cluster `cluster[i]`."""
    tokens: np.ndarray          # [N, L+1] int32
    cluster: np.ndarray         # [N] int8: 0 on-target, 1 off-target, 2 corrupt
    doc_id: np.ndarray          # [N] int64
    target_tokens: np.ndarray   # [Nt, L+1] int32: the metagradient target set (Phi)
    eval_tokens: np.ndarray     # [Ne, L+1] int32: final evaluation only
    target_doc_id: np.ndarray
    eval_doc_id: np.ndarray
    stats: dict
    config: dict
    path: Path
    _texts: list | None = field(default=None, repr=False)

    @classmethod
    def load(cls, run_dir) -> Corpus:
        path = Path(run_dir) / "corpus"
        if not (path / "DONE").exists():
            raise FileNotFoundError(f"no complete corpus in {path} (build_corpus writes it)")
        a = artifacts.load_arrays(path / "arrays.npz")
        return cls(tokens=a["tokens"], cluster=a["cluster"], doc_id=a["doc_id"],
                   target_tokens=a["target_tokens"], eval_tokens=a["eval_tokens"],
                   target_doc_id=a["target_doc_id"], eval_doc_id=a["eval_doc_id"],
                   stats=artifacts.read_json(path / "stats.json"),
                   config=artifacts.read_json(path / "config.json"), path=path)

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1] - 1

    @property
    def vocab_size(self) -> int:
        return int(self.stats["vocab_size"])

    @property
    def eot(self) -> int:
        return int(self.stats["eot_id"])

    @cached_property
    def tokenizer(self):
        return tok_mod.load_tokenizer(self.path / "tokenizer.json")

    def decode(self, rows) -> list[str]:
        """Text of each row; document boundaries (EOT) become blank lines."""
        rows = np.asarray(rows)
        out = []
        for row in rows:
            pieces = np.split(row, np.flatnonzero(row == self.eot))
            docs = [self.tokenizer.decode([int(t) for t in p if t != self.eot]) for p in pieces]
            out.append("\n\n".join(d for d in docs if d))
        return out

    def texts(self, indices=None) -> list[str]:
        """Decoded text of the training rows `indices` (all rows when None)."""
        if indices is None:
            return self.texts_by_seq
        return self.decode(self.tokens[np.asarray(indices)])

    @property
    def texts_by_seq(self) -> list[str]:
        if self._texts is None:
            self._texts = self.decode(self.tokens)
        return self._texts

    def bytes_per_token(self, which: str = "eval") -> float:
        """UTF-8 bytes per token of a pool ("eval", "target", or a cluster name)."""
        s = self.stats["clusters"].get(which) or self.stats.get(which)
        if s is None:
            raise ValueError(f"no pool named {which!r}")
        return float(s["bytes_per_token"])
