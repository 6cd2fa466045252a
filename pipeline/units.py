"""Memory sizes as people write them ("16GB", "80 GiB", 1.6e10), in bytes. No imports from
the pipeline, so that configs and the planner can both use it without a cycle."""
from __future__ import annotations

import math
import re

__all__ = ["parse_bytes"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text) -> int:
    """"16GB", "16 GiB", "1.5e10", 16e9 -> bytes; ValueError otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"not a memory size: {text!r} (write e.g. 16GB, 80GiB or 1.6e10)")
        value, unit = float(m.group(1)), m.group(2).lower()
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"a memory size must be > 0, got {text!r}")
    return int(value * _UNITS[unit])
