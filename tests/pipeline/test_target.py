"""A target of the user's own: its documents split by document into the target set and
the held-out evaluation set (`pipeline/target.py`), and one source of the on-target file
as the target (`corpus.target_source`)."""
import json

import numpy as np
import pytest

from mgd.errors import UsageError
from mgd.pipeline import sources
from mgd.pipeline.target import TargetTooSmall, split_documents
from tests.pipeline.shared_data import DATA, needs_data

EOT = 0
STRIDE = 1000      # document d's tokens are d * STRIDE + 1, + 2, ...: a token names its document


def _docs(rng, n_docs, lo=3, hi=60):
    return [list(d * STRIDE + 1 + np.arange(rng.integers(lo, hi))) for d in range(n_docs)]


def _segments(row):
    """The runs of document tokens in a row, split at the separators."""
    pieces = [p[p != EOT] for p in np.split(row, np.flatnonzero(row == EOT))]
    return [p for p in pieces if p.size]


def _check_rows_are_windows_of(rows, docs, allowed):
    """Each row is a contiguous window of the allowed documents packed with separators:
    every run of tokens is consecutive tokens of one allowed document; a run that a
    separator ends is its document's end, one that a separator starts is its start."""
    for row in rows:
        pieces = np.split(row, np.flatnonzero(row == EOT))
        for i, raw in enumerate(pieces):
            seg = raw[raw != EOT]
            if not seg.size:
                continue
            doc = int(seg[0] // STRIDE)
            assert doc in allowed
            assert (np.diff(seg) == 1).all() and (seg // STRIDE == doc).all()
            if i > 0:                       # after a separator: the document's start
                assert seg[0] == docs[doc][0]
            if i < len(pieces) - 1:         # before a separator: the document's end
                assert seg[-1] == docs[doc][-1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_is_by_document_and_draws_from_all_of_each_part(seed):
    rng = np.random.default_rng(100 + seed)
    n_docs, width, n_target, n_eval = int(rng.integers(150, 250)), 17, 24, 48
    docs = _docs(rng, n_docs, lo=20)
    split = split_documents(docs, n_target, n_eval, width, EOT, seed=seed)
    t, e = set(split.target_docs.tolist()), set(split.eval_docs.tolist())
    assert not t & e and t | e == set(range(n_docs))
    # The parts' sizes in documents follow the sets' sizes (1:2 here).
    assert len(t) == round(n_docs * n_target / (n_target + n_eval))
    assert split.target_tokens.shape == (n_target, width)
    assert split.eval_tokens.shape == (n_eval, width)
    _check_rows_are_windows_of(split.target_tokens, docs, t)
    _check_rows_are_windows_of(split.eval_tokens, docs, e)
    # Every row the part's documents make is a candidate: what each part made is every
    # full row of its documents' tokens (each followed by a separator).
    assert split.target_rows_made == sum(len(docs[d]) + 1 for d in t) // width
    assert split.eval_rows_made == sum(len(docs[d]) + 1 for d in e) // width
    # Drawn across the part, not its first rows: the rows reach more documents than any
    # n_target consecutive rows can (documents of >= 20 tokens and a separator).
    reached = {int(s[0] // STRIDE) for row in split.target_tokens for s in _segments(row)}
    assert len(reached) > n_target * width / 21 + 2
    # Seeded: the same seed splits the same way, another seed differently.
    again = split_documents(docs, n_target, n_eval, width, EOT, seed=seed)
    assert (again.target_tokens == split.target_tokens).all()
    other = split_documents(docs, n_target, n_eval, width, EOT, seed=seed + 10)
    assert set(other.target_docs.tolist()) != t


def test_a_part_smaller_than_its_size_keeps_every_row_it_makes():
    rng = np.random.default_rng(7)
    docs = _docs(rng, 12, lo=20, hi=30)
    split = split_documents(docs, 64, 64, 17, EOT, seed=0)
    assert split.target_tokens.shape[0] == split.target_rows_made < 64
    assert split.eval_tokens.shape[0] == split.eval_rows_made < 64


@pytest.mark.parametrize("docs,words", [
    ([[5, 6, 7] * 20], ["1 document", "at least 2 documents"]),
    ([[5, 6], [7, 8]], ["0 target and 0 evaluation rows", "one 17-token row"]),
])
def test_a_target_too_small_to_split_names_the_minimum(docs, words):
    with pytest.raises(TargetTooSmall) as err:
        split_documents(docs, 8, 8, 17, EOT, seed=0, name="--target t.jsonl")
    assert isinstance(err.value, UsageError)
    line = str(err.value)
    assert "\n" not in line and line.startswith("--target t.jsonl: too small to split")
    assert all(w in line for w in words), line


def test_source_filters_partition_the_file(tmp_path):
    rng = np.random.default_rng(3)
    names = ["alpha-one", "alpha-two", "beta"]
    rows = [{"text": f"doc {i}", "source": names[int(rng.integers(3))]} for i in range(60)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in names:
        want = [r["text"] for r in rows if r["source"] == name]
        rest = [r["text"] for r in rows if r["source"] != name]
        assert sources.read_jsonl(path, only_source=name) == want
        assert sources.read_jsonl(path, skip_source=name) == rest
        assert sources.read_jsonl(path, skip_source=name, limit=5) == rest[:5]
    assert sources.source_counts(path) == {n: sum(r["source"] == n for r in rows)
                                           for n in dict.fromkeys(r["source"] for r in rows)}
    assert sources.resolve_source_name(str(path), "beta") == "beta"
    assert sources.resolve_source_name(str(path), "ALPHA-T") == "alpha-two"
    with pytest.raises(UsageError, match="matches several sources"):
        sources.resolve_source_name(str(path), "alpha")
    with pytest.raises(UsageError) as err:
        sources.resolve_source_name(str(path), "gamma")
    assert "is not a source of" in str(err.value)
    assert all(f"'{n}'" in str(err.value) for n in names)


@needs_data
def test_unknown_target_source_lists_the_sources_present(capsys, tmp_path):
    from mgd import cli
    argv = ["run", "--ontarget", str(DATA / "ontarget.jsonl.gz"), "--offtarget",
            str(DATA / "offtarget.jsonl.gz"), "--out", str(tmp_path / "r")]
    assert cli.main([*argv, "--target-source", "nope"]) == 2
    err = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("[mgd ")]
    assert len(err) == 1 and err[0].startswith("mgd: error: --target-source nope")
    for name, count in sources.source_counts(DATA / "ontarget.jsonl.gz").items():
        assert f"'{name}' ({count} documents)" in err[0]
    assert not (tmp_path / "r").exists()


@needs_data
def test_target_source_at_smoke_scale_moves_one_source_out_of_the_corpus(tmp_path):
    """The smoke corpus with EBM-NLP as the target: the target's documents are exactly that
    source's, split by document, none of them in the corpus; the corpus keeps the others."""
    from mgd.pipeline import presets
    from mgd.pipeline.config import apply_overrides
    from mgd.pipeline.run import prepare
    from mgd.pipeline.stages import corpus_stage, describe_target, target_stage
    on = DATA / "ontarget.jsonl.gz"
    cfg = apply_overrides(presets.smoke(), [("corpus.ontarget", str(on)),
                                            ("corpus.offtarget", str(DATA / "offtarget.jsonl.gz")),
                                            ("corpus.target_source", "ebm")])
    cfg = prepare(cfg, env={})
    name = cfg.corpus.target_source
    assert name.startswith("EBM-NLP")
    corpus, info = target_stage(tmp_path, cfg, corpus_stage(tmp_path, cfg))
    ebm = sources.read_jsonl(on, only_source=name)
    assert info["source"] == name and info["documents"] == len(ebm)
    assert info["target_documents"] + info["eval_documents"] == len(ebm)
    assert corpus.target_tokens.shape == (cfg.corpus.n_target, cfg.corpus.seq_len + 1)
    assert corpus.eval_tokens.shape == (cfg.corpus.n_eval, cfg.corpus.seq_len + 1)
    # The target's rows are EBM-NLP text; the corpus's on-target rows come from the rest.
    rest = sources.read_jsonl(on, skip_source=name, limit=cfg.corpus.max_docs)
    assert corpus.stats["documents_read"]["ontarget"] == len(rest)
    ebm_text, rest_text = "\n".join(ebm), "\n".join(rest)
    piece = corpus.decode(corpus.eval_tokens[:1])[0].split("\n\n")[0][:40]
    assert piece in ebm_text
    on_rows = np.flatnonzero(corpus.cluster == 0)[:5]
    for text in corpus.texts(on_rows):
        assert text.split("\n\n")[0][:40] in rest_text
    words = describe_target(info, corpus)
    assert name in words[0] and f"{info['eval_documents']} documents" in words[1]


@needs_data
def test_a_corpus_too_small_without_the_target_source_is_one_line(capsys, tmp_path):
    from mgd import cli
    out = tmp_path / "r"
    argv = ["run", "--ontarget", str(DATA / "ontarget.jsonl.gz"), "--offtarget",
            str(DATA / "offtarget.jsonl.gz"), "--out", str(out), "--no-progress",
            "--target-source", "Medical", "--set", "corpus.max_docs=10"]
    assert cli.main(argv) == 2
    err = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("[mgd ")]
    assert len(err) == 1, err
    assert err[0].startswith("mgd: error: corpus: ") and "documents ran out" in err[0]
    assert "without source 'Medical-Abstracts-TC-Corpus/test'" in err[0]
    assert "corpus.n_ontarget" in err[0] and not (out / "plan.json").exists()


def test_base_loss_on_the_target_is_cached_until_its_inputs_change(tmp_path, monkeypatch):
    """A resumed run reads the base model's loss on the target's evaluation set from stage
    target-eval; other evaluation rows or another base model compute it again."""
    from types import SimpleNamespace

    from mgd.pipeline import stages, train
    calls = []
    monkeypatch.setattr(train, "eval_loss", lambda base, rows, m, b: calls.append(1) or float(rows.sum()))
    cfg = SimpleNamespace(loss_batch=4)
    rows = np.arange(12, dtype=np.int32).reshape(3, 4)
    corpus = SimpleNamespace(eval_tokens=rows)
    assert stages.target_eval_stage(tmp_path, cfg, corpus, None, None, 2.5) == 66.0
    assert stages.target_eval_stage(tmp_path, cfg, corpus, None, None, 2.5) == 66.0
    assert len(calls) == 1 and (tmp_path / "target-eval" / "DONE").exists()
    assert stages.target_eval_stage(tmp_path, cfg, SimpleNamespace(eval_tokens=rows[:2]), None, None,
                                    2.5) == 28.0
    assert stages.target_eval_stage(tmp_path, cfg, SimpleNamespace(eval_tokens=rows[:2]), None, None,
                                    2.6) == 28.0
    assert len(calls) == 3
