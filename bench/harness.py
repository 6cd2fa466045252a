"""How one benchmark is timed and what it records.

Timing rules (GPU work is asynchronous, so a careless timer measures dispatch):
  * compile and one warm-up call per input set happen before the timed region;
  * every timed call ends in `jax.block_until_ready`, inside the timed region;
  * the input sets are rotated call by call, so repeated calls do not find
    their operands already in L2;
  * pytest-benchmark's pedantic mode runs many rounds; the median is reported.

Knobs (environment): MGD_BENCH_SETS (input sets, default 4), MGD_BENCH_MAX_S
(timed seconds per benchmark, default 0.5), MGD_BENCH_MIN_ROUNDS (5),
MGD_BENCH_MAX_ROUNDS (50), MGD_BENCH_JSONL (append every result and
out-of-memory point to this file as it happens, so a run that is killed part
way still leaves its finished numbers), MGD_BENCH_PROGRESS (a log of each
benchmark's start, compile time and end, written as they happen: where a killed
run spent its time).
"""
from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import time
from functools import cache
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from mgd.profiling import nvtx_range

REPO = Path(__file__).resolve().parent.parent

# Out-of-memory points, added to the saved JSON under "mgd_oom" by bench/conftest.py
# (pytest-benchmark drops skipped tests from its own "benchmarks" list).
OOM_RECORDS: list[dict] = []


def _env_int(name, default):
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def _env_float(name, default):
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


# ---------------------------------------------------------------- provenance

@cache
def commit():
    """$MGD_COMMIT when set, else the git commit of the checkout.

    The environment wins: scripts/gpu_run.sh sets it to the commit whose export it
    runs, and a git directory found further up (a copy of the repository the export
    sits in) may name another commit.
    """
    if os.environ.get("MGD_COMMIT"):
        return os.environ["MGD_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@cache
def device_name():
    device = jax.devices()[0]
    return getattr(device, "device_kind", None) or device.platform


def memory_stats():
    """The first device's allocator statistics, or {} where there are none (CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        stats = None
    return dict(stats or {})


def compiled_memory(jitted, args):
    """XLA's buffer-assignment footprint of one executable: arguments + outputs
    + temporaries - aliased. Unlike the allocator's peak, which only ever grows
    over a process, this is specific to the benchmarked function. Buffers a
    custom kernel allocates behind XLA's back are not in it."""
    try:
        analysis = jitted.lower(*args).compile().memory_analysis()
    except Exception:  # noqa: BLE001 - memory analysis is best effort
        return None
    if analysis is None:
        return None
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
               + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


def is_oom(err):
    if isinstance(err, MemoryError):
        return True
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def nbytes(tree):
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


# ----------------------------------------------------------------- the HVP

def hvp_function(impl, causal):
    """Reverse over reverse through `mgd.attention`: the gradient of <grad L, u>
    for L = sum(sin(O) * c). The loss is nonlinear in O on purpose: a linear
    one would skip the path through dO = L'(O) (the "nesting trap")."""
    import mgd

    def loss(q, k, v, c):
        o = mgd.attention(q, k, v, causal=causal, impl=impl)
        return jnp.sum(jnp.sin(o.astype(jnp.float32)) * c)

    def directional(q, k, v, c, uq, uk, uv):
        grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, c)
        return sum(jnp.vdot(g.astype(jnp.float32), u) for g, u in zip(grads, (uq, uk, uv)))

    return jax.grad(directional, argnums=(0, 1, 2))


# -------------------------------------------------------------------- timing

def _schedule(one_call_s):
    """(rounds, iterations): each round at least ~1 ms long, the whole
    measurement about MGD_BENCH_MAX_S, at least MGD_BENCH_MIN_ROUNDS rounds."""
    min_round_s = 1e-3
    iterations = max(1, min(100, math.ceil(min_round_s / max(one_call_s, 1e-9))))
    budget = _env_float("MGD_BENCH_MAX_S", 0.5)
    min_rounds = max(1, _env_int("MGD_BENCH_MIN_ROUNDS", 5))
    max_rounds = max(min_rounds, _env_int("MGD_BENCH_MAX_ROUNDS", 50))
    rounds = int(budget / (one_call_s * iterations))
    return max(min_rounds, min(max_rounds, rounds)), iterations


def measure(benchmark, stage, jitted, input_sets):
    """Time `jitted` over the rotated `input_sets` with `benchmark.pedantic`.

    Returns the median seconds per call, or None when pytest-benchmark is
    disabled (--benchmark-disable: the function is only run once, as a smoke test).
    """
    if benchmark.disabled:
        # --benchmark-disable: compile, then exactly one call inside the stage's
        # NVTX range (a smoke test in CI; one launch per kernel under ncu).
        with nvtx_range(f"{stage}:warmup"):
            jax.block_until_ready(jitted(*input_sets[0]))

        def once():
            with nvtx_range(stage):
                jax.block_until_ready(jitted(*input_sets[0]))

        benchmark.pedantic(once)
        return None
    for args in input_sets:  # compile and warm up outside the timed region
        with nvtx_range(f"{stage}:warmup"):
            jax.block_until_ready(jitted(*args))
    start = time.perf_counter()
    jax.block_until_ready(jitted(*input_sets[0]))
    one_call_s = time.perf_counter() - start
    rounds, iterations = _schedule(one_call_s)

    turn = [0]

    def timed_call():
        args = input_sets[turn[0] % len(input_sets)]
        turn[0] += 1
        with nvtx_range(stage):
            jax.block_until_ready(jitted(*args))

    benchmark.pedantic(timed_call, rounds=rounds, iterations=iterations,
                       warmup_rounds=min(2, rounds))
    stats = benchmark.stats
    benchmark.extra_info.update(rounds=rounds, iterations=iterations)
    return float(stats.stats.median)


