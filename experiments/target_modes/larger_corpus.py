"""A `mid` run on a corpus three times as large (1800 on-target, 1800 off-target, 900
corrupt sequences; the budget, 10%, grows with it to 450), to check the target-mode
rule off the corpus size it was chosen on.

    MGD_DATA_DIR=<shared/data> python larger_corpus.py OUT_DIR SEED > larger_SEED.json

Prints the run's summary table as JSON; `target_modes.py OUT_DIR` then compares the rules.
"""
import json
import sys
from pathlib import Path

from mgd.pipeline import presets, run

out, seed = Path(sys.argv[1]), int(sys.argv[2])
base = presets.mid()
corpus = {**base.corpus, "n_ontarget": 1800, "n_offtarget": 1800, "n_corrupt": 900,
          "max_docs": 6000, "seed": seed}
summary = run.run(base.replace(corpus=corpus), out=out, progress=False, quiet=True)
print(json.dumps({"corpus_seed": seed, "summary": {
    m: {k: round(float(v), 4) for k, v in row.items()}
    for m, row in summary[["eval_loss_mean", "eval_loss_std", "ontarget_share"]].iterrows()}}))
