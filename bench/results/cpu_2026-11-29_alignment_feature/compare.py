"""The distilled scorer with and without the output-layer alignment feature, on CPU.

    MGD_DATA_DIR=../shared/data python compare.py OUT_DIR

Runs the pipeline up to the `random` baseline (corpus, base model, oracle, features,
scorer) for two configurations, each twice (alignment feature off, on): `smoke` (the
preset: a 1-layer, 32-wide model) and `mid` (the smoke corpus with a 3-layer, 64-wide
model trained for 600 steps and 96 oracle rounds of 32 rows). The oracle labels are
computed once per configuration and reused (the feature does not touch the oracle's
inputs), so the two scorer fits see the same labels. Prints one JSON line per run.
"""
import json
import shutil
import sys
from pathlib import Path

from mgd.pipeline import presets, run

out = Path(sys.argv[1])
configs = {
    "smoke": presets.smoke(),
    "mid": presets.smoke().replace(
        name="mid", model=dict(n_layer=3, n_head=2, d_model=64, compute_dtype="float32"),
        base_train=dict(steps=600, batch_size=16, lr=3e-3, warmup=20, eval_every=0,
                        ckpt_every=200),
        oracle=dict(k=32, inner_steps=4, inner_lr=1e-4, rounds=96, target_batch=32,
                    pool_size=512)),
}
for name, preset in configs.items():
    for align in (False, True):
        p = preset.replace(scorer={**preset.scorer, "alignment_feature": align})
        d = out / f"{name}-align{int(align)}"
        if align:   # same corpus, base model and labels as the run without the feature
            shutil.copytree(out / f"{name}-align0", d, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("features", "scorer", "select-*",
                                                          "continued-*", "report", "plan.json"))
        run.run(p, out=d, progress=False, quiet=True, methods=("random",))
        s = json.loads((d / "scorer" / "summary.json").read_text())
        o = json.loads((d / "oracle" / "summary.json").read_text())
        print(json.dumps({"config": name, "alignment_feature": align,
                          "heldout_spearman": s["heldout_spearman"], "winner": s["winner"],
                          "label_reliability": o["label_reliability"],
                          "n_heldout": s["n_heldout"]}), flush=True)
