"""Does the inner lr (relative to the base run's final lr) flip the oracle's cluster order?"""
import os, sys, numpy as np, jax, tempfile, time
from pathlib import Path
from mgd.pipeline import corpus as C, train as T, model, oracle
from mgd.pipeline.train import eval_loss
DATA = Path(os.environ.get("MGD_DATA_DIR", "/work/shared/data"))  # the run here used the default
tmp = Path(tempfile.mkdtemp())
n_on = 800
cc = C.CorpusConfig(ontarget=str(DATA / "ontarget.jsonl.gz"), offtarget=str(DATA / "offtarget.jsonl.gz"),
                    n_ontarget=n_on, n_offtarget=2 * n_on, n_corrupt=n_on // 2, n_target=128, n_eval=16,
                    seq_len=64, vocab_size=2048, tokenizer_train_docs=1000, max_docs=5000, seed=0)
c = C.build_corpus(cc, tmp)
mc = model.GPTConfig(vocab_size=c.vocab_size, seq_len=64, n_layer=4, n_head=4, d_model=128,
                     compute_dtype="float32", attention_impl="xla")
params = model.init_params(mc, jax.random.key(0))
t0 = time.time()
params, log, opt = T.train(params, c.tokens, mc, T.TrainConfig(steps=1500, batch_size=32, lr=1e-3, warmup=100, eval_every=0),
                           progress=False, return_opt_state=True)
print("trained", time.time() - t0, "final train loss", log[-1]["train_loss"], flush=True)
st = T.adam_moments(opt)
base_t = eval_loss(params, c.target_tokens, mc, 128)
for lr in [float(x) for x in sys.argv[1:]]:
    oc = oracle.OracleConfig(k=128, inner_steps=8, inner_lr=lr, rounds=24, target_batch=64, pool_size=1024)
    d = tmp / f"lr{lr}"; d.mkdir()
    lab = oracle.label(params, c, mc, oc, d, progress=False, adam_state=st)
    cl = c.cluster[lab.indices]
    means = {name: round(float(lab.scores[cl == i].mean()), 3) for i, name in C.CLUSTERS.items()}
    top = np.argsort(-lab.scores)[: len(lab.scores) // 10]
    share = {name: round(float((cl[top] == i).mean()), 2) for i, name in C.CLUSTERS.items()}
    print("lr", lr, "phi_mean", round(float(lab.round_phi.mean()), 4), "base target loss", round(base_t, 4),
          "means", means, "top10%", share, flush=True)
