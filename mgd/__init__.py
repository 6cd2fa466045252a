"""MetaGrad-Distill: the double backward of causal attention, and the data-selection
pipeline built on it."""
import importlib

__all__ = ["attention", "attention_forward", "attention_backward", "attention_double_backward",
           "available", "BackendUnavailable"]
__version__ = "0.1.0"

# Loaded on first use so that `import mgd.errors` and `mgd --help` do not import JAX.
_LAZY = {"attention": "mgd.op", "attention_forward": "mgd.op", "attention_backward": "mgd.op",
         "attention_double_backward": "mgd.op", "available": "mgd.backends",
         "BackendUnavailable": "mgd.backends"}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mgd' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
