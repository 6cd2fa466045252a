"""End to end: one metagradient round of the pipeline's model, per attention
implementation and sequence length: seconds per round and peak memory.

The round is `mgd.pipeline.oracle.metagradient_round` (dPhi/dw through the
inner Adam steps), so every attention call in it runs forward, backward and
double backward of the chosen implementation.

Knobs (environment):
    MGD_E2E_IMPLS        xla,pallas,triton,cuda
    MGD_E2E_T            512,1024,2048   (add 4096,... where memory allows:
                                          out of memory is recorded, not fatal)
    MGD_E2E_LAYERS 4, MGD_E2E_HEADS 4, MGD_E2E_DMODEL 256, MGD_E2E_VOCAB 8192,
    MGD_E2E_K 8 (train rows), MGD_E2E_TARGET 8 (target rows),
    MGD_E2E_INNER_STEPS 2, MGD_E2E_INNER_LR 1e-4, MGD_E2E_PLAN lean (oracle.PLANS)

The shapes of the issue's side-by-side table (and the stand-in round) are measured by
`python -m bench.round_timing`, which reads them from mgd.pipeline.round_shapes.
"""
from __future__ import annotations

import importlib
import os

import jax
import jax.numpy as jnp
import pytest

from bench import grid, harness
from mgd import backends


def _env_int(name, default):
    return int(os.environ.get(name, default))


def _lengths():
    return grid.env_list("MGD_E2E_T", "512,1024,2048", int)


def _impls():
    return grid.env_list("MGD_E2E_IMPLS", ",".join(grid.IMPLS), grid.impl_name)


def _params():
    params = [pytest.param(impl, t, id=f"{impl}-t{t}", marks=[pytest.mark.gpu, pytest.mark.e2e])
              for t in _lengths() for impl in _impls()]
    # A toy model through the xla baseline, to check the wiring on a CPU
    # (`pytest bench -m "e2e and not gpu"`). Not in cpu_subset: compiling the
    # second-order round takes ~30 s on a CI core even at this size.
    params.append(pytest.param("xla", 32, id="xla-t32-cpu", marks=pytest.mark.e2e))
    return params


def _pipeline():
    """The pipeline modules, imported only when an end-to-end bench runs."""
    try:
        model = importlib.import_module("mgd.pipeline.model")
        oracle = importlib.import_module("mgd.pipeline.oracle")
    except ImportError as err:
        pytest.skip(f"mgd.pipeline.model / mgd.pipeline.oracle cannot be imported: {err}")
    return model, oracle


def _config(model, impl, seq_len, small):
    if small:
        return model.GPTConfig(vocab_size=256, seq_len=seq_len, n_layer=1, n_head=2, d_model=32,
                               attention_impl=impl)
    return model.GPTConfig(
        vocab_size=_env_int("MGD_E2E_VOCAB", 8192), seq_len=seq_len,
        n_layer=_env_int("MGD_E2E_LAYERS", 4), n_head=_env_int("MGD_E2E_HEADS", 4),
        d_model=_env_int("MGD_E2E_DMODEL", 256), attention_impl=impl)


def _skip_if_unavailable(impl, cfg):
    dtype = jnp.dtype(getattr(cfg, "compute_dtype", "float32"))
    head_dim = cfg.d_model // cfg.n_head
    probe = jax.random.normal(jax.random.PRNGKey(0), (1, cfg.seq_len, cfg.n_head, head_dim),
                              jnp.float32).astype(dtype)
    reason = backends.unavailable_reason(impl, probe, probe, probe, causal=True)
    if reason is not None:
        pytest.skip(f"impl={impl!r} cannot serve the model's attention "
                    f"(T={cfg.seq_len}, head dim {head_dim}, {dtype.name}): {reason}")


def _token_sets(cfg, rows_train, rows_target, count):
    """`count` independent (train, target) batches of random token ids [rows, L+1]."""
    sets = []
    for i in range(count):
        ka, kb = jax.random.split(jax.random.PRNGKey(1000 + i))
        shape = lambda rows: (rows, cfg.seq_len + 1)  # noqa: E731
        sets.append((jax.random.randint(ka, shape(rows_train), 0, cfg.vocab_size, jnp.int32),
                     jax.random.randint(kb, shape(rows_target), 0, cfg.vocab_size, jnp.int32)))
    return sets


@pytest.mark.parametrize("impl, seq_len", _params())
def test_metagradient_round(benchmark, impl, seq_len):
    model, oracle = _pipeline()
    small = seq_len < 128
    cfg = _config(model, impl, seq_len, small)
    _skip_if_unavailable(impl, cfg)
    rows_train = 2 if small else _env_int("MGD_E2E_K", 8)
    rows_target = 2 if small else _env_int("MGD_E2E_TARGET", 8)
    inner_steps = 1 if small else _env_int("MGD_E2E_INNER_STEPS", 2)
    inner_lr = float(os.environ.get("MGD_E2E_INNER_LR", "1e-4"))

    benchmark.group = f"metagradient_round T={seq_len}"
    info = benchmark.extra_info
    info.update(harness.base_info("metagradient_round", impl))
    info.update(T=seq_len, n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model,
                vocab_size=cfg.vocab_size, k=rows_train, target_rows=rows_target,
                inner_steps=inner_steps, dtype=str(getattr(cfg, "compute_dtype", "")),
                shape=f"t{seq_len}-l{cfg.n_layer}-d{cfg.d_model}")

    plan = os.environ.get("MGD_E2E_PLAN", "lean")
    info["plan"] = plan

    def round_fn(params, train, target):
        return oracle.metagradient_round(params, cfg, train, target, inner_steps, inner_lr,
                                         remat=plan)

    jitted = jax.jit(round_fn)
    before = harness.memory_stats()
    failure = None
    try:
        params = model.init_params(cfg, jax.random.PRNGKey(0))
        count = 1 if benchmark.disabled else 2
        sets = [(params, *tokens) for tokens in _token_sets(cfg, rows_train, rows_target, count)]
        if not benchmark.disabled:
            info["compiled_bytes"] = harness.compiled_memory(jitted, sets[0])
        median = harness.measure(benchmark, "metagradient_round", jitted, sets)
    except Exception as err:  # noqa: BLE001 - anything but out-of-memory is re-raised
        if not harness.is_oom(err):
            raise
        failure = f"{type(err).__name__}: {err}"
    if failure is not None:
        params = sets = None  # drop the device buffers before the next benchmark allocates
    harness.settle_memory(benchmark, info, before, failure,
                          f"metagradient round, {impl}, T={seq_len}")
    if median is not None:
        info["median_s"] = median
        info["tokens_per_s"] = rows_train * seq_len * inner_steps / median
        harness.record_result(benchmark, median)
