"""DSIR: data selection by importance resampling on hashed n-gram features
(Xie et al. 2023), through the `data-selection` package (HashedNgramDSIR).

The importance weight of a sequence is log p_target(f) - log p_raw(f) under bag-of-
hashed-n-gram models fit on the target documents and on the corpus; the package then
resamples without replacement with Gumbel top-k on those log weights.

Two package details are handled here, not patched:
- `num_proc=1`. With nltk 3.10 any num_proc > 1 makes the package's joblib workers
  fail ("ValueError: timeout not float or None" from nltk's regex guard under loky);
  one in-process worker is exact, and the corpus is small enough for it.
- `tokenizer="wordpunct"` (the package default): a regular expression, so it needs no
  nltk data. The alternative, `word_tokenize`, needs the `punkt_tab` model, which cannot
  be downloaded offline; `check_nltk_offline()` verifies that wordpunct works.
"""
from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

import numpy as np


def check_nltk_offline() -> None:
    """Fail early and clearly if the wordpunct tokenizer would need downloaded data."""
    from nltk.tokenize import WordPunctTokenizer
    got = WordPunctTokenizer().tokenize("p53-mediated apoptosis, in vivo.")
    if got[:3] != ["p53", "-", "mediated"]:
        raise RuntimeError(f"nltk's WordPunctTokenizer misbehaves: {got}")


def importance_weights(texts, target_texts, work_dir, *, ngrams: int = 2,
                       num_buckets: int = 10_000, progress: bool = False):
    """([N] DSIR log importance weights of `texts` toward `target_texts`, the fitted
    HashedNgramDSIR object)."""
    from data_selection import HashedNgramDSIR
    if not texts or not target_texts:
        raise ValueError(f"DSIR needs raw and target texts (got {len(texts)} and "
                         f"{len(target_texts)})")
    check_nltk_offline()
    work = Path(work_dir)
    raw_path, target_path = _write_jsonl(work / "raw.jsonl", texts), \
        _write_jsonl(work / "target.jsonl", target_texts)
    dsir = HashedNgramDSIR([str(raw_path)], [str(target_path)], cache_dir=str(work / "cache"),
                           num_proc=1, ngrams=ngrams, num_buckets=num_buckets,
                           tokenizer="wordpunct", min_example_length=1)
    with _quiet(not progress):
        dsir.fit_importance_estimator(num_tokens_to_fit="all")
        dsir.compute_importance_weights()
    weights = np.load(work / "cache" / "log_importance_weights" / "0.npy")
    if weights.shape != (len(texts),):
        raise RuntimeError(f"DSIR returned {weights.shape} weights for {len(texts)} texts")
    return weights, dsir


def select(texts, target_texts, k: int, seed: int, *, work_dir=None, ngrams: int = 2,
           num_buckets: int = 10_000, progress: bool = False):
    """(indices [k], log_weights [N]): DSIR's importance resampling of k sequences."""
    draws, weights = select_draws(texts, target_texts, k, [seed], work_dir=work_dir,
                                  ngrams=ngrams, num_buckets=num_buckets, progress=progress)
    return draws[0], weights


def select_draws(texts, target_texts, k: int, seeds, *, work_dir=None, ngrams: int = 2,
                 num_buckets: int = 10_000, progress: bool = False):
    """(indices [len(seeds), k], log_weights [N]): one importance resample of k sequences
    per seed, from one fit of the n-gram models.

    The package's `resample` picks rows (Gumbel top-k, seeded here through NumPy's
    global generator, which the package uses) and writes them out; each row carries its
    corpus index, read back from the package's output.
    """
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="dsir-"))
        work = Path(work_dir)
        weights, dsir = importance_weights(texts, target_texts, work, ngrams=ngrams,
                                           num_buckets=num_buckets, progress=progress)
        draws = [_resample(dsir, work / f"draw-{i}", k, seed, progress)
                 for i, seed in enumerate(seeds)]
    return np.stack(draws), weights


def _resample(dsir, work: Path, k: int, seed: int, progress: bool) -> np.ndarray:
    """[k] sorted corpus rows of one seeded resample."""
    # The min_example_length filter in resample works in words; sequences here are
    # fixed token windows, so every one is eligible (min_example_length=1 above).
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        with _quiet(not progress):
            dsir.resample(out_dir=str(work / "selected"), num_to_sample=k,
                          cache_dir=str(work / "resample-cache"))
    finally:
        np.random.set_state(state)
    indices = []
    for path in sorted((work / "selected").glob("*.jsonl")):
        with open(path) as f:
            indices.extend(json.loads(line)["row"] for line in f if line.strip())
    indices = np.sort(np.asarray(indices, dtype=np.int64))
    if indices.shape[0] != k or np.unique(indices).shape[0] != k:
        raise RuntimeError(f"DSIR resample returned {indices.shape[0]} rows, expected {k}")
    return indices


def _write_jsonl(path: Path, texts) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "row": i}) + "\n")
    return path


@contextlib.contextmanager
def _quiet(enabled: bool):
    # The package prints a tqdm bar per pass to stderr; the pipeline shows its own.
    if not enabled:
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield
