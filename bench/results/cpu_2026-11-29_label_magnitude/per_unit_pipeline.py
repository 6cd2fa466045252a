"""The distilled scorer fit to the labels as they are, or per unit of gradient norm, on a
copy of a finished run (same corpus, base model and labels; only the scorer's stages and
the distilled selection's continued pretraining are redone).

    MGD_DATA_DIR=<path to shared/data> python per_unit_pipeline.py FINISHED_RUN OUT_DIR smoke|mid 0|1

`smoke` is the preset; `mid` the configuration of
../cpu_2026-11-29_gradient_alignment/full_pipeline.py (3 layers, width 64). The finished
run must have been made with the same configuration. Prints one JSON line: the distilled
selection's result over 3 seeds and its scorer's summary.
"""
import json
import sys
from pathlib import Path

from mgd.pipeline import presets, run

src, out, config, per_unit = sys.argv[1], Path(sys.argv[2]), sys.argv[3], bool(int(sys.argv[4]))
p = presets.smoke()
if config == "mid":
    p = p.replace(name="mid", model=dict(n_layer=3, n_head=2, d_model=64, compute_dtype="float32"),
                  base_train=dict(steps=600, batch_size=16, lr=3e-3, warmup=20, eval_every=0,
                                  ckpt_every=200),
                  oracle=dict(k=32, inner_steps=4, inner_lr=1e-4, rounds=96, target_batch=32,
                              pool_size=512))
p = p.replace(scorer={**p.scorer, "alignment_feature": True, "gradient_alignment": False,
                      "per_unit_gradient": per_unit})
run.copy_for_scorer_variant(src, out)
summary = run.run(p, out=out, progress=False, quiet=True, methods=("metagrad_distilled",))
row = summary.loc["metagrad_distilled"]
print(json.dumps({"config": config, "per_unit_gradient": per_unit,
                  "eval_loss_mean": round(float(row["eval_loss_mean"]), 4),
                  "eval_loss_std": round(float(row["eval_loss_std"]), 4),
                  "ontarget_share": round(float(row["ontarget_share"]), 4),
                  "scorer": json.loads((out / "scorer" / "summary.json").read_text())}))
