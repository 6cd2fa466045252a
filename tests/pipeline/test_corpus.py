"""Sources, tokenizer, packing and the built corpus (on a small slice of the shared data)."""
from __future__ import annotations

import gzip
import json
import sys
import types

import numpy as np
import pytest

from mgd.pipeline import artifacts, corpus, sources, tokenizer
from tests.pipeline.shared_data import DATA as SHARED

needs_shared = pytest.mark.skipif(not (SHARED / "ontarget.jsonl.gz").exists(),
                                  reason="the shared offline corpus is not on this machine")


def _write_jsonl(path, rows, gz=False):
    data = "".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


# ---------------------------------------------------------------- sources

@needs_shared
def test_read_jsonl_reads_only_the_slice_asked_for():
    texts = sources.read_jsonl(SHARED / "ontarget.jsonl.gz", limit=7)
    assert len(texts) == 7 and all(isinstance(t, str) and t for t in texts)


@pytest.mark.parametrize("gz", [False, True])
def test_read_jsonl_plain_and_gzip(tmp_path, gz):
    path = _write_jsonl(tmp_path / ("d.jsonl.gz" if gz else "d.jsonl"),
                        [{"text": "alpha"}, "\n", {"text": "béta", "id": 2}, {"body": "x", "text": "c"}],
                        gz=gz)
    assert sources.read_jsonl(path) == ["alpha", "béta", "c"]
    assert sources.read_jsonl(path, limit=2) == ["alpha", "béta"]


def test_read_jsonl_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        sources.read_jsonl(tmp_path / "nope.jsonl")


def test_read_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"text": "b"}, '{"text": oops}\n'])
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON"):
        sources.read_jsonl(path)


def test_read_jsonl_missing_field_names_line_and_keys(tmp_path):
    path = _write_jsonl(tmp_path / "f.jsonl", [{"text": "a"}, {"contents": "b"}])
    with pytest.raises(ValueError, match=r"f\.jsonl:2: no field 'text' \(found \['contents'\]\)"):
        sources.read_jsonl(path)
    assert sources.read_jsonl(path, field="text", limit=1) == ["a"]


def test_read_jsonl_truncated_gzip_is_a_clear_error(tmp_path):
    good = _write_jsonl(tmp_path / "g.jsonl.gz", [{"text": "x" * 50}] * 200, gz=True)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(ValueError, match=r"cut\.jsonl\.gz:\d+: cannot read"):
        sources.read_jsonl(cut)


class _FakeDatasets:
    """Stands in for the `datasets` module: records the call, streams rows."""

    def __init__(self, rows=None, error=None):
        self.rows, self.error, self.calls = rows, error, []

    def load_dataset(self, name, config=None, *, split, streaming):
        self.calls.append((name, config, split, streaming))
        if self.error is not None:
            raise self.error
        return iter(self.rows)


def test_stream_hub_wiring(monkeypatch):
    fake = _FakeDatasets(rows=[{"text": f"doc {i}", "url": "u"} for i in range(100)])
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake.load_dataset))
    assert sources.stream_hub("allenai/c4", "en", "text", limit=3) == ["doc 0", "doc 1", "doc 2"]
    assert fake.calls == [("allenai/c4", "en", "train", True)]
    # The corpus-level spec goes through the same path.
    assert sources.read_source("hf:allenai/c4:en:text", limit=2) == ["doc 0", "doc 1"]
    assert fake.calls[-1] == ("allenai/c4", "en", "train", True)
    with pytest.raises(ValueError, match="no field 'contents'"):
        sources.stream_hub("MedRAG/pubmed", None, "contents", limit=2)


def test_stream_hub_offline_error_is_clear(monkeypatch):
    fake = _FakeDatasets(error=ConnectionError("Couldn't reach the hub"))
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake.load_dataset))
    with pytest.raises(sources.HubUnavailable, match=r"MedRAG/pubmed.*local \.jsonl"):
        sources.stream_hub("MedRAG/pubmed", None, "contents", limit=5)


