"""Call 4's demo run, retrained on CPU: its distilled selection with and without the
whole-model gradient-alignment column, paired on the same base model and labels.

    MGD_DATA_DIR=<shared/data> python gradient_on_cpu.py SNAPSHOT_DIR WORK_DIR [SEEDS] > gradient_on_cpu.txt

SNAPSHOT_DIR: what call 4 returned beside results.tgz (base_params.npz, base_adam_nu.npz,
features.npz, snapshot_meta.json; bfloat16, `experiments/run_snapshot.py`). The corpus is
rebuilt from `demo/plan.json` (checked against `demo/summaries/corpus_stats.json`); the
labels come from `demo_labels.tgz`. Both scorers are fit as the pipeline fits them
(`scorer.fit_scorer`, the plan's settings) on the run's features, one without their last
column (the gradient alignment); both select with the preset's rule (4 target modes,
gate 0.99); each selection is trained with the plan's continued-pretraining settings in
float32 on CPU (the H200 trained in bfloat16), evaluated once at the end.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from mgd.pipeline import continued as cont, scorer
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/offline.py
import offline  # noqa: E402
from mgd.pipeline.model import GPTConfig
from mgd.pipeline.run import distilled_rule, load_params
from mgd.pipeline.selection import fit_target_modes, stratified_top_k

here = Path(__file__).parent
snapshot, work = Path(sys.argv[1]), Path(sys.argv[2])
seeds = range(int(sys.argv[3]) if len(sys.argv) > 3 else 3)
device = offline.rebuild_device_run(here, os.environ["MGD_DATA_DIR"], work)
plan, corpus, lab, run_scores = device.plan, device.corpus, device.labels, device.scores
subprocess.run([sys.executable, str(here.parent / "run_snapshot.py"), "unpack",
                str(snapshot), str(work)], check=True)
cfg = GPTConfig(vocab_size=corpus.vocab_size, seq_len=corpus.seq_len,
                **{**plan["model"], "compute_dtype": "float32", "attention_impl": "xla"})
base = load_params(work / "base" / "params.npz", cfg)
feats = np.asarray(np.load(work / "features" / "features.npz")["features"], np.float64)
sc = plan["scorer"]
k = int(round(plan["budget"] * corpus.tokens.shape[0]))
target = scorer.extract_features(base, corpus.target_tokens, cfg, progress=False)
modes = fit_target_modes(target, feats[:, :cfg.d_model], plan["target_modes"])
typical = modes.typical(plan["target_gate"])
# The H200 run's own scores under the same rule (its modes refit here, in float32).
own = set(stratified_top_k(run_scores, modes.mode_of_row, modes.share, k, typical).tolist())
print(f"rule: {distilled_rule(plan)}; {int(typical.sum())} typical rows (the H200 run: "
      f"{json.loads((here / 'demo' / 'selection_info' / 'metagrad_distilled.json').read_text())['typical_rows']})")
ccfg = cont.ContinuedConfig(**{**plan["continued"], "n_evals": 1})
for name, cols in (("without the gradient alignment", feats[:, :-1]), ("with it (the preset)", feats)):
    fit = scorer.fit_scorer(cols, lab["indices"], lab["scores"], seed=0,
                            holdout_fraction=sc["holdout_fraction"],
                            regressors=tuple(sc["regressors"]), mlp_hidden=sc["mlp_hidden"])
    idx = stratified_top_k(fit.scores, modes.mode_of_row, modes.share, k, typical)
    losses = []
    for s in seeds:
        res, _ = cont.continue_pretraining(base, corpus.tokens, idx, k, corpus.eval_tokens, cfg,
                                           ccfg, s, progress=False)
        losses.append(res["eval_loss"])
        print(f"  {name}: seed {s} eval loss {res['eval_loss']:.4f}", flush=True)
    print(json.dumps({"scorer": name, "winner": fit.winner,
                      "heldout_spearman": round(float(fit.heldout_spearman[fit.winner]), 3),
                      "ontarget_share": round(float(np.mean(corpus.cluster[idx] == 0)), 4),
                      "overlap_with_h200_selection": round(len(own & set(idx.tolist())) / k, 3),
                      "eval_loss": [round(x, 4) for x in losses],
                      "eval_loss_mean": round(float(np.mean(losses)), 4),
                      "eval_loss_std": round(float(np.std(losses, ddof=1)), 4) if len(losses) > 1 else None}),
          flush=True)
