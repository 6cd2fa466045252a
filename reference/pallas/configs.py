"""Tile sizes and Triton launch parameters per kernel, read from configs.json.

The table is keyed by kernel name, then by "d{head dim}/{causal|full}/{range}",
where range buckets the longer of the two sequence lengths (see `length_range`).
`python -m mgd.reference.pallas.autotune` writes it; a missing key falls back
to the defaults below, so the kernels never depend on the table being there.
"""
from __future__ import annotations

import json
import os

KERNELS = ("forward", "backward_dkdv", "backward_dq",
           "double_backward_rows", "double_backward_q", "double_backward_kv")

# (upper bound of T, label, T the autotuner times at)
RANGES = ((2048, "short", 1024), (8192, "medium", 4096), (None, "long", 16384))

TABLE_PATH = os.path.join(os.path.dirname(__file__), "configs.json")

# Safe GPU defaults: 64 x 64 tiles keep the double backward's many live fp32
# tiles within registers at D = 128; the forward can afford a taller query tile.
_GPU_DEFAULT = {"block_q": 64, "block_k": 64, "num_warps": 4, "num_stages": 2}
_GPU_FORWARD = {"block_q": 128, "block_k": 64, "num_warps": 8, "num_stages": 2}
# Interpreted on a CPU: small tiles so short test sequences still span
# several blocks (tails, causal skips, the loops' bounds all get exercised).
_CPU_DEFAULT = {"block_q": 16, "block_k": 16, "num_warps": 4, "num_stages": 1}


def length_range(t):
    for bound, label, _ in RANGES:
        if bound is None or t <= bound:
            return label
    raise AssertionError("unreachable")


def key(head_dim, causal, t):
    return f"d{head_dim}/{'causal' if causal else 'full'}/{length_range(t)}"


_table_cache = {}


def load_table(path=TABLE_PATH):
    if path not in _table_cache:
        try:
            with open(path) as f:
                _table_cache[path] = json.load(f).get("configs", {})
        except FileNotFoundError:
            _table_cache[path] = {}
    return _table_cache[path]


def default(kernel, *, interpret):
    if interpret:
        return dict(_CPU_DEFAULT)
    return dict(_GPU_FORWARD if kernel == "forward" else _GPU_DEFAULT)


_TUNED_FIELDS = ("block_q", "block_k", "num_warps", "num_stages")


def _tuned(kernel, head_dim, causal, t):
    """The table's entry, else the closest tuned one: the other mask at the same
    head dim, then the nearest tuned head dim (tiles depend mostly on D and T)."""
    entries = load_table().get(kernel, {})
    label = length_range(t)
    for want in (key(head_dim, causal, t), key(head_dim, not causal, t)):
        if want in entries:
            return {f: entries[want][f] for f in _TUNED_FIELDS}
    tuned_dims = sorted({int(k.split("/")[0][1:]) for k in entries
                         if k.endswith("/" + label)}, key=lambda d: (abs(d - head_dim), -d))
    for d in tuned_dims:
        for mask in (causal, not causal):
            want = f"d{d}/{'causal' if mask else 'full'}/{label}"
            if want in entries:
                return {f: entries[want][f] for f in _TUNED_FIELDS}
    return {}


def lookup(kernel, head_dim, causal, t, *, interpret, overrides=None):
    """The config dict for one kernel launch.

    `overrides` (kernel name -> partial config) wins over the table, which wins
    over the defaults; interpreted runs ignore the table (it holds GPU timings).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    config = default(kernel, interpret=interpret)
    if not interpret:
        config.update(_tuned(kernel, head_dim, causal, t))
    if overrides and kernel in overrides:
        config.update(overrides[kernel])
    return config


def fit_blocks(config, tq, tk):
    """Shrink tiles that are longer than the (power-of-two rounded) sequences."""
    def cap(block, t):
        limit = max(16, 1 << max(t - 1, 0).bit_length())
        return min(block, limit)
    config = dict(config)
    config["block_q"] = cap(config["block_q"], tq)
    config["block_k"] = cap(config["block_k"], tk)
    return config
