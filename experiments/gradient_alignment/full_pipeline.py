"""The whole pipeline at the `mid` configuration of compare.py, whole-model gradient
alignment off or on (the last-layer alignment columns on in both).

    MGD_DATA_DIR=<path to shared/data> python full_pipeline.py OUT_DIR 0|1

Every stage and every baseline (7 methods x 3 seeds of continued pretraining), a few
minutes on 2 CPU cores. The report lands in OUT_DIR/report.md.
"""
import sys

from mgd.pipeline import presets, run

whole = bool(int(sys.argv[2]))
base = presets.smoke()
p = base.replace(name="mid", model=dict(n_layer=3, n_head=2, d_model=64, compute_dtype="float32"),
                 base_train=dict(steps=600, batch_size=16, lr=3e-3, warmup=20, eval_every=0,
                                 ckpt_every=200),
                 oracle=dict(k=32, inner_steps=4, inner_lr=1e-4, rounds=96, target_batch=32,
                             pool_size=512),
                 scorer={**base.scorer, "alignment_feature": True, "gradient_alignment": whole})
run.run(p, out=sys.argv[1], progress=False)