def test_read_source_rejects_a_bad_hub_spec():
    with pytest.raises(ValueError, match="hf:<dataset>:<config>:<field>"):
        sources.read_source("hf:allenai/c4")


# ---------------------------------------------------------------- tokenizer

TEXTS = [f"The patient {i} received {i % 7} mg of drug X; outcome improved. Ünïcode ✓" for i in range(60)]


def test_tokenizer_roundtrip_eot_and_cache(tmp_path, monkeypatch):
    tok = tokenizer.train_tokenizer(TEXTS, 300, tmp_path)
    assert tok.get_vocab_size() <= 300
    assert tokenizer.eot_id(tok) == tokenizer.EOT == 0
    sample = "Unseen text: 42 mg, naïve café ✓"
    assert tok.decode(tok.encode(sample).ids) == sample          # byte-level: lossless
    assert tokenizer.EOT not in tok.encode(sample).ids
    assert len(list(tmp_path.glob("bpe-300-*.json"))) == 1

    # Same content: served from the cache, so training must not run again.
    def no_training(*a, **k):
        raise AssertionError("retrained despite a cached tokenizer")
    monkeypatch.setattr(tokenizer.trainers, "BpeTrainer", no_training)
    again = tokenizer.train_tokenizer(list(TEXTS), 300, tmp_path)
    assert again.encode(sample).ids == tok.encode(sample).ids
    # Different content or size: a different cache entry (and here, training).
    with pytest.raises(AssertionError, match="retrained"):
        tokenizer.train_tokenizer(TEXTS[:-1], 300, tmp_path)


