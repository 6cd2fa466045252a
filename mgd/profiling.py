"""NVTX ranges for profilers (nsys timelines, ncu's --nvtx-include filter).

One domain, "mgd", for every stage the package runs: the benchmarks' forward,
backward, double_backward, hvp and metagradient_round, and the pipeline's
optimizer_step, metagradient_round and features. The ranges are process-wide
start/end ranges rather than push/pop: XLA may launch kernels from a thread other
than the Python one, and only a process-wide range encloses launches on any thread.
A range encloses a stage's kernels only if the stage has finished on the device
before the range ends; every caller here ends its ranges after a host read or
`block_until_ready`, which the stage needs anyway.

The `nvtx` package is optional: without it the ranges are no-ops.
"""
from __future__ import annotations

import contextlib

try:
    import nvtx as _nvtx
except ImportError:  # pragma: no cover - a dependency, but profiling must never be required
    _nvtx = None

DOMAIN = "mgd"


@contextlib.contextmanager
def nvtx_range(name: str):
    """A start/end NVTX range `name` in domain "mgd" around the block."""
    if _nvtx is None:
        yield
        return
    handle = _nvtx.start_range(message=name, domain=DOMAIN)
    try:
        yield
    finally:
        _nvtx.end_range(handle)
