"""Tile sizes and launch settings per kernel, read from the tuned table.

The table (configs.json beside this file, written by `autotune.py`) holds one
entry per (kernel, head dim, causal, sequence length) measured on a GPU. A
lookup takes the entry of the same kernel, head dim and causality whose
sequence length is nearest on a log scale; with none, the defaults below,
chosen to be safe (each compiled and ran correctly on an H200) rather than
tuned for every shape.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

HEAD_DIMS = (16, 32, 64, 128)
# The kernels tuned per problem; the delta preprocess of the backward is a
# bandwidth-bound row reduction with a fixed launch (DELTA below).
KERNELS = ("fwd", "bwd_dkdv", "bwd_dq", "dbwd_rows", "dbwd_dq", "dbwd_dkdv")
TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs.json")


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def meta(self):
        # A kernel that tiles only queries (the delta preprocess) takes no BLOCK_N.
        if self.block_n:
            return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}
        return {"BLOCK_M": self.block_m}


DELTA = Config(block_m=64, block_n=0, num_warps=4, num_stages=1)


def default(kernel, head_dim):
    """The config used where the tuned table has no entry for the kernel.

    fwd and bwd_dkdv at head dim 128 were timed on an H200 (bf16, causal,
    T=8192, H=16): forward 0.71 ms; dK/dV 1.8 ms with 4 warps against 4.0 with
    8. The others are chosen from compile statistics only (sm_90a, no GPU; see
    NOTES.md): builds without register spills, on wgmma where such a build
    exists, with some register headroom (8 warps where 4 sit at the 255 limit),
    and the Pallas kernels' H200 tiles where those qualify.
    """
    big = head_dim >= 128
    if kernel == "fwd":
        return Config(128, 64, 8 if big else 4, 3)
    if kernel == "bwd_dkdv":
        # A key tile and its accumulators stay resident: smaller query tiles.
        return Config(32, 64, 4, 2)
    if kernel == "bwd_dq":
        return Config(64, 64, 4, 2) if big else Config(64, 32, 4, 2)
    if kernel == "dbwd_rows":
        return Config(64, 32, 8 if big else 4, 2)
    if kernel == "dbwd_dq":
        return Config(64, 32, 8 if big else 4, 2)
    if kernel == "dbwd_dkdv":
        # Two float32 [key tile, HEAD_DIM] accumulators and four resident key
        # tiles: at head dim 128 every 64-key tile spills, so 32 keys (mma.sync,
        # not wgmma: one warpgroup's wgmma needs 64 rows) and 8 warps.
        return Config(64, 32, 8, 2) if big else Config(32, 64, 4, 2)
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


class Table:
    """Tuned entries: {(kernel, head_dim, causal): [(t, Config), ...]}."""

    def __init__(self, entries=()):
        self._by_key = {}
        for e in entries:
            key = (e["kernel"], int(e["head_dim"]), bool(e["causal"]))
            cfg = Config(int(e["block_m"]), int(e["block_n"]), int(e["num_warps"]),
                         int(e["num_stages"]))
            self._by_key.setdefault(key, []).append((int(e["t"]), cfg))

    @classmethod
    def load(cls, path=TABLE_PATH):
        if not os.path.exists(path):
            return cls()
        with open(path) as f:
            return cls(json.load(f).get("entries", []))

    def lookup(self, kernel, head_dim, causal, t):
        candidates = self._by_key.get((kernel, int(head_dim), bool(causal)))
        if not candidates:
            return default(kernel, head_dim)
        log_t = math.log2(max(int(t), 1))
        return min(candidates, key=lambda tc: abs(math.log2(tc[0]) - log_t))[1]


def entry(kernel, head_dim, causal, t, cfg, **extra):
    return {"kernel": kernel, "head_dim": head_dim, "causal": causal, "t": t, **asdict(cfg), **extra}


_TABLE = None


def table():
    global _TABLE
    if _TABLE is None:
        _TABLE = Table.load()
    return _TABLE
