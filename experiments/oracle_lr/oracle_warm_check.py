"""Fresh vs warm-started inner Adam: cluster means of oracle scores (CPU, small)."""
import os, sys, json, numpy as np, jax, tempfile
from pathlib import Path
from mgd.pipeline import corpus as C, train as T, model, oracle
DATA = Path(os.environ.get("MGD_DATA_DIR", "/work/shared/data"))  # the run here used the default
lr, steps = float(sys.argv[1]), int(sys.argv[2])
tmp = Path(tempfile.mkdtemp())
n_on = 400
cc = C.CorpusConfig(ontarget=str(DATA / "ontarget.jsonl.gz"), offtarget=str(DATA / "offtarget.jsonl.gz"),
                    n_ontarget=n_on, n_offtarget=2 * n_on, n_corrupt=n_on // 2, n_target=64, n_eval=16,
                    seq_len=64, vocab_size=1024, tokenizer_train_docs=600, max_docs=3000, seed=0)
c = C.build_corpus(cc, tmp)
mc = model.GPTConfig(vocab_size=c.vocab_size, seq_len=64, n_layer=2, n_head=2, d_model=64,
                     compute_dtype="float32", attention_impl="xla")
params = model.init_params(mc, jax.random.key(0))
params, _, opt = T.train(params, c.tokens, mc, T.TrainConfig(steps=600, batch_size=32, lr=1e-3, warmup=50, eval_every=0),
                         progress=False, return_opt_state=True)
st = T.adam_moments(opt)
for warm in ((False, True) if len(sys.argv) < 4 else (True,)):
    oc = oracle.OracleConfig(k=64, inner_steps=steps, inner_lr=lr, rounds=24, target_batch=64, pool_size=512, warm_start=warm)
    d = tmp / f"w{int(warm)}"; d.mkdir()
    lab = oracle.label(params, c, mc, oc, d, progress=False, adam_state=st)
    cl = c.cluster[lab.indices]
    means = {name: round(float(lab.scores[cl == i].mean()), 3) for i, name in C.CLUSTERS.items()}
    top = np.argsort(-lab.scores)[: len(lab.scores) // 10]
    share = {name: round(float((cl[top] == i).mean()), 2) for i, name in C.CLUSTERS.items()}
    from mgd.pipeline.train import eval_loss
    base_t = eval_loss(params, c.target_tokens, mc, 64)
    print("phi_mean", float(lab.round_phi.mean()), "base target loss", base_t)
    print("warm" if warm else "fresh", "lr", lr, "steps", steps, "means", means, "top10%", share, flush=True)