def n_input_sets(bytes_per_set, disabled=False):
    """Several sets (MGD_BENCH_SETS, default 4), fewer where they would take
    more than a quarter of the device memory; one when nothing is timed."""
    if disabled:
        return 1
    wanted = max(1, _env_int("MGD_BENCH_SETS", 4))
    limit = memory_stats().get("bytes_limit")
    if limit and bytes_per_set > 0:
        wanted = max(1, min(wanted, int(0.25 * limit // bytes_per_set)))
    return wanted


# ----------------------------------------------------------------- recording

def base_info(stage, impl):
    return {"stage": stage, "impl": impl, "gpu": device_name(),
            "platform": jax.devices()[0].platform, "commit": commit(),
            "jax": jax.__version__}


def add_memory(info, stats_before):
    """Allocator figures after the benchmark. `peak_bytes_in_use` is the
    process's high-water mark so far (JAX cannot reset it), so it is an upper
    bound for this benchmark; `compiled_bytes` is the per-function figure."""
    stats = memory_stats()
    if stats:
        info["peak_bytes_in_use"] = int(stats.get("peak_bytes_in_use", 0))
        info["bytes_limit"] = int(stats.get("bytes_limit", 0))
        info["peak_grew"] = info["peak_bytes_in_use"] > int(stats_before.get("peak_bytes_in_use", 0))


def emit(record):
    """Append one result line to $MGD_BENCH_JSONL, when set."""
    path = os.environ.get("MGD_BENCH_JSONL")
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf8") as fh:
        fh.write(json.dumps(record, sort_keys=True, default=str) + "\n")


def progress(message):
    """One timestamped line to $MGD_BENCH_PROGRESS, when set, written at once."""
    path = os.environ.get("MGD_BENCH_PROGRESS")
    if not path:
        return
    with open(path, "a", encoding="utf8") as fh:
        fh.write(f"{time.strftime('%H:%M:%S')} {message}\n")


def record_result(benchmark, median_s):
    """The finished benchmark, in pytest-benchmark's JSON shape, to the JSONL log."""
    stats = {"median": median_s}
    if getattr(benchmark, "stats", None) is not None:
        s = benchmark.stats.stats
        stats.update(min=s.min, max=s.max, mean=s.mean, stddev=s.stddev, rounds=s.rounds,
                     iqr=s.iqr)
    emit({"name": benchmark.name, "fullname": benchmark.fullname,
          "group": benchmark.group, "stats": stats, "extra_info": dict(benchmark.extra_info)})


def _family(info):
    """What an out-of-memory point says something about: the same stage and
    implementation on the same configuration at any longer T."""
    return tuple(info.get(k) for k in ("impl", "stage", "B", "H", "D", "causal", "dtype"))


def shorter_oom(info):
    """The shortest T at which this stage and implementation already ran out of memory
    in this process on the same configuration and a length below info["T"], or None.
    Every implementation here needs at least as much memory at a longer T (naive
    autodiff: T^2 per head), so the longer one is not attempted: naive XLA spent a
    minute compiling its T=32768 double backward on the H200 before it could fail
    (2026-11-29), after T=16384 had asked for 112 GiB."""
    family, t = _family(info), info.get("T")
    seen = [r["extra_info"]["T"] for r in OOM_RECORDS
            if _family(r["extra_info"]) == family and r["extra_info"].get("T", t) < t]
    return min(seen) if seen else None


def record_oom(benchmark, message, inferred_from=None):
    """Mark the benchmark out of memory (extra_info oom=True; with inferred_from, the
    shorter T that ran out, when this one was not attempted) and remember it for the
    saved JSON; the caller then skips the test."""
    benchmark.extra_info.update(oom=True, oom_message=message[:500])
    if inferred_from is not None:
        benchmark.extra_info["oom_inferred_from_T"] = inferred_from
    entry = {"name": benchmark.name, "fullname": benchmark.fullname, "group": benchmark.group,
             "stats": None, "extra_info": dict(benchmark.extra_info)}
    OOM_RECORDS.append(entry)
    emit(entry)


def settle_memory(benchmark, info, stats_before, failure, what):
    """After the timed attempt: add the memory figures; on out of memory (`failure`
    is its message) also free what the attempt left, record it and skip the test.
    The caller drops its own references to the attempt's device buffers first."""
    if failure is not None:
        release_memory()
        add_memory(info, stats_before)
        record_oom(benchmark, failure)
        pytest.skip(f"out of memory: {what}")
    add_memory(info, stats_before)


def release_memory():
    """Drop what an out-of-memory attempt left behind before the next benchmark."""
    gc.collect()
