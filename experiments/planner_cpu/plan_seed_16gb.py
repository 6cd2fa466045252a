"""Plan (compile for estimates, run nothing) the seed labeling round for a 16 GB budget on
this machine's CPU, logging each compile: how many compiles the planner needs.

    python experiments/planner_cpu/plan_seed_16gb.py > experiments/planner_cpu/<name>.log 2>&1
"""
import logging
import time

from mgd.pipeline import model, oracle
from mgd.pipeline.planner import Planner

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
cfg = model.GPTConfig(seq_len=128, attention_impl="xla", compute_dtype="bfloat16",
                      vocab_size=50257, n_layer=12, n_head=12, d_model=768)
oc = oracle.OracleConfig(k=64, inner_steps=16, inner_lr=1e-4, target_batch=64, warm_start=False,
                         auto_plan=True, memory_budget="16GB")
p = Planner.for_device(cfg, oc, 64, 64)
for line in p.describe(12):
    print(line)
t0 = time.time()
r = p.plan()
print("plan", time.time() - t0, r.remat, r.micro_batch, r.rounds_per_device)
print(p.metadata())
