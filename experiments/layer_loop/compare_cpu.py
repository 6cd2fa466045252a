"""The layers as a scan or a Python loop: compile time, run time, temp memory and the HLO's
copies and dynamic-update-slices of one keep_all metagradient round, on this machine's CPU.

    python experiments/layer_loop/compare_cpu.py > experiments/layer_loop/cpu.log
"""
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from mgd.pipeline import model, oracle

VOCAB, K, L = 4096, 16, 128


def measure(scan_layers: bool) -> str:
    cfg = model.GPTConfig(vocab_size=VOCAB, seq_len=L, n_layer=6, n_head=4, d_model=256,
                          attention_impl="xla", compute_dtype="bfloat16", scan_layers=scan_layers)
    oc = oracle.OracleConfig(k=K, inner_steps=4, inner_lr=1e-4, target_batch=K, warm_start=False,
                             remat=oracle.PLANS["keep_all"])
    params = model.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    train = jnp.asarray(rng.integers(0, VOCAB, (1, K, L + 1)), jnp.int32)
    target = jnp.asarray(rng.integers(0, VOCAB, (1, K, L + 1)), jnp.int32)
    t0 = time.perf_counter()
    compiled = oracle.make_rounds_fn(cfg, oc).lower(params, train, target).compile()
    compile_s = time.perf_counter() - t0
    text = compiled.as_text()
    copies = len(re.findall(r"= \S+ copy\(", text))
    dus = text.count("dynamic-update-slice(")
    temp = compiled.memory_analysis().temp_size_in_bytes
    tau = jax.block_until_ready(compiled(params, train, target))[0]
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, train, target))
        times.append(time.perf_counter() - t0)
    return (f"scan_layers={scan_layers}: compile {compile_s:.1f} s, round {np.median(times):.3f} s "
            f"(median of 3), copies {copies}, dynamic-update-slices {dus}, temp "
            f"{temp / 1e6:.1f} MB, tau[:3] {np.asarray(tau).ravel()[:3]}")


if __name__ == "__main__":
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; 6 layers, width 256, k={K}, "
          f"L={L}, 4 inner steps, keep_all, bf16, xla attention")
    for scan in (True, False):
        print(measure(scan), flush=True)
