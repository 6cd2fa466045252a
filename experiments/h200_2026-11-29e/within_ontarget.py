"""What sets the distilled selection's on-target rows apart from the on-target cluster,
on this demo run (the rows a random on-target draw would take).

    MGD_DATA_DIR=<shared/data> python within_ontarget.py WORK_DIR > within_ontarget.txt

Rebuilds the demo's corpus on CPU from `demo/plan.json` (checked against the run's
`demo/summaries/corpus_stats.json`), reads `demo_labels.tgz`, and compares the distilled
top 10%'s on-target rows with all on-target rows: how many documents they come from,
where in its document a row sits, separators per row, and the unigram distribution's
distance to the held-out evaluation set.
"""
import os
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/offline.py
import offline  # noqa: E402

device = offline.rebuild_device_run(Path(__file__).parent, os.environ["MGD_DATA_DIR"],
                                    sys.argv[1])
plan, corpus, labels, scores = device.plan, device.corpus, device.labels, device.scores
k = int(round(plan["budget"] * len(scores)))
top = np.argsort(-scores)[:k]
on = np.flatnonzero(corpus.cluster == 0)
picked = top[corpus.cluster[top] == 0]
rng = np.random.default_rng(0)
draw = rng.choice(on, size=len(picked), replace=False)
eot = corpus.eot
vocab = corpus.vocab_size


def unigram(rows):
    c = np.bincount(corpus.tokens[rows].reshape(-1), minlength=vocab).astype(np.float64)
    return (c + 0.5) / (c + 0.5).sum()


ev = np.bincount(corpus.eval_tokens.reshape(-1), minlength=vocab).astype(np.float64)
ev = (ev + 0.5) / (ev + 0.5).sum()
# A row's place in its document: rows of one document are consecutive in the packed
# order, which the corpus shuffled; the doc_id and the count of rows per document
# recover how many rows each document spans.
rows_per_doc = np.bincount(corpus.doc_id[on])
print(f"on-target rows: {len(on)}; the distilled top {k} holds {len(picked)} of them; "
      f"a random draw of {len(picked)} on-target rows for comparison")
for name, rows in (("distilled picks", picked), ("random on-target draw", draw), ("all on-target", on)):
    seps = (corpus.tokens[rows] == eot).sum(1)
    docs = corpus.doc_id[rows]
    p = unigram(rows)
    kl = float(np.sum(ev * np.log(ev / p)))
    print(f"{name:>22}: distinct first documents {len(np.unique(docs)) / len(rows):.3f} per row; "
          f"rows with a separator {np.mean(seps > 0):.3f}; rows of documents spanning >= 3 rows "
          f"{np.mean(rows_per_doc[docs] >= 3):.3f}; KL(eval unigram || rows' unigram) {kl:.4f}")
lab_rows = labels["indices"]
lab = labels["scores"]
on_lab = corpus.cluster[lab_rows] == 0
seps = (corpus.tokens[lab_rows] == eot).sum(1)
print(f"labeled on-target rows: mean label with a separator {lab[on_lab & (seps > 0)].mean():+.3f} "
      f"({np.sum(on_lab & (seps > 0))} rows), without {lab[on_lab & (seps == 0)].mean():+.3f} "
      f"({np.sum(on_lab & (seps == 0))} rows)")
# The tokens the picks over- and under-use most against the random on-target draw,
# weighted by their share of the evaluation set's tokens.
tok = corpus.tokenizer
pp, pr = unigram(picked), unigram(draw)
ratio = np.log(pp / pr)
weight = ev * ratio
for title, order in (("over-used by the picks", np.argsort(-weight)[:20]),
                     ("under-used by the picks", np.argsort(weight)[:20])):
    print(f"\n{title} (token: picks / random draw, share of eval tokens):")
    print("  " + "; ".join(f"{tok.id_to_token(int(t))!r}: {np.exp(ratio[t]):.2f}x, {ev[t]:.4f}"
                           for t in order))

# Is it the target set's own make-up? The metagradient's target is `corpus.target_tokens`
# (held-out on-target documents other than the evaluation set's).
tg = np.bincount(corpus.target_tokens.reshape(-1), minlength=vocab).astype(np.float64)
tg = (tg + 0.5) / (tg + 0.5).sum()
for name, p in (("distilled picks", pp), ("random on-target draw", pr)):
    print(f"KL(target unigram || {name}) {float(np.sum(tg * np.log(tg / p))):.4f}; "
          f"KL(eval unigram || {name}) {float(np.sum(ev * np.log(ev / p))):.4f}")
print(f"KL(eval unigram || target unigram) {float(np.sum(ev * np.log(ev / tg))):.4f}")
words = ["Ġpatients", "Ġplacebo", "Ġtreatment", "%", "Ġcells", "cell", "GF", "ĠT"]
print("share of tokens (target / eval / picks / random draw): " + "; ".join(
    f"{w!r} {tg[tok.token_to_id(w)]:.4f} / {ev[tok.token_to_id(w)]:.4f} / "
    f"{pp[tok.token_to_id(w)]:.4f} / {pr[tok.token_to_id(w)]:.4f}" for w in words))

# Do the labels themselves lean that way, or only the scorer? A fixed word list, not
# fitted to anything: clinical minus basic-science tokens per row, against the oracle
# label (labeled on-target rows) and the distilled score (all on-target rows).
clinical = ["Ġpatients", "Ġplacebo", "Ġtreatment", "Ġtreated", "Ġclinical", "Ġtrial",
            "Ġdose", "Ġtherapy", "Ġhospital", "Ġmortality"]
basic = ["Ġcells", "Ġcell", "Ġprotein", "Ġexpression", "Ġgene", "Ġreceptor", "Ġrats",
         "Ġmice", "Ġbinding", "Ġenzyme"]
ids = lambda ws: [tok.token_to_id(w) for w in ws if tok.token_to_id(w) is not None]  # noqa: E731
ci, bi = ids(clinical), ids(basic)
lean = (np.isin(corpus.tokens, ci).sum(1) - np.isin(corpus.tokens, bi).sum(1)).astype(float)
print(f"\nclinical-minus-basic word count ({len(ci)} and {len(bi)} words in the vocabulary): "
      f"Spearman with the oracle label over labeled on-target rows "
      f"{spearmanr(lab[on_lab], lean[lab_rows[on_lab]])[0]:+.3f}; with the distilled score "
      f"over all on-target rows {spearmanr(scores[on], lean[on])[0]:+.3f}; mean over the picks "
      f"{lean[picked].mean():+.3f}, over the random draw {lean[draw].mean():+.3f}, over the "
      f"target set {(np.isin(corpus.target_tokens, ci).sum(1) - np.isin(corpus.target_tokens, bi).sum(1)).mean():+.3f}")
