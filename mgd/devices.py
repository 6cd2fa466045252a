"""What accelerator JAX sees: one answer shared by the backends and the test suites."""
from __future__ import annotations

import jax


def gpus():
    try:
        return jax.devices("gpu")
    except RuntimeError:  # no GPU platform registered at all
        return []


def gpu_unavailable_reason():
    """None when JAX has an NVIDIA GPU, else a sentence saying what it has instead."""
    if gpus():
        return None
    return f"needs an NVIDIA GPU; JAX sees only {jax.default_backend()} devices here"
