"""The distilled scorer fit to the labels as they are, or per unit of gradient norm, on a
copy of a finished run (same corpus, base model and labels; only the scorer's stages and
the distilled selection's continued pretraining are redone).

    MGD_DATA_DIR=<path to shared/data> python per_unit_pipeline.py FINISHED_RUN OUT_DIR smoke|mid 0|1

`smoke` is the preset; `mid` is `presets.mid()`, the configuration of
../gradient_alignment/full_pipeline.py (3 layers, width 64). The finished
run must have been made with the same configuration. Prints one JSON line: the distilled
selection's result over 3 seeds and its scorer's summary.
"""
import json
import sys
from pathlib import Path

from mgd.pipeline import presets, run

src, out, config, per_unit = sys.argv[1], Path(sys.argv[2]), sys.argv[3], bool(int(sys.argv[4]))
p = presets.mid() if config == "mid" else presets.smoke()
p = p.replace(scorer={**p.scorer, "per_unit_gradient": per_unit})
run.copy_for_scorer_variant(src, out)
summary = run.run(p, out=out, progress=False, quiet=True, methods=("metagrad_distilled",))
row = summary.loc["metagrad_distilled"]
print(json.dumps({"config": config, "per_unit_gradient": per_unit,
                  "eval_loss_mean": round(float(row["eval_loss_mean"]), 4),
                  "eval_loss_std": round(float(row["eval_loss_std"]), 4),
                  "ontarget_share": round(float(row["ontarget_share"]), 4),
                  "scorer": json.loads((out / "scorer" / "summary.json").read_text())}))
