"""End to end: one metagradient round per round shape and attention implementation,
side by side with the stand-in round: seconds per round and peak memory.

The round is `mgd.pipeline.oracle.metagradient_round` (dPhi/dw through the inner Adam
steps, the `lean` plan unless MGD_E2E_PLAN says otherwise), so every attention call in it
runs forward, backward and double backward of the chosen implementation. The shapes are
those of `mgd.pipeline.round_shapes` (the e2e shape: 4 layers, width 512, 8 heads of
D=64; GPT-2 small: 12 layers, width 768, 12 heads of D=64), with their k, target rows and
inner steps. The stand-in (`v + 1e-6 (q + k)` in attention's place) is what the round
costs outside attention: the report divides the best reference's round by it, the
ceiling any attention kernel could reach.

Knobs (environment):
    MGD_E2E_SHAPES   e2e:16384,e2e:32768,gpt2s:8192,gpt2s:16384   (name:seq_len; out of
                     memory is recorded, not fatal)
    MGD_E2E_IMPLS    xla,pallas,triton,cuda   (the stand-in is always added)
    MGD_E2E_PLAN     lean (oracle.PLANS)
"""
from __future__ import annotations

import importlib
import os

import jax
import jax.numpy as jnp
import pytest

from bench import grid, harness
from mgd import backends

STANDIN = "standin"   # mgd.pipeline.model.STANDIN, without importing the pipeline here
GPU_SHAPES = "e2e:16384,e2e:32768,gpt2s:8192,gpt2s:16384"


def _shapes():
    return [s for s in os.environ.get("MGD_E2E_SHAPES", GPU_SHAPES).split(",") if s]


def _impls():
    return grid.env_list("MGD_E2E_IMPLS", ",".join(grid.IMPLS), grid.impl_name) + [STANDIN]


def _params():
    params = [pytest.param(impl, spec, id=f"{impl}-{spec.replace(':', '')}",
                           marks=[pytest.mark.gpu, pytest.mark.e2e])
              for spec in _shapes() for impl in _impls()]
    # The toy shape through naive XLA and the stand-in, to check the wiring on a CPU
    # (`pytest bench -m "e2e and not gpu"`). Not in cpu_subset: compiling the
    # second-order round takes ~30 s on a CI core even at this size.
    params += [pytest.param(impl, "toy:32", id=f"{impl}-toy32-cpu", marks=pytest.mark.e2e)
               for impl in ("xla", STANDIN)]
    return params


def _pipeline():
    """The pipeline modules, imported only when an end-to-end bench runs."""
    try:
        oracle = importlib.import_module("mgd.pipeline.oracle")
        model = importlib.import_module("mgd.pipeline.model")
        round_shapes = importlib.import_module("mgd.pipeline.round_shapes")
    except ImportError as err:
        pytest.skip(f"mgd.pipeline cannot be imported: {err}")
    return model, oracle, round_shapes


def _skip_if_unavailable(impl, cfg):
    if impl == STANDIN:
        return
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


@pytest.mark.parametrize("impl, spec", _params())
def test_metagradient_round(benchmark, impl, spec):
    model, oracle, round_shapes = _pipeline()
    shape, seq_len = round_shapes.parse_shape(spec)
    plan = os.environ.get("MGD_E2E_PLAN", "lean")
    cfg = shape.model_config(seq_len, impl)
    oc = shape.oracle_config(oracle.RematPlan.named(plan))
    _skip_if_unavailable(impl, cfg)
    rows_train, rows_target = shape.k, shape.target_rows

    benchmark.group = f"metagradient_round {spec}"
    info = benchmark.extra_info
    info.update(harness.base_info("metagradient_round", impl))
    info.update(T=seq_len, round_shape=shape.name, n_layer=cfg.n_layer, n_head=cfg.n_head,
                d_model=cfg.d_model, vocab_size=cfg.vocab_size, k=rows_train,
                target_rows=rows_target, inner_steps=oc.inner_steps, dtype=cfg.compute_dtype,
                shape=spec, plan=plan)
    jitted = oracle.make_round_fn(cfg, oc)
    before = harness.memory_stats()
    failure, median = None, None
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
        info["tokens_per_s"] = rows_train * seq_len * oc.inner_steps / median
        harness.record_result(benchmark, median)