def test_tokenizer_arguments(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        tokenizer.train_tokenizer(TEXTS, 100, tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        tokenizer.load_tokenizer(tmp_path / "missing.json")
    assert tokenizer.content_hash(["ab", "c"], 300) != tokenizer.content_hash(["a", "bc"], 300)


# ---------------------------------------------------------------- packing

def test_pack_documents_joins_with_eot_and_records_first_doc():
    docs = [(10, [1, 2, 3]), (11, [4]), (12, [5, 6, 7, 8, 9]), (13, [1, 1, 1, 1, 1, 1])]
    rows, first, used = corpus.pack_documents(iter(docs), 3, 4, eot=0)
    # stream: 1 2 3 0 | 4 0 5 6 | 7 8 9 0 | (1 ... dropped)
    np.testing.assert_array_equal(rows, [[1, 2, 3, 0], [4, 0, 5, 6], [7, 8, 9, 0]])
    np.testing.assert_array_equal(first, [10, 11, 12])
    assert used == [10, 11, 12]
    with pytest.raises(ValueError, match="ran out after 4 of 9"):
        corpus.pack_documents(iter(docs), 9, 4, eot=0)


def test_shuffle_tokens_keeps_each_rows_multiset():
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 1000, (20, 33)).astype(np.int32)
    out = corpus.shuffle_tokens(rows, np.random.default_rng(1))
    np.testing.assert_array_equal(np.sort(out, 1), np.sort(rows, 1))
    assert (out != rows).mean() > 0.9


# ---------------------------------------------------------------- stages

def test_stage_is_atomic_and_skips_when_done(tmp_path):
    st = artifacts.stage(tmp_path, "step")
    with pytest.raises(RuntimeError, match="boom"):
        with st as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert not st.path.exists() and not st.done
    assert not list(tmp_path.glob(".step.*"))
    with st as tmp:
        artifacts.atomic_write_json(tmp / "out.json", {"a": np.int64(3)})
        artifacts.atomic_save_arrays(tmp / "x.npz", x=np.arange(4))
    assert st.done and artifacts.read_json(st.path / "out.json") == {"a": 3}
    np.testing.assert_array_equal(artifacts.load_arrays(st.path / "x.npz")["x"], np.arange(4))
    with pytest.raises(RuntimeError, match="already complete"):
        with artifacts.stage(tmp_path, "step"):
            pass


# ---------------------------------------------------------------- the built corpus

SMALL = dict(ontarget=str(SHARED / "ontarget.jsonl.gz"), offtarget=str(SHARED / "offtarget.jsonl.gz"),
             n_ontarget=60, n_offtarget=60, n_corrupt=30, n_target=12, n_eval=12, seq_len=32,
             vocab_size=400, tokenizer_train_docs=150, max_docs=400, seed=3)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = corpus.CorpusConfig(**SMALL)
    return cfg, run_dir, corpus.build_corpus(cfg, run_dir)


@needs_shared
def test_corpus_shapes_and_clusters(built):
    cfg, _, c = built
    assert c.tokens.shape == (150, 33) and c.tokens.dtype == np.int32
    assert c.target_tokens.shape == (12, 33) and c.eval_tokens.shape == (12, 33)
    assert c.cluster.dtype == np.int8
    assert np.bincount(c.cluster).tolist() == [60, 60, 30]
    assert c.tokens.min() >= 0 and c.tokens.max() < c.vocab_size
    # Rows are shuffled: the clusters are not in contiguous blocks.
    assert (np.diff(c.cluster.astype(int)) != 0).sum() > 10


@needs_shared
def test_corpus_pools_are_disjoint_by_document(built):
    _, _, c = built
    on = set(c.doc_id[c.cluster == corpus.ONTARGET])
    bad = set(c.doc_id[c.cluster == corpus.CORRUPT])
    target, evals = set(c.target_doc_id), set(c.eval_doc_id)
    for a, b in [(on, bad), (on, target), (on, evals), (bad, target), (bad, evals), (target, evals)]:
        assert not (a & b)


@needs_shared
def test_corrupt_rows_are_shuffled_on_target_text(built):
    _, _, c = built
    eot = c.eot
    # Bigram structure: in real text, EOT is followed by document starts and tokens
    # repeat in fixed pairs; shuffling destroys pair statistics, not unigram ones.
    def repeated_bigrams(rows):
        pairs = np.stack([rows[:, :-1], rows[:, 1:]], -1).reshape(-1, 2)
        _, counts = np.unique(pairs, axis=0, return_counts=True)
        return counts[counts > 1].sum() / len(pairs)
    on = c.tokens[c.cluster == corpus.ONTARGET][:30]
    bad = c.tokens[c.cluster == corpus.CORRUPT]
    assert repeated_bigrams(bad) < 0.6 * repeated_bigrams(on)
    assert (bad != eot).any()


@needs_shared
def test_corpus_stats_texts_and_reload(built):
    cfg, run_dir, c = built
    stats = artifacts.read_json(run_dir / "corpus" / "stats.json")
    assert set(stats["clusters"]) == {"ontarget", "offtarget", "corrupt"}
    for s in list(stats["clusters"].values()) + [stats["target"], stats["eval"]]:
        assert s["tokens"] > 0 and 1.0 < s["bytes_per_token"] < 10.0 and s["documents"] > 0
    assert stats["clusters"]["ontarget"]["sequences"] == 60
    assert c.bytes_per_token("eval") == stats["eval"]["bytes_per_token"]
    texts = c.texts([0, 1])
    assert len(texts) == 2 and all(len(t) > 20 for t in texts)
    assert len(c.texts_by_seq) == len(c.tokens)
    again = corpus.build_corpus(cfg, run_dir)            # DONE marker: reused, not rebuilt
    np.testing.assert_array_equal(again.tokens, c.tokens)
    np.testing.assert_array_equal(corpus.Corpus.load(run_dir).cluster, c.cluster)
    import dataclasses
    with pytest.raises(ValueError, match="different CorpusConfig"):
        corpus.build_corpus(dataclasses.replace(cfg, seed=4), run_dir)


def test_corpus_config_errors(tmp_path):
    with pytest.raises(ValueError, match="seq_len"):
        corpus.CorpusConfig(seq_len=1)
    with pytest.raises(ValueError, match="n_offtarget"):
        corpus.CorpusConfig(n_offtarget=-1)
    cfg = corpus.CorpusConfig(**{**SMALL, "ontarget": str(tmp_path / "absent.jsonl"), "max_docs": 5})
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        corpus.build_corpus(cfg, tmp_path / "run")
